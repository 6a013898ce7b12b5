#!/usr/bin/env bash
# The AWQ backend on an NVIDIA GPU, in one command (about 5 minutes on an H200):
#   bash scripts/gpu-check.sh
# 1. install this checkout into the current Python (pip install --no-deps --no-build-isolation -e .; the
#    environment brings torch, triton, transformers, safetensors, tokenizers, pillow; gguf, which `r1v convert
#    awq` needs, comes from wheels in $R1V_WHEELS (default .whl, git-ignored: `pip download --no-deps gguf -d .whl`
#    on a machine with PyPI, then carry it) when it is not installed, else from pip),
# 2. the CUDA tests (those that need llama.cpp are not run; those that need gguf skip without it),
# 3. the kernel table at R1V-38B's linear shapes (python -m r1v.bench.kernels),
# 4. a generated Qwen2-7B-width AWQ model (3584 / 18944, 28 / 4 heads, 6 layers, 32k vocabulary, 1024-wide
#    4-layer ViT; `--method rtn` on the GPU) and `r1v bench generate` on it with an image prompt,
# 5. batched decode on that model: 1, 2, 4, 8 sequences per forward (r1v.bench.generate_awq.bench_batched_decode).
# Everything lands in $OUT (or ./gpu-check-out): gpu-check.log, stages.tsv, kernels.json, bench.json, batched.json,
# pytest.xml and summary.json, and the summary is printed at the end. A stage that fails or runs out of its time
# is recorded and the next one runs. PYTHON picks the interpreter (default python3); R1V_GPU_CHECK_INSTALL=0
# skips the pip install (the project already installed), R1V_GPU_CHECK_SHAPES (38b | 7b | cpu) the kernel table's
# shapes, R1V_GPU_CHECK_MODEL (7b | cpu) the generated model, R1V_GPU_CHECK_DEVICE (cuda) where they run.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-$PWD/gpu-check-out}
WORK=${R1V_GPU_CHECK_WORK:-/tmp/r1v-gpu-check}
PY=${PYTHON:-python3}
WHEELS=${R1V_WHEELS:-.whl}
DEVICE=${R1V_GPU_CHECK_DEVICE:-cuda}
MODEL=${R1V_GPU_CHECK_MODEL:-7b}
mkdir -p "$OUT_DIR" "$WORK"
LOG=$OUT_DIR/gpu-check.log
: >"$OUT_DIR/stages.tsv"
: >"$LOG"
export OUT_DIR WORK PY WHEELS DEVICE MODEL PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# stage NAME SECONDS COMMAND...: run it (a command or a function of this script) under a time limit, log its
# output, record its exit status and duration; never stop the script.
stage() {
    local name=$1 limit=$2 start rc ms
    shift 2
    start=$(date +%s%N)
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" >>"$LOG" 2>&1
    rc=$?
    ms=$((($(date +%s%N) - start) / 1000000))
    printf '%s\t%s\t%d.%d\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000 / 100)) >>"$OUT_DIR/stages.tsv"
    echo "=== $name: exit $rc after $((ms / 1000)) s" | tee -a "$LOG"
}

install() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PY" -c 'import sys, torch, triton; print(sys.version.split()[0], "torch", torch.__version__, "triton",
triton.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'
    if [ "${R1V_GPU_CHECK_INSTALL:-1}" != 0 ]; then
        "$PY" -m pip install -q --no-deps --no-build-isolation -e . || return 1
    fi
    if ! "$PY" -c 'import gguf' 2>/dev/null; then
        if ls "$WHEELS"/gguf-*.whl >/dev/null 2>&1; then
            "$PY" -m pip install -q --no-index --no-deps --target "$WORK/site" "$WHEELS"/gguf-*.whl || return 1
        else
            "$PY" -m pip install -q --no-deps "gguf>=0.17" || echo "gguf not installed: the AWQ stages will fail"
        fi
    fi
    PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH} "$PY" -c 'import r1v.runtime.backends.awq, gguf; print("ok")'
}
bench() {
    "$PY" -m r1v bench generate "$WORK/awq-$MODEL" --image "$WORK/image.png" --rounds 1 --max-tokens 64 \
        --device "$DEVICE" --json \
        >"$OUT_DIR/bench.json.tmp" && mv "$OUT_DIR/bench.json.tmp" "$OUT_DIR/bench.json"
}
export -f install bench
stage install 50 install
[ -d "$WORK/site" ] && export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}

# The CUDA tests, the tests that assumed a CPU before (bench on CPU, kernel="triton" on the GPU), the Triton
# dequantize pass compiled, the static decode step against the dynamic one, and the batched decode's graphs.
stage tests 110 "$PY" -m pytest -q -rs -p no:cacheprovider --junitxml="$OUT_DIR/pytest.xml" \
    tests/test_awq_int4.py tests/test_awq_kernels.py tests/test_awq_backend.py tests/test_reference_model.py \
    tests/test_awq_batching.py \
    -k "cuda or triton_kernel_option or bench_generate_runs_on_cpu or dequantize_pass or static_decode"

stage kernels 60 "$PY" -m r1v.bench.kernels --shapes "${R1V_GPU_CHECK_SHAPES:-38b}" --device "$DEVICE" \
    --json "$OUT_DIR/kernels.json"

stage model 150 "$PY" -c "
from r1v.bench.generate_awq import make_bench_model
from r1v.testing.images import pattern_pixels
from PIL import Image
Image.fromarray(pattern_pixels(448, 448)).save('$WORK/image.png')
print(make_bench_model('$WORK/awq-$MODEL', '$MODEL', device='$DEVICE'))"

stage bench 110 bench

# Decode with 1, 2, 4, 8 sequences per forward (one model copy, one CUDA graph per batch bucket and span).
stage batched 90 "$PY" -c "
import json, os
from r1v.bench.generate_awq import bench_batched_decode
results = bench_batched_decode('$WORK/awq-$MODEL', device='$DEVICE')
open('$OUT_DIR/batched.json.tmp', 'w').write(json.dumps(results))
os.replace('$OUT_DIR/batched.json.tmp', '$OUT_DIR/batched.json')"

"$PY" -m r1v.bench.gpu_check "$OUT_DIR" 2>>"$LOG" | tee -a "$LOG"
echo "gpu-check: results in $OUT_DIR"
