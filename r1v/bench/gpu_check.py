"""`python -m r1v.bench.gpu_check OUT_DIR`: the summary of `scripts/gpu-check.sh` from what its stages left in OUT_DIR.

Reads `stages.tsv` (stage, exit status, seconds: one line per stage, written by the script), `kernels.json`
(`python -m r1v.bench.kernels --json`), `bench.json` (`r1v bench generate --json`) and `batched.json`
(`generate_awq.bench_batched_decode`); prints each stage's outcome, the kernel table, the whole-model table and the
batched decode table, and writes them together as `summary.json` (a stage that failed or left nothing is reported
as such; the summary is written whatever is missing).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def read_stages(path: Path) -> list[dict[str, Any]]:
    stages = []
    if path.is_file():
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 3:
                name, rc, seconds = parts
                stages.append({"stage": name, "rc": int(rc), "ok": rc == "0", "seconds": float(seconds)})
    return stages


def _outcome(rc: int) -> str:
    if rc == 0:
        return "ok"
    return "TIMED OUT (its limit)" if rc in (124, 137) else f"FAILED (exit {rc})"


def _load(path: Path) -> tuple[Any, str | None]:
    if not path.is_file():
        return None, f"{path.name} was not written"
    try:
        return json.loads(path.read_text()), None
    except json.JSONDecodeError as exc:
        return None, f"{path.name}: not JSON ({exc})"


def summarize(out_dir: Path) -> tuple[dict[str, Any], str]:
    from .generate_awq import format_batched
    from .generate_awq import format_results as format_bench
    from .kernels import format_results as format_kernels

    stages = read_stages(out_dir / "stages.tsv")
    kernels, kernels_error = _load(out_dir / "kernels.json")
    bench, bench_error = _load(out_dir / "bench.json")
    batched, batched_error = _load(out_dir / "batched.json")
    if batched_error and not any(s["stage"] == "batched" for s in stages):
        batched_error = None  # a gpu-check from before the batched stage: nothing is missing
    lines = ["gpu-check stages:"]
    lines += [f"  {s['stage']:<12} {_outcome(s['rc']):<22} {s['seconds']:7.1f} s" for s in stages]
    for title, data, error, fmt in (("kernels", kernels, kernels_error, format_kernels),
                                    ("bench generate", bench, bench_error, format_bench),
                                    ("batched decode", batched, batched_error, format_batched)):
        if data is not None or error:
            lines.append("")
            lines.append(fmt(data) if data is not None else f"{title}: {error}")
    summary = {"stages": stages, "kernels": kernels, "bench": bench, "batched": batched,
               "missing": [e for e in (kernels_error, bench_error, batched_error) if e]}
    return summary, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m r1v.bench.gpu_check OUT_DIR", file=sys.stderr)
        return 2
    out_dir = Path(args[0])
    summary, text = summarize(out_dir)
    tmp = out_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out_dir / "summary.json")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
