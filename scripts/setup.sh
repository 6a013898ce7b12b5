#!/usr/bin/env bash
# Set up a fresh machine for r1v-edge: a virtualenv in .venv with the project and its test tools.
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Pinned CPU torch first (tests and the AWQ path need it). Any newer or unpinned torch would pull a
# multi-GB CUDA build; the package itself does not pin torch for its users.
.venv/bin/pip install -q "torch==${R1V_TORCH_VERSION:-2.13.0}"
# Builds from source (llama-cpp-python, when required) use both cores and pip's wheel cache.
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
# llama.cpp is built for this CPU (-march=native) but without its AMX matrix product, which segfaults on many
# AMX hosts (llama.cpp #20824): a build without it keeps the CPU_REPACK weight layout that the runtime's AMX
# guard (runtime/backends/llamacpp/llama_params.py) must otherwise switch off. On CPUs without AMX the flag changes nothing.
export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_C_FLAGS=-U__AMX_INT8__ -DCMAKE_CXX_FLAGS=-U__AMX_INT8__"
.venv/bin/pip install -q -e ".[dev]"
# AutoAWQ and AutoGPTQ are the tests' independent checks of our AWQ packing and GPTQ rounding; both are
# deprecated and pin old transformers or CUDA builds, so they come without dependencies (only AutoAWQ's
# packing_utils.py and AutoGPTQ's quantization/gptq.py + quantizer.py are loaded, which need torch alone).
.venv/bin/pip install -q --no-deps "autoawq==0.2.9" "auto-gptq==0.7.1"
# Headless Chromium for the viewer's browser test (tests/test_viewer.py skips without it): only when asked
# (R1V_INSTALL_CHROMIUM=1, or CI=true), as root, with apt-get; a failure here does not stop the setup.
if [ ! -x /usr/bin/chromium ] && { [ "${R1V_INSTALL_CHROMIUM:-0}" = 1 ] || [ "${CI:-}" = true ]; } \
        && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
        || echo "setup: could not install chromium; the viewer's browser test will be skipped" >&2
fi
# llama.cpp's own source (the sdist's vendored copy, same version as the bindings, ~5 s): the baseline of
# `r1v bench convert` and the tests that compile llama.cpp's Jinja engine; a failure here does not stop the setup.
bash scripts/fetch-llama-cpp-src.sh >/dev/null \
    || echo "setup: could not fetch llama.cpp's source; tests that need it will be skipped" >&2
echo "r1v-edge set up in .venv ($(.venv/bin/r1v --version))"
