"""`r1v bench convert`: wall time and peak RSS of our GGUF conversion next to llama.cpp's own
convert_hf_to_gguf.py on the same generated checkpoint, in the same run; and how our peak RSS scales
when the checkpoint has 4× the layers (it should follow the largest tensor, not the checkpoint).

Every conversion runs in its own child process; its peak RSS is the kernel's ru_maxrss for that child.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .measure import run_measured

# A Qwen2/InternViT shape that gives ~1.2 GB of bf16 weights at 12 layers (48 layers: ~4.5 GB).
BENCH_SIZES: dict[str, int] = {
    "llm_hidden": 2048, "llm_intermediate": 5632, "llm_heads": 16, "llm_kv_heads": 4,
    "vit_hidden": 256, "vit_intermediate": 1024, "vit_heads": 4, "vit_layers": 4,  # stock needs ≥ 4 ViT layers
    "max_shard_bytes": 256 << 20,
}

# Runs llama.cpp's converter with the one lookup it cannot do on a generated tokenizer patched: its
# pre-tokenizer table is keyed by a hash of known tokenizers, so ours is declared Qwen2's (which it is).
_LLAMA_CPP_RUNNER = """
import runpy, sys
llama_dir = sys.argv[1]
sys.path[:0] = [llama_dir, llama_dir + "/gguf-py"]
import conversion.base as base
for cls in vars(base).values():
    if isinstance(cls, type) and "get_vocab_base_pre" in vars(cls):
        cls.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = [llama_dir + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass
class Measurement:
    tool: str  # "r1v" or "llama.cpp"
    job: str  # "llm f16", "mmproj f16"
    checkpoint_gb: float
    seconds: float
    peak_rss_mb: float
    output_mb: float


def _size_gb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) / 1e9


def _write_preprocessor_config(ckpt: Path) -> None:
    """llama.cpp's mmproj converter needs image mean/std from this file (ours reads the family's)."""
    from r1v.runtime.image import IMAGENET_MEAN, IMAGENET_STD

    config = {"image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "crop_size": 448}
    (ckpt / "preprocessor_config.json").write_text(json.dumps(config))


def ours(ckpt: Path, out: Path, job: str) -> list[str]:
    base = [sys.executable, "-m", "r1v", "convert", "gguf", str(ckpt), "-o", str(out), "--no-progress"]
    return base + (["--quant", "f16", "--no-mmproj"] if job == "llm" else ["--no-llm", "--mmproj-quant", "f16"])


def stock(llama_dir: Path, ckpt: Path, out: Path, job: str) -> list[str]:
    args = [sys.executable, "-c", _LLAMA_CPP_RUNNER, str(llama_dir), str(ckpt), "--outtype", "f16"]
    return args + (["--outfile", str(out / "llm.gguf")] if job == "llm" else ["--mmproj", "--outfile", str(out / "mmproj.gguf")])


def bench_convert(
    layers: int = 12, scale: int = 4, llama_cpp_dir: str | Path | None = None, workdir: str | Path | None = None
) -> dict[str, Any]:
    """Generate checkpoints of `layers` and `layers*scale` decoder layers, convert them, measure."""
    from r1v.testing import make_tiny_checkpoint

    llama_dir = Path(llama_cpp_dir) if llama_cpp_dir else None
    if llama_dir is not None and not (llama_dir / "convert_hf_to_gguf.py").is_file():
        raise FileNotFoundError(f"{llama_dir}: no convert_hf_to_gguf.py (point --llama-cpp-dir at llama.cpp's source)")
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="r1v-bench-convert-"))
    root.mkdir(parents=True, exist_ok=True)
    rows: list[Measurement] = []
    try:
        for n_layers in (layers, layers * scale):
            ckpt = make_tiny_checkpoint(root / f"ckpt-{n_layers}", vit="300m", seed=0, llm_layers=n_layers,
                                        **BENCH_SIZES)
            _write_preprocessor_config(ckpt)
            gb = _size_gb(ckpt)
            jobs = [("r1v", "llm")] + ([("r1v", "mmproj")] if n_layers == layers else [])
            if llama_dir is not None and n_layers == layers:
                jobs += [("llama.cpp", "llm"), ("llama.cpp", "mmproj")]
            for tool, job in jobs:
                out = root / f"out-{tool}-{job}-{n_layers}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                cmd = ours(ckpt, out, job) if tool == "r1v" else stock(llama_dir, ckpt, out, job)  # type: ignore[arg-type]
                seconds, rss = run_measured(cmd)
                size = sum(p.stat().st_size for p in out.glob("*.gguf")) / 1e6
                rows.append(Measurement(tool, f"{job} f16 ({n_layers} layers)", round(gb, 3), round(seconds, 2),
                                        round(rss, 1), round(size, 1)))
                shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(ckpt, ignore_errors=True)
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return {"measurements": [asdict(r) for r in rows], **_ratios(rows, layers, scale)}


def _ratios(rows: list[Measurement], layers: int, scale: int) -> dict[str, float]:
    def find(tool: str, job: str) -> Measurement | None:
        return next((r for r in rows if r.tool == tool and r.job == job), None)

    ratios: dict[str, float] = {}
    small, big = find("r1v", f"llm f16 ({layers} layers)"), find("r1v", f"llm f16 ({layers * scale} layers)")
    if small and big:
        ratios[f"r1v_peak_rss_growth_at_{scale}x_layers"] = round(big.peak_rss_mb / small.peak_rss_mb, 3)
    for job in ("llm", "mmproj"):
        a, b = find("r1v", f"{job} f16 ({layers} layers)"), find("llama.cpp", f"{job} f16 ({layers} layers)")
        if a and b:
            ratios[f"{job}_time_ratio_r1v_over_llama_cpp"] = round(a.seconds / b.seconds, 3)
            ratios[f"{job}_peak_rss_ratio_r1v_over_llama_cpp"] = round(a.peak_rss_mb / b.peak_rss_mb, 3)
    return {"ratios": ratios}


def format_results(results: dict[str, Any]) -> str:
    lines = [f"{'tool':<10}{'job':<28}{'ckpt GB':>9}{'wall s':>9}{'peak RSS MB':>13}{'out MB':>9}"]
    for m in results["measurements"]:
        lines.append(f"{m['tool']:<10}{m['job']:<28}{m['checkpoint_gb']:>9.2f}{m['seconds']:>9.2f}"
                     f"{m['peak_rss_mb']:>13.0f}{m['output_mb']:>9.0f}")
    lines.append("")
    lines += [f"{key:<44}{value:>8.3f}" for key, value in results["ratios"].items()]
    return "\n".join(lines)
