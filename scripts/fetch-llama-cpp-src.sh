#!/usr/bin/env bash
# Unpack the llama.cpp source vendored in llama-cpp-python's sdist (same version as the installed
# bindings) into ~/.cache/r1v/llama.cpp-src: the baseline converter for `r1v bench convert`.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))")
dest="${XDG_CACHE_HOME:-$HOME/.cache}/r1v/llama.cpp-src"
if [ -f "$dest/convert_hf_to_gguf.py" ]; then echo "$dest"; exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
.venv/bin/pip download -q --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$tmp"
tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
mkdir -p "$(dirname "$dest")"
rm -rf "$dest"
mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$dest"
echo "$dest"
