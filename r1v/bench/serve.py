"""Load test of `r1v serve` on loopback: N chat requests, C in flight at a time; latency percentiles, throughput,
and the status of every answer (anything but 200 and the documented refusals 429/503 is an error).

    python -m r1v.bench.serve --tiny -n 200 -c 8               # a tiny generated GGUF, served in this process
    python -m r1v.bench.serve --model model.gguf --slots 1 --queue 8
    python -m r1v.bench.serve --url http://127.0.0.1:8000 --api-key KEY

Bounded by construction: exactly N requests, at most C open connections; the server's own slots and queue decide
how many are answered and how many refused.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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

    def summary(self) -> str:
        return (f"{self.requests} requests, {self.concurrency} concurrent: {self.ok} ok, {self.refused} refused, "
                f"{self.errors} errors | latency p50 {self.latency_p50_ms:.0f} ms, p95 {self.latency_p95_ms:.0f} ms, "
                f"max {self.latency_max_ms:.0f} ms | {self.requests_per_second:.1f} req/s, "
                f"{self.completion_tokens_per_second:.0f} output tok/s | {self.wall_seconds:.1f} s")


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
    statuses: dict[str, int] = {}
    tokens = 0
    next_request = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits) as client:
        async def worker() -> None:
            nonlocal next_request, tokens
            while next_request < n:
                next_request += 1
                start = time.perf_counter()
                try:
                    response = await client.post("/v1/chat/completions", json=body)
                    status = str(response.status_code)
                    if response.status_code == 200:
                        tokens += response.json()["usage"]["completion_tokens"]
                        latencies.append(time.perf_counter() - start)
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
        latency_max_ms=1000 * max(latencies, default=0.0))


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
    parser.add_argument("-n", "--requests", type=int, default=200)
    parser.add_argument("-c", "--concurrency", type=int, default=8)
    parser.add_argument("--slots", type=int, default=1, help="generation slots of the in-process server")
    parser.add_argument("--queue", type=int, default=8, help="queue of the in-process server")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per slot (in-process server)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--image", action="store_true", help="send a 448x448 PNG with each request")
    parser.add_argument("--prompt", default="How many red circles are in the image?")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="r1v-bench-serve-") as tmp:
        image = None
        if args.image:
            image = Path(tmp) / "image.png"
            image.write_bytes(_png())
        body = request_body(args.prompt, image, args.max_tokens)
        if args.url:
            report = run_load(args.url, body, args.requests, args.concurrency, args.api_key)
        else:
            from r1v.runtime.api import load
            from r1v.apps.serve.app import ServerConfig, ServerThread, create_app

            source = build_tiny_gguf(Path(tmp)) if args.tiny else Path(args.model)
            models = [load(source, n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads)
                      for _ in range(args.slots)]
            try:
                app = create_app(models, ServerConfig(queue=args.queue, api_key=args.api_key))
                with ServerThread(app) as url:
                    report = run_load(url, body, args.requests, args.concurrency, args.api_key)
            finally:
                for model in models:
                    model.close()
    print(json.dumps(asdict(report), indent=2) if args.json else report.summary())
    return 0 if report.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
