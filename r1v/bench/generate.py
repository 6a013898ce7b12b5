"""`r1v bench generate MODEL`: our runtime next to llama-cpp-python used directly on the same GGUF files with
the same settings, in the same run: prefill tokens/s, decode tokens/s, time to first token (text, and an
image prompt when an mmproj is there), peak RSS; decode speed as a fraction of this machine's memory
bandwidth bound (bandwidth / bytes of weights read per token).

Each side runs in its own child process (clean peak RSS); the sides alternate `rounds` times and the
median of each figure is reported, so load on the machine affects both alike.

`--repeat N` (`bench_repeat`) measures the prefix cache instead: time to first token for N different questions
about the same image - the first (vision tower and prefill), the later ones in the same process (the saved
state restored from memory; the model is reset between questions, so the live KV cache does not serve them)
and again in a new process (the first from disk) - with a prefix cache directory of its own.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .measure import TIMING_ROWS, memory_bandwidth_gbps, ratio, run_side, timing_figures

# A long, plain instruction so neither side stops early; both decode exactly the same number of tokens.
PROMPT_PARAGRAPH = (
    "Describe, step by step and in great detail, how a bicycle works: the frame, the wheels, the chain, "
    "the gears, the brakes and the forces that keep a rider upright. "
)
IMAGE_QUESTION = "Describe this image in detail."


@dataclass
class BenchSpec:
    model: str
    mmproj: str | None
    prompt_repeats: int
    max_tokens: int
    n_ctx: int
    n_threads: int | None
    n_batch: int
    image: str | None
    flash_attn: bool
    extra_buffers: bool | None = None  # llama.cpp's extra weight buffer types; None: the AMX guard decides


@dataclass
class SideFigures:
    prompt_tokens: int = 0
    prefill_tokens_per_second: float = 0.0
    time_to_first_token: float = 0.0
    decode_tokens_per_second: float = 0.0
    completion_tokens: int = 0
    image_prompt_tokens: int = 0
    image_time_to_first_token: float = 0.0
    peak_rss_mb: float = 0.0


# --- the two workers, each run in a child process ---------------------------------------------------------

def _ours(spec: BenchSpec) -> dict[str, Any]:
    from r1v.runtime.api import LoadOptions, load

    options = LoadOptions(mmproj=spec.mmproj, n_ctx=spec.n_ctx, n_threads=spec.n_threads, n_batch=spec.n_batch,
                          flash_attn=spec.flash_attn, extra_buffers=spec.extra_buffers)
    out: dict[str, Any] = {}
    with load(spec.model, options) as model:
        prompt = PROMPT_PARAGRAPH * spec.prompt_repeats
        result = model.generate(prompt, temperature=0, repetition_penalty=1.0, max_tokens=spec.max_tokens, seed=0)
        out["text"] = dict(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                           time_to_first_token=result.time_to_first_token,
                           decode_seconds=result.decode_seconds, prompt=result.prompt)
        if spec.image and model.has_vision:
            model.reset()
            image_result = model.generate(IMAGE_QUESTION, images=[spec.image], temperature=0,
                                          repetition_penalty=1.0, max_tokens=1, seed=0)
            out["image"] = dict(prompt_tokens=image_result.prompt_tokens,
                                time_to_first_token=image_result.time_to_first_token,
                                prompt=image_result.prompt)
    return out


def _direct(spec: BenchSpec, prompt: str, n_tokens: int, image_prompt: str | None) -> dict[str, Any]:
    """llama-cpp-python as a user would call it: `Llama.generate` for text; its libmtmd bindings
    (through runtime.mtmd, the same calls its multimodal chat handler makes) for the image prompt."""
    import llama_cpp
    import numpy as np

    from r1v.runtime.backends.llamacpp.llama_params import open_llama

    # llama_cpp.Llama with the same AMX guard as ours (else it crashes where ours runs)
    llama = open_llama(spec.model, extra_buffers=spec.extra_buffers, n_ctx=spec.n_ctx, n_batch=spec.n_batch,
                       flash_attn=spec.flash_attn, verbose=False,
                       **({"n_threads": spec.n_threads} if spec.n_threads else {}))
    out: dict[str, Any] = {}
    prompt_ids = llama.tokenize(prompt.encode(), add_bos=True, special=True)  # as the model asks (BOS or not)
    start = time.perf_counter()
    first = last = start
    generated = 0
    for _ in llama.generate(prompt_ids, temp=0.0, repeat_penalty=1.0, reset=True):
        generated += 1
        last = time.perf_counter()
        if generated == 1:
            first = last
        if generated == n_tokens:
            break
    out["text"] = dict(prompt_tokens=len(prompt_ids), completion_tokens=generated,
                       time_to_first_token=first - start, decode_seconds=last - first)
    if image_prompt is not None and spec.mmproj and spec.image:
        from PIL import Image

        from r1v.runtime.backends.llamacpp.mtmd import MtmdContext

        with MtmdContext(spec.mmproj, llama, n_threads=spec.n_threads) as ctx:
            pixels = np.asarray(Image.open(spec.image).convert("RGB"))
            text = image_prompt.replace("<image>", ctx.marker)
            llama.reset()
            start = time.perf_counter()
            with ctx.tokenize(text, [pixels]) as prompt:
                ctx.eval_into_llama(llama, prompt)
                logits = llama_cpp.llama_get_logits_ith(llama.ctx, -1)
                int(np.argmax(np.ctypeslib.as_array(logits, shape=(llama.n_vocab(),))))
                out["image"] = dict(prompt_tokens=prompt.n_pos, time_to_first_token=time.perf_counter() - start)
    llama.close()
    return out


# --- --repeat: the prefix cache -------------------------------------------------------------------------

REPEAT_QUESTIONS = (
    "How many red circles are in the image?", "What colour is the largest shape?", "Is there a triangle?",
    "Describe the image in one sentence.", "What is in the top left corner?", "How many shapes are blue?",
    "Which shape is nearest the centre?", "Are any shapes overlapping?",
)


def _repeat(job: dict[str, Any]) -> dict[str, Any]:
    from r1v.runtime.api import LoadOptions, load

    options = LoadOptions(mmproj=job["mmproj"], n_ctx=job["n_ctx"], n_threads=job["n_threads"],
                          n_threads_batch=job["n_threads"], n_batch=job["n_batch"],
                          flash_attn=job["flash_attn"], max_tiles=job["max_tiles"], prefix_cache_dir=job["cache_dir"])
    runs = []
    start = time.perf_counter()
    with load(job["model"], options) as model:
        load_seconds = time.perf_counter() - start
        for i in range(job["repeat"]):
            model.reset()
            question = REPEAT_QUESTIONS[(i + job["offset"]) % len(REPEAT_QUESTIONS)]
            r = model.generate(question, images=[job["image"]], temperature=0, repetition_penalty=1.0,
                               max_tokens=job["max_tokens"], seed=0)
            runs.append(dict(time_to_first_token=r.time_to_first_token, image_seconds=r.image_seconds,
                             prompt_tokens=r.prompt_tokens, cached_tokens=r.cached_tokens,
                             restored_tokens=r.restored_tokens, tiles=[i.tiles for i in r.images]))
    return {"load_seconds": load_seconds, "runs": runs}


def bench_repeat(model: str, *, image: str, repeat: int = 3, mmproj: str | None = None, quant: str | None = None,
                 max_tokens: int = 1, n_ctx: int = 8192, n_threads: int | None = None, n_batch: int = 512,
                 flash_attn: bool = True, max_tiles: int | None = None) -> dict[str, Any]:
    """TTFT of `repeat` questions about one image: first, later in the same process, then in a new process."""
    from r1v.runtime.backends.llamacpp.prefix_cache import PrefixStore
    from r1v.runtime.files.resolve import resolve_model

    if repeat < 2:
        raise ValueError(f"--repeat needs at least 2 questions, got {repeat}")
    resolved = resolve_model(model, quant=quant, mmproj=mmproj)
    if resolved.format != "gguf" or resolved.mmproj is None:
        raise ValueError(f"{model}: --repeat measures the llama.cpp prefix cache: it needs a GGUF model with its mmproj")
    with tempfile.TemporaryDirectory(prefix="r1v-bench-repeat-") as tmp:
        workdir = Path(tmp)
        job = {"model": str(resolved.path), "mmproj": str(resolved.mmproj), "image": str(image), "repeat": repeat,
               "max_tokens": max_tokens, "n_ctx": n_ctx, "n_threads": n_threads, "n_batch": n_batch,
               "flash_attn": flash_attn, "max_tiles": max_tiles, "cache_dir": str(workdir / "prefix-cache")}
        first, rss1 = _run_side("repeat", {**job, "offset": 0}, workdir)
        second, rss2 = _run_side("repeat", {**job, "offset": repeat}, workdir)  # other questions: only the image shared
        entries = PrefixStore(workdir / "prefix-cache").entries()
    cold = first["runs"][0]
    in_process = [r["time_to_first_token"] for r in first["runs"][1:]]
    from_disk = second["runs"][0]
    if from_disk["restored_tokens"] == 0 or any(r["restored_tokens"] == 0 for r in first["runs"][1:]):
        raise RuntimeError("the prefix cache did not serve the later questions")

    def ratio(a: float, b: float) -> float:
        return round(a / b, 1) if b else 0.0

    later = statistics.median(in_process)
    return {
        "model": str(resolved.path), "mmproj": str(resolved.mmproj), "image": str(image), "repeat": repeat,
        "tiles": cold["tiles"], "prompt_tokens": cold["prompt_tokens"],
        "restored_tokens": from_disk["restored_tokens"],
        "entry_bytes": sum(e.size for e in entries),
        "first": {"time_to_first_token": round(cold["time_to_first_token"], 4),
                  "image_seconds": round(cold["image_seconds"], 4)},
        "later_in_process": [round(t, 4) for t in in_process],
        "new_process": [round(r["time_to_first_token"], 4) for r in second["runs"]],
        "from_disk": {"time_to_first_token": round(from_disk["time_to_first_token"], 4)},
        "load_seconds": [round(first["load_seconds"], 3), round(second["load_seconds"], 3)],
        "peak_rss_mb": [round(rss1, 1), round(rss2, 1)],
        "ratios": {"first_over_later_in_process": round(ratio(cold["time_to_first_token"], later), 1),
                   "first_over_from_disk": round(ratio(cold["time_to_first_token"],
                                                       from_disk["time_to_first_token"]), 1)},
    }


def format_repeat(results: dict[str, Any]) -> str:
    first, ratios = results["first"], results["ratios"]
    later = ", ".join(f"{t:.3f}" for t in results["later_in_process"])
    return "\n".join([
        f"{results['model']} + {Path(results['mmproj']).name}",
        f"image {results['image']}: {'+'.join(map(str, results['tiles']))} tile(s), prompt {results['prompt_tokens']} "
        f"tokens, {results['restored_tokens']} restored from the prefix cache ({results['entry_bytes'] / 1e6:.1f} MB)",
        "",
        f"{'time to first token':<44}{'s':>10}",
        f"{'first question (vision tower + prefill)':<44}{first['time_to_first_token']:>10.3f}",
        f"{'later questions, same process':<44}{later:>10}" if "," not in later else
        f"{'later questions, same process':<34}{later:>20}",
        f"{'first question in a new process (disk)':<44}{results['from_disk']['time_to_first_token']:>10.3f}",
        "",
        f"first / later in process: {ratios['first_over_later_in_process']:.1f}x; "
        f"first / from disk: {ratios['first_over_from_disk']:.1f}x",
    ])


def _worker_main(argv: list[str]) -> None:
    side, spec_file, out_file = argv
    job = json.loads(Path(spec_file).read_text())
    if side == "repeat":
        Path(out_file).write_text(json.dumps(_repeat(job)))
        return
    spec = BenchSpec(**job["spec"])
    result = _ours(spec) if side == "ours" else _direct(spec, job["prompt"], job["n_tokens"], job["image_prompt"])
    Path(out_file).write_text(json.dumps(result))


# --- the parent: alternate the sides, take medians, compare ----------------------------------------------

def _run_side(side: str, job: dict[str, Any], workdir: Path) -> tuple[dict[str, Any], float]:
    return run_side("r1v.bench.generate", side, job, workdir)


def _figures(runs: list[tuple[dict[str, Any], float]]) -> SideFigures:
    return SideFigures(**timing_figures(runs), peak_rss_mb=round(statistics.median(rss for _, rss in runs), 1))


def weight_bytes_per_token(gguf_path: str | Path) -> int:
    """Bytes of weights one decode step reads: every tensor, except the embedding table when a separate
    output matrix exists (a token reads one row of it)."""
    import gguf

    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(gguf_path).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    return sum(tensors.values())


def bench_generate(model: str, *, mmproj: str | None = None, image: str | None = None, quant: str | None = None,
                   prompt_repeats: int = 12, max_tokens: int = 64, n_ctx: int = 4096, n_threads: int | None = None,
                   n_batch: int = 512, flash_attn: bool = True, rounds: int = 3,
                   extra_buffers: bool | None = None) -> dict[str, Any]:
    """Measure both sides `rounds` times, alternating; return figures, ratios and the bandwidth bound.
    `extra_buffers` applies to both sides (None: the AMX guard of runtime/backends/llamacpp/llama_params decides)."""
    from r1v.runtime.backends.llamacpp.llama_params import choose_buffers, system_info
    from r1v.runtime.files.resolve import resolve_model

    resolved = resolve_model(model, quant=quant, mmproj=mmproj)
    if resolved.format != "gguf":
        raise ValueError(f"{model}: bench generate compares against llama-cpp-python, so it needs a GGUF model "
                         f"(got {resolved.format})")
    mmproj_path = str(resolved.mmproj) if resolved.mmproj else None
    spec = BenchSpec(str(resolved.path), mmproj_path, prompt_repeats, max_tokens, n_ctx, n_threads, n_batch,
                     image if mmproj_path else None, flash_attn, extra_buffers)
    ours_runs: list[tuple[dict[str, Any], float]] = []
    direct_runs: list[tuple[dict[str, Any], float]] = []
    with tempfile.TemporaryDirectory(prefix="r1v-bench-generate-") as tmp:
        workdir = Path(tmp)
        for _ in range(rounds):
            ours_runs.append(_run_side("ours", {"spec": asdict(spec)}, workdir))
            first = ours_runs[0][0]
            job = {"spec": asdict(spec), "prompt": first["text"]["prompt"],
                   "n_tokens": first["text"]["completion_tokens"],
                   "image_prompt": first.get("image", {}).get("prompt")}
            direct_runs.append(_run_side("direct", job, workdir))
    ours, direct = _figures(ours_runs), _figures(direct_runs)
    if ours.prompt_tokens != direct.prompt_tokens:
        raise RuntimeError(f"the sides saw different prompts ({ours.prompt_tokens} vs {direct.prompt_tokens} tokens)")
    bandwidth = memory_bandwidth_gbps(threads=n_threads)
    per_token = weight_bytes_per_token(spec.model)
    bound = bandwidth * 1e9 / per_token

    ratios = {
        "decode_ratio": ratio(ours.decode_tokens_per_second, direct.decode_tokens_per_second),
        "prefill_ratio": ratio(ours.prefill_tokens_per_second, direct.prefill_tokens_per_second),
        "time_to_first_token_ratio": ratio(ours.time_to_first_token, direct.time_to_first_token),
        "peak_rss_ratio": ratio(ours.peak_rss_mb, direct.peak_rss_mb),
    }
    if ours.image_time_to_first_token and direct.image_time_to_first_token:
        ratios["image_time_to_first_token_ratio"] = ratio(ours.image_time_to_first_token,
                                                          direct.image_time_to_first_token)
    return {
        "model": spec.model, "mmproj": spec.mmproj, "rounds": rounds, "n_threads": n_threads,
        "flash_attn": flash_attn, "extra_buffers": asdict(choose_buffers(system_info(), extra_buffers)),
        "ours": asdict(ours), "llama_cpp_python": asdict(direct), "ratios": ratios,
        "bandwidth": {
            "memory_bandwidth_gbps": round(bandwidth, 2), "weight_bytes_per_token": per_token,
            "decode_bound_tokens_per_second": round(bound, 1),
            "ours_decode_fraction_of_bound": ratio(ours.decode_tokens_per_second, bound),
            "llama_cpp_python_decode_fraction_of_bound": ratio(direct.decode_tokens_per_second, bound),
        },
    }


def format_results(results: dict[str, Any]) -> str:
    ours, direct = results["ours"], results["llama_cpp_python"]
    rows = [
        *TIMING_ROWS,
        ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
    ]
    lines = [f"{results['model']}  ({results['rounds']} alternating rounds, medians)",
             f"llama.cpp weight buffers: {results['extra_buffers']['reason']}", "",
             f"{'':<34}{'r1v':>12}{'llama-cpp-python':>18}"]
    for title, key, fmt in rows:
        lines.append(f"{title:<34}{fmt.format(ours[key]):>12}{fmt.format(direct[key]):>18}")
    lines.append("")
    lines += [f"{key:<34}{value:>12.3f}" for key, value in results["ratios"].items()]
    bw = results["bandwidth"]
    lines.append("")
    lines.append(f"memory bandwidth {bw['memory_bandwidth_gbps']:.1f} GB/s, {bw['weight_bytes_per_token'] / 1e6:.0f} MB "
                 f"of weights per token: bound {bw['decode_bound_tokens_per_second']:.1f} tok/s; decode reaches "
                 f"{bw['ours_decode_fraction_of_bound']:.2f} (r1v) / "
                 f"{bw['llama_cpp_python_decode_fraction_of_bound']:.2f} (llama-cpp-python) of it")
    return "\n".join(lines)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
