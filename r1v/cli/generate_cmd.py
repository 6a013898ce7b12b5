"""`r1v generate MODEL --image IMG --prompt TEXT`: answer one question, streaming to the terminal.

The answer goes to stdout; the reasoning is hidden unless --show-reasoning (then dimmed on a terminal, or
between <think> and </think> when piped); a one-line timing summary goes to stderr. Flags are the
arguments of `r1v.load` (LoadOptions) and `Model.generate` (SamplingParams).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Iterable, TextIO

from r1v.cli.conventions import add_model_positional, quant_name

DIM, RESET = "\x1b[2m", "\x1b[0m"
MODEL_HELP = ("a .gguf file (mmproj found beside it), a model directory, a models.yaml name, or a Hugging Face repo "
              "id Org/Repo[:QUANT]")


def add_model_arguments(parser: argparse.ArgumentParser, ctx_aliases: tuple[str, ...] = ()) -> None:
    """MODEL and the load options (shared with `r1v chat`, `serve`, `batch`, `eval`). `ctx_aliases`: more
    spellings of --n-ctx (serve adds vLLM's --max-model-len)."""
    add_model_positional(parser, MODEL_HELP)
    load = parser.add_argument_group("loading (LoadOptions)")
    load.add_argument("--quant", type=quant_name, default=None,
                      help="GGUF quant to pick in a directory or repository (e.g. q4_k_m or Q4_K_M)")
    load.add_argument("--mmproj", default=None, help="vision projector file, when not found beside the model")
    load.add_argument("--allow-mismatched-mmproj", action="store_true", default=None,
                      help="load a projector whose provenance names another checkpoint than the model's")
    load.add_argument("--n-ctx", "-c", "--ctx-size", *ctx_aliases, dest="n_ctx", type=int, metavar="N", default=8192,
                      help="context window in tokens, prompt and output together (default %(default)s)")
    load.add_argument("--n-threads", "-t", "--threads", dest="n_threads", type=int, metavar="N", default=None,
                      help="decoding threads (default: half the CPUs)")
    load.add_argument("--n-threads-batch", "-tb", "--threads-batch", dest="n_threads_batch", type=int, metavar="N",
                      default=None, help="prompt/image threads (default: all CPUs)")
    load.add_argument("--n-batch", "-b", "--batch-size", dest="n_batch", type=int, metavar="N", default=512,
                      help="prompt tokens per llama.cpp batch")
    load.add_argument("--n-gpu-layers", "-ngl", "--gpu-layers", dest="n_gpu_layers", type=int, default=None,
                      metavar="N", help="GGUF: layers llama.cpp puts on the GPU, counting the output layer as one "
                                        "(-1: all; default 0: none); needs llama-cpp-python built with CUDA or "
                                        "Metal, `r1v plan CKPT -ngl N` shows the split")
    load.add_argument("--max-tiles", type=int, default=None, help="most 448-pixel tiles per image (default: model's)")
    load.add_argument("--image-budget", type=float, default=None, metavar="SECONDS",
                      help="time the prompt may take before the first token: images get the largest max_tiles whose "
                           "estimate fits (this machine's rates, measured once per model)")
    load.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false", default=None,
                      help="neither reuse nor store model states after images (`r1v cache ls`)")
    load.add_argument("--prefix-cache-dir", default=None,
                      help="prefix cache directory (default $R1V_PREFIX_CACHE_DIR, else ~/.cache/r1v/prefix-cache)")
    load.add_argument("--tiling", choices=("internvl", "llamacpp"), default="internvl",
                      help="image tiling: InternVL's (as trained) or libmtmd's own")
    load.add_argument("--chat-template", default=None, help="bundled template name, .jinja file or Jinja text")
    load.add_argument("--cache-dir", default=None, help="Hugging Face cache directory")
    load.add_argument("--offline", action="store_true", default=None, help="no downloads: use the cache only")
    load.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    load.add_argument("--device", default=None, help="AWQ / torch models: cuda, cuda:1 or cpu (default: CUDA if present)")
    load.add_argument("--kernel", choices=("auto", "int4", "triton", "torch", "dense"), default=None,
                      help="AWQ models: the quantized linear's kernel (dense: dequantize once at load)")
    load.add_argument("--device-memory", default=None, help="AWQ models: the card's memory budget, e.g. 24GB")
    load.add_argument("--placement", default=None, help="AWQ models: e.g. awq[vision=int4,embed=cpu]")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    sampling = parser.add_argument_group("sampling (SamplingParams; defaults: the model's, from models.yaml)")
    sampling.add_argument("--temperature", "--temp", dest="temperature", type=float, default=None,
                          help="0 = greedy")
    sampling.add_argument("--top-p", type=float, default=None)
    sampling.add_argument("--top-k", type=int, default=None)
    sampling.add_argument("--min-p", type=float, default=None)
    sampling.add_argument("--repetition-penalty", "--repeat-penalty", dest="repetition_penalty", type=float,
                          default=None)
    sampling.add_argument("--seed", "-s", dest="seed", type=int, default=None)
    sampling.add_argument("--max-tokens", "-n", "--n-predict", dest="max_tokens", type=int, default=None,
                          help="most output tokens (capped by the context)")
    sampling.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--image", action="append", default=[], metavar="IMG",
                        help="image file (repeatable; they come before the prompt, in order)")
    parser.add_argument("--prompt", "-p", default=None,
                        help="the question (default: read from stdin, up to Ctrl-D on a terminal)")
    parser.add_argument("--show-reasoning", action="store_true", help="print the reasoning, not only the answer")
    add_sampling_arguments(parser)


