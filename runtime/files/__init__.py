"""Model files: what a user typed to the files on disk (`resolve`), the registry of known models (`registry`,
models.yaml), and memory plans from `config.json` alone (`plan`, `r1v plan`)."""
