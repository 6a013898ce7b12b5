"""`r1v demo`: the main job on the bundled default model — micro-r1v, trained here on a visual reasoning
task — answering the bundled question about the bundled image, with its reasoning and timings.

The first run builds the model's files from the shipped checkpoint (GGUF: seconds; AWQ: minutes on a CPU, with
a progress bar); no download."""
from __future__ import annotations

import argparse

from r1v.cli.conventions import quant_name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quant", type=quant_name, default="q8_0", choices=("f16", "q8_0", "q4_k_m", "awq"),
                        help="GGUF type to run (any case: Q4_K_M), or awq (4-bit AWQ on the torch path)")
    parser.add_argument("--image", default=None, help="another image (default: the bundled one)")
    parser.add_argument("--prompt", "-p", default=None, help="another question (default: the bundled one)")
    parser.add_argument("--hide-reasoning", dest="show_reasoning", action="store_false",
                        help="print only the answer")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="build the model's files on first use without progress output")


def run(args: argparse.Namespace) -> int:
    from r1v.cli.generate_cmd import print_stream, report
    from r1v.micro import NAME, demo_image_path, demo_question
    from r1v.micro.files import micro_model
    from r1v.runtime.api import load
    from r1v.runtime.reasoning import final_answer

    bundled = demo_question()
    image = args.image or str(demo_image_path())
    question = args.prompt or bundled["question"]
    micro_model(args.quant, progress=args.progress)  # first use: built here, with progress unless --no-progress
    print(f"model: {NAME} ({args.quant})\nimage: {image}\nquestion: {question}\n")
    with load(NAME, quant=args.quant) as model:
        result = print_stream(model.stream(question, images=[image], temperature=0), args.show_reasoning)
    report(result, args.show_reasoning)
    if question == bundled["question"] and image == str(demo_image_path()):
        answer = final_answer(result.text)
        verdict = "correct" if answer == bundled["answer"] else "wrong"
        print(f"\nexpected answer: {bundled['answer']} (the model said {answer!r}: {verdict})")
    return 0
