"""`r1v cache ls|clear`: the prefix cache on disk (llama.cpp states after prompts with images).

Entries are written by `r1v.load(...)` models (LoadOptions.prefix_cache, on by default) and reused by later
questions about the same images, in any process; see `r1v.runtime.backends.llamacpp.prefix_cache`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    jobs = parser.add_subparsers(dest="job", metavar="JOB", required=True)
    ls = jobs.add_parser("ls", help="list the entries, most recently used first",
                         description="List the prefix cache's entries, most recently used first.")
    clear = jobs.add_parser("clear", help="remove every entry", description="Remove every prefix cache entry.")
    for job in (ls, clear):
        job.add_argument("--dir", type=Path, default=None,
                         help="cache directory (default $R1V_PREFIX_CACHE_DIR, else ~/.cache/r1v/prefix-cache)")
    ls.add_argument("--json", action="store_true", help="print JSON for scripts")
    clear.add_argument("--rates", action="store_true",
                       help="also forget the measured encode/prefill rates of the tile budget")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def run(args: argparse.Namespace) -> int:
    from r1v.runtime.backends.llamacpp.prefix_cache import PrefixStore, default_cache_dir
    from r1v.runtime.backends.llamacpp.tile_budget import RATES_FILE, RateStore

    directory = args.dir or default_cache_dir()
    store = PrefixStore(directory)
    if args.job == "clear":
        n, size = store.clear()
        rates = RateStore(directory / RATES_FILE).clear() if args.rates else False
        print(f"removed {n} entr{'y' if n == 1 else 'ies'} ({_size(size)}) from {directory}"
              + ("; forgot the measured rates" if rates else ""))
        return 0
    entries = store.entries()
    rows = [{"key": e.key, "bytes": e.size, "last_used": e.last_used, "created": e.created,
             "model": e.meta.get("model"), "mmproj": e.meta.get("mmproj"), "positions": e.meta.get("positions"),
             "images": e.meta.get("images"), **({"error": e.meta["error"]} if "error" in e.meta else {})}
            for e in entries]
    total = sum(e.size for e in entries)
    if args.json:
        print(json.dumps({"directory": str(directory), "total_bytes": total, "entries": rows,
                          "rates_file": str(directory / RATES_FILE) if (directory / RATES_FILE).is_file() else None},
                         indent=2))
        return 0
    print(f"{directory}: {len(rows)} entr{'y' if len(rows) == 1 else 'ies'}, {_size(total)}")
    if rows:
        print(f"{'key':<14}{'size':>10}  {'last used':<17}{'positions':>10}{'images':>7}  model / mmproj")
    for r in rows:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["last_used"]))
        model = r.get("error") or f"{r['model']} / {r['mmproj']}"
        print(f"{r['key'][:12]:<14}{_size(r['bytes']):>10}  {used:<17}{r['positions'] or '-':>10}"
              f"{r['images'] or '-':>7}  {model}")
    return 0
