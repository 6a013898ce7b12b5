"""The library's runtime: `load()` -> `Model` (api), chat templates (chat), the `<think>` split (reasoning),
options and errors (options), image preprocessing (image); below them the engines (backends/), the torch model
(model/) and model files (files/). See ARCHITECTURE.md."""
