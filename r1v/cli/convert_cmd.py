"""`r1v convert gguf|awq CHECKPOINT -o OUTDIR ...`: one sub-command per output format."""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from r1v.cli.conventions import quant_name

# Placeholders in the commands printed after a conversion: the user's own image and question.
IMAGE, QUESTION = "IMAGE.png", "Describe the image."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from r1v.converters.gguf import LLM_QUANTS, MMPROJ_QUANTS
    from r1v.quant.imatrix import DEFAULT_IMATRIX_POSITIONS, IMATRIX_POSITIONS
    from r1v.quant.methods import DEFAULT_METHOD, METHODS

    formats = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    gguf = formats.add_parser("gguf", help="LLM + vision projector (mmproj) GGUF files for llama.cpp",
                              description="Convert a checkpoint to GGUF: the LLM at each --quant, and the mmproj.")
    gguf.add_argument("checkpoint", type=Path, help="checkpoint directory (config.json, safetensors, tokenizer)")
    gguf.add_argument("-o", "--outdir", type=Path, required=True, help="output directory (created if missing)")
    gguf.add_argument("--quant", nargs="+", type=quant_name, default=["q4_k_m"], choices=LLM_QUANTS, metavar="QUANT",
                      help=f"LLM quant type(s), in any case (Q4_K_M), several share one 16-bit intermediate: "
                           f"{', '.join(LLM_QUANTS)}")
    gguf.add_argument("--no-llm", dest="quant", action="store_const", const=[], help="only the mmproj")
    gguf.add_argument("--mmproj-quant", type=quant_name, default="f16", choices=MMPROJ_QUANTS,
                      help="vision projector type")
    gguf.add_argument("--no-mmproj", dest="mmproj_quant", action="store_const", const=None,
                      help="skip the vision projector")
    gguf.add_argument("--name", default=None, help="file name stem (default: the checkpoint directory name)")
    gguf.add_argument("--pre-tokenizer", default=None, help="llama.cpp pre-tokenizer name (default: by family)")
    gguf.add_argument("--imatrix", type=Path, default=None, help="importance matrix for low-bit types")
    gguf.add_argument("--threads", "-t", dest="threads", type=int, default=None,
                      help="threads for llama.cpp's quantizer (default: all cores)")
    gguf.add_argument("--no-progress", dest="progress", action="store_false",
                      help="no progress bars (llama.cpp's quantizer's included)")
    gguf.set_defaults(_run=run_gguf)

    awq = formats.add_parser(
        "awq", help="AWQ 4-bit checkpoint (AutoAWQ GEMM layout) for vLLM, transformers and the awq backend",
        description="Quantize the LLM to 4 bit with AWQ, one decoder layer at a time, calibrated on chat-templated "
                    "prompts with images; write safetensors shards + config.json with quantization_config. "
                    "An interrupted run resumes when rerun with the same arguments.")
    awq.add_argument("checkpoint", type=Path, help="checkpoint directory (config.json, safetensors, tokenizer)")
    awq.add_argument("-o", "--outdir", type=Path, required=True,
                     help="output checkpoint directory (must not exist, or be empty; appears when complete)")
    awq.add_argument("--calib", type=Path, default=None,
                     help='calibration JSONL: {"image": PATH, "question": ...} or {"text": ...} per line '
                          "(default: the built-in set of synthetic images, reasoning and text)")
    awq.add_argument("--group-size", type=int, default=128, help="input columns per scale/zero group")
    awq.add_argument("--vision", default="fp16", type=_vision_mode, choices=("fp16", "int4"),
                     help="vision tower: fp16, or int4 (RTN, in the AWQ layout); for int8 keep fp16 and load "
                          "with --placement 'awq[vision=int8]'")
    awq.add_argument("--n-samples", type=int, default=128, help="calibration windows")
    awq.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    awq.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS,
                     help="awq+gptq (AWQ's scale search, then GPTQ rounding; the default), awq (AutoAWQ's scale "
                          "+ clip search, rounding to nearest), gptq (GPTQ rounding alone) or rtn (plain "
                          "round-to-nearest, the baseline); every method writes the same AutoAWQ GEMM layout")
    awq.add_argument("--imatrix-out", type=Path, default=None,
                     help="also write the activation statistics as a llama.cpp imatrix (for convert gguf --imatrix)")
    awq.add_argument("--imatrix-positions", default=None, choices=IMATRIX_POSITIONS,
                     help="which positions of the calibration windows the imatrix counts: all (image tokens "
                          f"too) or text (the text tokens only); default {DEFAULT_IMATRIX_POSITIONS}, measured best "
                          "on micro-r1v")
    awq.add_argument("--device", default="cpu", help="cpu or cuda (fp16 on CUDA, fp32 on CPU)")
    awq.add_argument("--no-progress", dest="progress", action="store_false", help="no progress output")
    awq.set_defaults(_run=run_awq)
    awq.checks.append(_positions_need_an_imatrix)


