"""The llama.cpp backend: GGUF + mmproj through llama-cpp-python's low-level bindings and libmtmd (CPU; GPU
offload where the library is built for it).

- `backend`: `LlamaCppBackend`, what `r1v.load()` runs GGUF files with.
- `mtmd`: ctypes bindings to libmtmd (image encoder) and the text model (`TextModel`).
- `llama_batch`: `llama_batch` buffers and the decode call (tokens or embeddings, n_batch at a time).
- `llama_params`: llama.cpp's model/context parameters, the AMX guard.
- `prefix_cache`: the cross-process prefix cache (KV state after the last image of a prompt, on disk).
- `tile_budget`: `LoadOptions.image_seconds`: tiles per image from this machine's measured rates.
- `gguf_header`: the GGUF header reader behind the checks of a file before llama.cpp opens it.

Nothing is imported here: `r1v cache` reads the prefix cache without loading llama.cpp.
"""
