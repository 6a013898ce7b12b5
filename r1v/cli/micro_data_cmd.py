"""`r1v micro-data --seed S -n N -o FILE.jsonl`: items of the micro-r1v task, images beside the file."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the first item; items use seed .. seed+N-1 (default: start of the "
                             "--split range)")
    parser.add_argument("--split", choices=("train", "validation", "test"), default="test",
                        help="seed range the default --seed starts from, and --seed is checked against")
    parser.add_argument("-n", type=int, default=200, help="number of items (default %(default)s)")
    parser.add_argument("-o", "--output", required=True, help="JSONL file to write; PNGs go to <stem>_images/")


def run(args: argparse.Namespace) -> int:
    from r1v.micro.task import SPLITS, split_of, write_items

    if args.n < 1:
        raise ValueError(f"-n must be at least 1, got {args.n}")
    start, stop = SPLITS[args.split]
    seed = start if args.seed is None else args.seed
    if args.seed is not None and not (start <= seed and seed + args.n <= stop):
        raise ValueError(f"seeds {seed}..{seed + args.n - 1} are not all in the {args.split} split "
                         f"[{start}, {stop}); pass --split {split_of(seed) if seed >= 0 else 'train'}")
    path = write_items(seed, args.n, args.output)
    print(f"wrote {args.n} {args.split} items (seeds {seed}..{seed + args.n - 1}) to {path}")
    return 0