def _positions_need_an_imatrix(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--imatrix-positions only says what --imatrix-out counts: alone it would do nothing, silently."""
    if args.imatrix_positions is not None and args.imatrix_out is None:
        parser.error("--imatrix-positions says which positions --imatrix-out counts: give --imatrix-out FILE too")


def _vision_mode(value: str) -> str:
    """--vision: int8 gets the reason it is refused and what to do instead (not just 'invalid choice')."""
    from r1v.converters.awq import INT8_VISION_REFUSED

    if value.lower() == "int8":
        raise argparse.ArgumentTypeError(f"int8 is {INT8_VISION_REFUSED}")
    return value.lower()


def run(args: argparse.Namespace) -> int:
    return args._run(args)


def run_awq(args: argparse.Namespace) -> int:
    from r1v.quant.driver import quantize_checkpoint_awq
    from r1v.quant.imatrix import DEFAULT_IMATRIX_POSITIONS

    result = quantize_checkpoint_awq(
        args.checkpoint, args.outdir, calib=args.calib, group_size=args.group_size, vision=args.vision,
        n_samples=args.n_samples, seq_len=args.seq_len, method=args.method, device=args.device,
        imatrix_out=args.imatrix_out, imatrix_positions=args.imatrix_positions or DEFAULT_IMATRIX_POSITIONS,
        progress=args.progress,
    )
    size = sum(f.stat().st_size for f in result.files)
    resumed = f", resumed at layer {result.resumed_from}" if result.resumed_from else ""
    print(f"{result.outdir}  ({len(result.files)} files, {size / 1e6:.1f} MB; {result.n_layers} layers{resumed})")
    if result.imatrix:
        print(f"{result.imatrix}  ({result.imatrix.stat().st_size / 1e6:.1f} MB)")
    print(next_commands_awq(result.outdir))
    return 0


def run_gguf(args: argparse.Namespace) -> int:
    from r1v.converters.gguf import convert_gguf

    result = convert_gguf(
        args.checkpoint, args.outdir, args.quant, args.mmproj_quant, name=args.name,
        pre_tokenizer=args.pre_tokenizer, imatrix=args.imatrix, threads=args.threads, progress=args.progress,
    )
    from r1v.converters.gguf_mmproj import POSITION_ORDER_NOTE

    for path in result.files:
        note = f"; {POSITION_ORDER_NOTE}" if path == result.mmproj else ""  # the llama.cpp builds it is exact for
        print(f"{path}  ({path.stat().st_size / 1e6:.1f} MB{note})")
    text = next_commands_gguf(result, args.quant[0] if args.quant else None)
    if text:
        print(text)
    return 0


def _line(*words: Any) -> str:
    return "  " + shlex.join(str(w) for w in words)


def next_commands_gguf(result: Any, quant: str | None = None) -> str | None:
    """What to run with the new files: our CLI, and llama.cpp's own multimodal CLI (--jinja: the file's chat
    template, with its forced <think>). The LLM file of `quant` (the first asked for) stands for the others;
    None when no LLM file was written."""
    if not result.llm:
        return None
    llm = result.llm.get(quant) or next(iter(result.llm.values()))
    mmproj = result.mmproj or next(iter(sorted(llm.parent.glob("mmproj-*.gguf"))), None)
    if mmproj is None:  # text only (--no-mmproj and none from an earlier run)
        return "\n".join(["next:", _line("r1v", "generate", llm, "-p", QUESTION),
                          _line("llama-cli", "-m", llm, "--jinja", "-p", QUESTION)])
    return "\n".join(["next:", _line("r1v", "generate", llm, "--image", IMAGE, "-p", QUESTION),
                      _line("llama-mtmd-cli", "-m", llm, "--mmproj", mmproj, "--jinja", "--image", IMAGE,
                            "-p", QUESTION)])


def next_commands_awq(outdir: Path) -> str:
    """What to run with a new AWQ checkpoint: our CLI, and vLLM's server (it reads the AutoAWQ GEMM layout)."""
    return "\n".join(["next:", _line("r1v", "generate", outdir, "--image", IMAGE, "-p", QUESTION),
                      _line("vllm", "serve", outdir, "--trust-remote-code")])
