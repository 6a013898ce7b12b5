"""`r1v train-micro -o DIR [--minutes M] [--seed S]`: train micro-r1v on CPU, write its checkpoint."""
from __future__ import annotations

import argparse

from dataclasses import asdict

from r1v.micro.settings import TrainConfig

D = asdict(TrainConfig())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True, help="checkpoint directory to write")
    parser.add_argument("--minutes", type=float, default=D["minutes"],
                        help="wall-time cap of the training loop (default %(default)g); "
                             "a run that reaches it stops early and still writes its checkpoint")
    parser.add_argument("--seed", type=int, default=D["seed"], help="initialisation and data seed")
    parser.add_argument("--steps", type=int, default=D["steps"],
                        help=f"optimizer steps (default {D['steps']}, ~60 min on 2 cores); the schedule spans them")
    parser.add_argument("--scenes", type=int, default=D["scenes"], help="scenes (images) per step")
    parser.add_argument("--questions", type=int, default=D["questions"],
                        help="questions per scene (the image is encoded once for all of them)")
    parser.add_argument("--curriculum-steps", type=int, default=D["curriculum_steps"],
                        help="steps over which the training rows go from one colour to the task's own mixture "
                             "(0: no curriculum) (default %(default)s)")
    parser.add_argument("--lr", type=float, default=D["lr"], help="peak learning rate")
    parser.add_argument("--threads", type=int, default=D["threads"], help="torch CPU threads")
    parser.add_argument("--init", default=None, metavar="DIR",
                        help="start from this checkpoint's weights (same sizes) instead of a fresh initialisation")
    parser.add_argument("--probe-every", type=int, default=D["probe_every"],
                        help="greedy accuracy on a few validation items every N steps while training (0: none)")
    parser.add_argument("--probe-items", type=int, default=D["probe_items"],
                        help="validation items each probe scores (default %(default)s)")
    parser.add_argument("--eval-items", type=int, default=D["eval_items"],
                        help="validation items to score greedily after training (0: skip)")


def run(args: argparse.Namespace) -> int:
    from r1v.micro.train import TrainConfig, train

    cfg = TrainConfig(steps=args.steps, scenes=args.scenes, questions=args.questions,
                      curriculum_steps=args.curriculum_steps, lr=args.lr, seed=args.seed,
                      minutes=args.minutes, threads=args.threads, eval_items=args.eval_items,
                      probe_every=args.probe_every, probe_items=args.probe_items,
                      init=args.init)
    train(args.output, cfg, log=lambda line: print(line, flush=True))
    return 0