LOAD_FIELDS = ("quant", "mmproj", "allow_mismatched_mmproj", "n_ctx", "n_threads", "n_threads_batch", "n_batch",
               "n_gpu_layers",
               "max_tiles", "tiling", "chat_template", "cache_dir", "offline", "verbose", "image_budget", "prefix_cache",
               "prefix_cache_dir", "device", "kernel", "device_memory", "placement")
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "max_tokens", "stop")


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in LOAD_FIELDS if getattr(args, name) is not None}


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in SAMPLING_FIELDS if getattr(args, name) is not None}


class Printer:
    """Writes stream chunks: content as is; reasoning dimmed (terminal) or inside <think>...</think>."""

    def __init__(self, out: TextIO, show_reasoning: bool):
        self.out, self.show = out, show_reasoning
        self.tty = out.isatty()
        self.in_reasoning = False
        self.wrote_any = False
        self.last = ""

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.last = text
            self.wrote_any = True

    def _leave_reasoning(self) -> None:
        if self.in_reasoning:
            self._write(RESET + "\n" if self.tty else ("" if self.last.endswith("\n") else "\n") + "</think>\n\n")
            self.in_reasoning = False

    def chunk(self, text: str, kind: str) -> None:
        if kind == "reasoning":
            if not self.show or not text:
                return
            if not self.in_reasoning:
                self._write(DIM if self.tty else "<think>\n")
                self.in_reasoning = True
            self._write(text)
        else:
            self._leave_reasoning()
            self._write(text)
        self.out.flush()

    def end(self) -> None:
        self._leave_reasoning()
        if self.wrote_any and not self.last.endswith("\n"):
            self.out.write("\n")
        self.out.flush()


def print_stream(chunks: Iterable[Any], show_reasoning: bool, out: TextIO | None = None) -> Any:
    """Print a `Model.stream` (to `out`, default: the sys.stdout of the moment, not of import time); return its
    Result."""
    printer = Printer(out or sys.stdout, show_reasoning)
    result = None
    try:
        for chunk in chunks:
            printer.chunk(chunk.text, chunk.kind)
            result = chunk.result or result
    finally:
        printer.end()
    return result


def report(result: Any, show_reasoning: bool) -> None:
    print(result.summary(), file=sys.stderr)
    estimate = getattr(result, "estimated_prefill_seconds", None)
    if estimate is not None:
        tiles = ", ".join(str(i.tiles) for i in result.images)
        print(f"image budget: {tiles} tile(s); prompt estimated {estimate:.2f} s, took {result.prefill_seconds:.2f} s",
              file=sys.stderr)
    if not result.content and result.reasoning and not show_reasoning:
        print("(no answer: the model was still reasoning when it stopped; raise --max-tokens or --n-ctx, or pass "
              "--show-reasoning to see its reasoning)", file=sys.stderr)


STDIN_NOTICE = ("r1v generate: reading the question from the terminal; end it with Ctrl-D on an empty line "
                "(Ctrl-Z Enter on Windows), or pass -p TEXT")


def read_stdin_prompt() -> str:
    """The question from stdin; on a terminal, first say so: a silent wait looks like a hang."""
    if sys.stdin.isatty():
        print(STDIN_NOTICE, file=sys.stderr, flush=True)
    return sys.stdin.read()


def run(args: argparse.Namespace) -> int:
    from r1v.runtime.api import load
    from r1v.runtime.backends.llamacpp.mtmd import MtmdError

    prompt = args.prompt if args.prompt is not None else read_stdin_prompt()
    if not prompt.strip() and not args.image:
        raise ValueError("nothing to ask: give --prompt TEXT (or text on stdin) and/or --image IMG")
    try:
        with load(args.model, **load_options(args)) as model:
            if model.resolved is not None and model.resolved.note:  # which quant / projector of a repo was picked
                print(model.resolved.note, file=sys.stderr)
            stream = model.stream(prompt, images=args.image, **sampling_overrides(args))
            result = print_stream(stream, args.show_reasoning)
    except (NotImplementedError, MtmdError, RuntimeError) as e:
        print(f"r1v generate: error: {e}", file=sys.stderr)
        return 2
    report(result, args.show_reasoning)
    return 0
