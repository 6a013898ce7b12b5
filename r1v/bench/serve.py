"""Load test of `r1v serve` on loopback: N chat requests, C in flight at a time; latency percentiles, throughput,
and the status of every answer (anything but 200 and the documented refusals 429/503 is an error).

    python -m r1v.bench.serve --tiny -n 200 -c 8               # a tiny generated GGUF, served in this process
    python -m r1v.bench.serve --model model.gguf --slots 4 --queue 8    # one copy, 4 sequences (as r1v serve)
    python -m r1v.bench.serve --model model.gguf --slots 4 --copies     # 4 copies, one request each (before)
    python -m r1v.bench.serve --url http://127.0.0.1:8000 --api-key KEY
    python -m r1v.bench.serve --big /tmp/big --sweep 1,2,4,8   # batching vs copies at 1, 2, 4, 8 clients

Bounded by construction: exactly N requests, at most C open connections; the server's own slots and queue decide
how many are answered and how many refused.

`--sweep`: for each client count C and each way of serving C at once - "batched" (one model copy loaded with
parallel=C: continuous batching, one forward per token for all streams) and "copies" (C copies, each generating one
request at a time, as `r1v serve` did before) - a server with C slots and no queue in a child process, C clients
sending `--rounds` x C greedy requests; one table: output tokens/s of all clients together, its ratio to one
client, latency p50/p95, and the child's peak RSS (weights, KV caches, the server and the load test). Both ways
get the same CPU threads (`--threads`, default all): the batched copy uses them all, each of C copies its share.
`--big DIR`: a generated model large enough that decode is memory-bound (random weights, hidden 2048, 16 layers,
Q4_K_M ~0.52 GB), built into DIR on first use (~80 s).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

REFUSALS = (429, 503)


@dataclass(frozen=True)
class LoadReport:
    requests: int
    concurrency: int
    ok: int
    refused: int  # 429 / 503: the server's documented answer beyond capacity
    errors: int  # anything else (should be 0)
    statuses: dict[str, int]
    wall_seconds: float
    requests_per_second: float  # answered (200) requests per second of wall time
    completion_tokens_per_second: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_max_ms: float
    first_token_p50_ms: float  # from sending the request to its first token (the answer's `timings`; else 0)
    stream_decode_tokens_per_second: float  # median over requests: tokens after the first / first to last token

    def summary(self) -> str:
        return (f"{self.requests} requests, {self.concurrency} concurrent: {self.ok} ok, {self.refused} refused, "
                f"{self.errors} errors | latency p50 {self.latency_p50_ms:.0f} ms, p95 {self.latency_p95_ms:.0f} ms, "
                f"max {self.latency_max_ms:.0f} ms, first token p50 {self.first_token_p50_ms:.0f} ms | "
                f"{self.requests_per_second:.1f} req/s, {self.completion_tokens_per_second:.0f} output tok/s, "
                f"{self.stream_decode_tokens_per_second:.1f} decode tok/s per stream | {self.wall_seconds:.1f} s")


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def _load(url: str, body: dict[str, Any], n: int, concurrency: int, api_key: str | None,
                timeout: float) -> LoadReport:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    latencies: list[float] = []
    first_tokens: list[float] = []
    decode_rates: list[float] = []
    statuses: dict[str, int] = {}
    tokens = 0
    next_request = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits) as client:
        async def request() -> str:
            """One request; its figures appended when answered (decode figures from llama-server's `timings`,
            which `r1v serve` sends too: streamed text would say little, it is released in uneven pieces)."""
            nonlocal tokens
            start = time.perf_counter()
            response = await client.post("/v1/chat/completions", json=body)
            if response.status_code != 200:
                return str(response.status_code)
            latency = time.perf_counter() - start
            answer = response.json()
            tokens += answer["usage"]["completion_tokens"]
            latencies.append(latency)
            figures = answer.get("timings") or {}
            if figures.get("predicted_n"):
                first_tokens.append(latency - figures["predicted_ms"] / 1000)
                decode_rates.append(figures["predicted_per_second"])
            return "200"

        async def worker() -> None:
            nonlocal next_request
            while next_request < n:
                next_request += 1
                try:
                    status = await request()
                except httpx.HTTPError as e:
                    status = type(e).__name__
                statuses[status] = statuses.get(status, 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ok = statuses.get("200", 0)
    refused = sum(statuses.get(str(s), 0) for s in REFUSALS)
    return LoadReport(
        requests=n, concurrency=concurrency, ok=ok, refused=refused, errors=n - ok - refused, statuses=statuses,
        wall_seconds=wall, requests_per_second=ok / wall, completion_tokens_per_second=tokens / wall,
        latency_p50_ms=1000 * _percentile(latencies, 0.50), latency_p95_ms=1000 * _percentile(latencies, 0.95),
        latency_max_ms=1000 * max(latencies, default=0.0), first_token_p50_ms=1000 * _percentile(first_tokens, 0.50),
        stream_decode_tokens_per_second=_percentile(decode_rates, 0.50))


def request_body(prompt: str, image: Path | None, max_tokens: int) -> dict[str, Any]:
    """A greedy chat request (the same work each time), with the image inline as a data: URL."""
    content: list[dict[str, Any]] = []
    if image is not None:
        encoded = base64.b64encode(image.read_bytes()).decode()
        content.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encoded}"}})
    content.append({"type": "text", "text": prompt})
    return {"model": "r1v", "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": max_tokens}


def run_load(url: str, body: dict[str, Any], n: int = 200, concurrency: int = 8, api_key: str | None = None,
             timeout: float = 600.0) -> LoadReport:
    return asyncio.run(_load(url, body, n, concurrency, api_key, timeout))


def build_tiny_gguf(root: Path) -> Path:
    """A tiny R1V-layout checkpoint converted to F16 GGUF (+ mmproj beside it); returns the LLM file."""
    from r1v.converters.gguf import convert_gguf
    from r1v.testing import make_tiny_checkpoint

    sizes = dict(llm_hidden=256, llm_intermediate=512, llm_layers=3, llm_heads=4, llm_kv_heads=2,
                 vit_hidden=64, vit_intermediate=128, vit_heads=4, vit_layers=2)
    ckpt = make_tiny_checkpoint(root / "tiny-r1v", vit="300m", seed=8, dtype="f32", **sizes)
    return convert_gguf(ckpt, root / "gguf", quant=["f16"], mmproj_quant="f16", progress=False).llm["f16"]


BIG_SIZES: dict[str, Any] = dict(llm_hidden=2048, llm_intermediate=5632, llm_layers=16, llm_heads=16, llm_kv_heads=4,
                                 padded_vocab=32000)


def build_big_gguf(root: Path) -> Path:
    """The sweep's model: an R1V-layout checkpoint with random weights and a 2048-wide, 16-layer LLM at Q4_K_M
    (~0.52 GB: decoding reads all of it per step, memory-bound on a CPU), built into `root` once and reused."""
    out = root / "gguf"
    made = sorted(p for p in out.glob("*-q4_k_m.gguf") if not p.name.startswith("mmproj"))
    if made:
        return made[0]
    from r1v.converters.gguf import convert_gguf
    from r1v.testing import make_tiny_checkpoint

    ckpt = root / "big-r1v"
    if not (ckpt / "config.json").is_file():
        make_tiny_checkpoint(ckpt, vit="300m", seed=0, dtype="bf16", max_shard_bytes=2**30, **BIG_SIZES)
    return convert_gguf(ckpt, out, quant=["q4_k_m"], mmproj_quant="f16", progress=False).llm["q4_k_m"]


Mode = Literal["batched", "copies"]


@dataclass(frozen=True)
class SweepRow:
    mode: Mode
    clients: int
    threads_per_copy: int
    report: LoadReport
    peak_rss_mb: float


def _load_models(source: Path, slots: int, copies: bool, threads: int, n_ctx: int) -> list[Any]:
    """The slots' models: one copy with `slots` sequences given to every slot, or `slots` copies with a share of
    the threads each."""
    from r1v.runtime.api import load

    if not copies:
        model = load(source, n_ctx=n_ctx, parallel=slots, n_threads=threads, n_threads_batch=threads)
        return [model] * slots
    each = max(1, threads // slots)
    models: list[Any] = []
    try:
        for _ in range(slots):
            models.append(load(source, n_ctx=n_ctx, n_threads=each, n_threads_batch=each))
    except BaseException:
        for model in models:
            model.close()
        raise
    return models


def sweep(source: Path, clients: Sequence[int] = (1, 2, 4, 8), modes: Sequence[Mode] = ("batched", "copies"),
          rounds: int = 2, max_tokens: int = 32, threads: int | None = None, n_ctx: int = 1024,
          prompt: str = "Describe a cat.", workdir: Path | None = None) -> list[SweepRow]:
    """Each (mode, client count) served and loaded in its own child process (`run_measured`: its own peak RSS)."""
    from r1v.bench.measure import run_measured

    threads = threads or len(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory(prefix="r1v-bench-sweep-", dir=workdir) as tmp:
        for mode in modes:
            for c in clients:
                out = Path(tmp) / f"{mode}-{c}.json"
                cmd = [sys.executable, "-m", "r1v.bench.serve", "--model", str(source), "--slots", str(c),
                       "--queue", "0", "-c", str(c), "-n", str(rounds * c), "--max-tokens", str(max_tokens),
                       "--threads", str(threads), "--n-ctx", str(n_ctx), "--prompt", prompt, "--out", str(out)]
                _, rss = run_measured(cmd + (["--copies"] if mode == "copies" else []))
                report = LoadReport(**json.loads(out.read_text()))
                rows.append(SweepRow(mode, c, threads if mode == "batched" else max(1, threads // c), report, rss))
                print(f"{mode:8s} {c} clients: {report.summary()} | peak RSS {rss:.0f} MB", file=sys.stderr,
                      flush=True)
    return rows


def sweep_table(rows: Sequence[SweepRow]) -> str:
    """A Markdown table of a sweep. Decode tok/s of all streams: clients x the median request's decode rate (tokens
    after the first over first to last token); output tok/s: all answers' tokens over the wall time (prefills and
    HTTP included); "x 1": over the same mode's one-client figure."""
    def decode(r: SweepRow) -> float:
        return r.clients * r.report.stream_decode_tokens_per_second

    single = {r.mode: r for r in rows if r.clients == 1}
    lines = ["| serving | clients | threads per copy | decode tok/s (all streams) | x 1 | output tok/s (wall) | x 1 | "
             "first token p50 s | latency p50 s | p95 s | peak RSS MB | answered |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = single.get(r.mode)
        times = [f"{a / b:.2f}" if base and b else "-" for a, b in (
            (decode(r), decode(base) if base else 0), (r.report.completion_tokens_per_second,
                                                       base.report.completion_tokens_per_second if base else 0))]
        lines.append(f"| {r.mode} | {r.clients} | {r.threads_per_copy} | {decode(r):.1f} | {times[0]} | "
                     f"{r.report.completion_tokens_per_second:.1f} | {times[1]} | "
                     f"{r.report.first_token_p50_ms / 1000:.2f} | {r.report.latency_p50_ms / 1000:.1f} | "
                     f"{r.report.latency_p95_ms / 1000:.1f} | {r.peak_rss_mb:.0f} | {r.report.ok}/{r.report.requests} |")
    return "\n".join(lines)


def _png(size: int = 448) -> bytes:
    from PIL import Image

    from r1v.testing.images import pattern_pixels

    buffer = io.BytesIO()
    Image.fromarray(pattern_pixels(size, size, noise=0)).save(buffer, format="PNG")
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r1v.bench.serve", description=__doc__.split("\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server")
    target.add_argument("--model", help="serve this model in this process")
    target.add_argument("--tiny", action="store_true", help="serve a tiny generated GGUF in this process")
    target.add_argument("--big", metavar="DIR", help="serve the sweep's generated 0.5 GB model (built in DIR once)")
    parser.add_argument("-n", "--requests", type=int, default=200)
    parser.add_argument("-c", "--concurrency", type=int, default=8)
    parser.add_argument("--slots", type=int, default=1, help="generation slots of the in-process server")
    parser.add_argument("--copies", action="store_true",
                        help="one model copy per slot (each generating one request at a time) instead of one copy "
                             "with a sequence per slot (continuous batching, as r1v serve)")
    parser.add_argument("--queue", type=int, default=8, help="queue of the in-process server")
    parser.add_argument("--threads", type=int, default=None,
                        help="llama.cpp threads of the in-process server, shared among --copies (default: all CPUs)")
    parser.add_argument("--n-ctx", type=int, default=2048, help="context window of each slot")
    parser.add_argument("--sweep", metavar="C,C,...",
                        help="batched vs copies at these client counts (e.g. 1,2,4,8), each in a child process")
    parser.add_argument("--rounds", type=int, default=2, help="sweep: requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--image", action="store_true", help="send a 448x448 PNG with each request")
    parser.add_argument("--prompt", default="How many red circles are in the image?")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the report as JSON to this file")
    args = parser.parse_args(argv)

    if args.sweep:
        if args.url:
            parser.error("--sweep serves the model itself: give --model, --big or --tiny")
        clients = [int(c) for c in args.sweep.split(",")]
        with tempfile.TemporaryDirectory(prefix="r1v-bench-serve-") as tmp:
            source = build_tiny_gguf(Path(tmp)) if args.tiny else \
                build_big_gguf(Path(args.big)) if args.big else Path(args.model)
            rows = sweep(source, clients, rounds=args.rounds, max_tokens=args.max_tokens, threads=args.threads,
                         n_ctx=args.n_ctx, prompt=args.prompt)
        print(json.dumps([asdict(r) for r in rows], indent=2) if args.json else sweep_table(rows))
        return 0 if all(r.report.errors == 0 for r in rows) else 1
    with tempfile.TemporaryDirectory(prefix="r1v-bench-serve-") as tmp:
        image = None
        if args.image:
            image = Path(tmp) / "image.png"
            image.write_bytes(_png())
        body = request_body(args.prompt, image, args.max_tokens)
        if args.url:
            report = run_load(args.url, body, args.requests, args.concurrency, args.api_key)
        else:
            from r1v.apps.serve.app import ServerConfig, ServerThread, create_app

            source = build_tiny_gguf(Path(tmp)) if args.tiny else \
                build_big_gguf(Path(args.big)) if args.big else Path(args.model)
            threads = args.threads or len(os.sched_getaffinity(0))
            models = _load_models(source, args.slots, args.copies, threads, args.n_ctx)
            try:
                app = create_app(models, ServerConfig(queue=args.queue, api_key=args.api_key))
                with ServerThread(app) as url:
                    report = run_load(url, body, args.requests, args.concurrency, args.api_key)
            finally:
                for model in {id(m): m for m in models}.values():
                    model.close()
    if args.out:
        args.out.write_text(json.dumps(asdict(report)))
    print(json.dumps(asdict(report), indent=2) if args.json else report.summary())
    return 0 if report.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
