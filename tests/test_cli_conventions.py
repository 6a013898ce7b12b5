"""The command line people expect (issue 19): llama.cpp / vLLM spellings land in the same fields as the long
names, quant names in any case, an example and the defaults in every --help, bare `r1v`, GPU offload reaching
llama.cpp's model parameters and `r1v plan`'s split, the commands printed after a conversion, eval's report
names and conflicts, and the notices of first-use builds and of reading stdin."""
from __future__ import annotations

import argparse
import json
import logging
import os
import pty
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from r1v.cli import COMMANDS, build_parser, main
from r1v.cli.conventions import _NO_DEFAULT_SHOWN, format_default, subparsers
from r1v.cli.examples import EXAMPLES

REPO = Path(__file__).resolve().parents[1]
R1V3_CONFIG = REPO / "tests" / "data" / "r1v3-38b-config.json"


def parse(line: str) -> argparse.Namespace:
    return build_parser().parse_args(shlex.split(line))


def same(a: str, b: str) -> None:
    assert vars(parse(a)) == vars(parse(b))


# --- item 5: aliases, MODEL as -m, quant names, help --------------------------------------------------------
@pytest.mark.parametrize("alias, canonical", [
    ("generate -m m.gguf -p hi", "generate m.gguf --prompt hi"),
    ("generate m.gguf -c 4096 -t 3 -tb 5 -b 256 -n 99 --temp 0.2 -s 7 --repeat-penalty 1.1 -ngl 12",
     "generate m.gguf --n-ctx 4096 --n-threads 3 --n-threads-batch 5 --n-batch 256 --max-tokens 99 "
     "--temperature 0.2 --seed 7 --repetition-penalty 1.1 --n-gpu-layers 12"),
    ("generate m.gguf --ctx-size 4096 --threads 3 --n-predict 99 --gpu-layers -1",
     "generate m.gguf --n-ctx 4096 --n-threads 3 --max-tokens 99 --n-gpu-layers -1"),
    ("chat -m m.gguf -c 2048 --temp 0", "chat m.gguf --n-ctx 2048 --temperature 0"),
    ("serve -m m.gguf -np 3 --max-model-len 32768 -a r1v3", "serve m.gguf --max-concurrency 3 --n-ctx 32768 "
                                                            "--served-model-name r1v3"),
    ("serve m.gguf --parallel 2", "serve m.gguf --max-concurrency 2"),
    ("serve m.gguf --max-num-seqs 2 -c 1024", "serve m.gguf --max-concurrency 2 --n-ctx 1024"),
    ("batch -m m.gguf in.jsonl out.jsonl -n 5", "batch m.gguf in.jsonl out.jsonl --max-tokens 5"),
    ("batch in.jsonl -m m.gguf out.jsonl", "batch m.gguf in.jsonl out.jsonl"),
    ("eval -m m.gguf d.jsonl -n 32 -t 1", "eval m.gguf d.jsonl --max-tokens 32 --n-threads 1"),
    ("bench generate -m m.gguf -c 2048 -t 2 -n 16 -b 64", "bench generate m.gguf --n-ctx 2048 --n-threads 2 "
                                                          "--max-tokens 16 --n-batch 64"),
    ("plan ckpt -c 4096 -ngl 20", "plan ckpt --context 4096 --n-gpu-layers 20"),
    ("convert gguf ckpt -o out -t 4", "convert gguf ckpt -o out --threads 4"),
])
def test_aliases_parse_to_the_long_names(alias: str, canonical: str) -> None:
    same(alias, canonical)


def test_aliases_land_in_the_python_argument_names() -> None:
    from r1v.cli.generate_cmd import load_options, sampling_overrides

    args = parse("generate -m m.gguf -c 4096 -t 3 -n 99 --temp 0.2 -ngl 12 --quant Q4_K_M")
    assert args.model == "m.gguf"
    assert load_options(args) == {"quant": "q4_k_m", "n_ctx": 4096, "n_threads": 3, "n_batch": 512,
                                  "n_gpu_layers": 12, "tiling": "internvl", "verbose": False}
    assert sampling_overrides(args) == {"temperature": 0.2, "max_tokens": 99}


def test_model_given_once(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse("generate a.gguf -m b.gguf")
    assert e.value.code == 2
    assert "MODEL given twice ('a.gguf' and -m 'b.gguf'): give it once" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        parse("generate -p hi")
    assert e.value.code == 2
    assert "the following arguments are required: MODEL (or -m MODEL)" in capsys.readouterr().err


README_EVAL = "eval micro-r1v --quant q4_k_m test/test.jsonl --reference micro-r1v --reference-quant f16"


@pytest.mark.parametrize("line", [README_EVAL, README_EVAL.replace("eval micro-r1v", "eval -m micro-r1v")])
def test_the_readme_eval_line_parses(line: str) -> None:
    """README's line failed with 'required: MODEL': argparse gave the first chunk of positionals (micro-r1v
    alone, before --quant) to DATA, since MODEL is optional there to let -m stand in for it."""
    args = parse(line)
    assert (args.model, args.data, args.quant, args.reference, args.reference_quant) == \
        ("micro-r1v", "test/test.jsonl", "q4_k_m", "micro-r1v", "f16")


@pytest.mark.parametrize("mixed, plain", [
    ("eval m.gguf --quant q4_k_m d.jsonl", "eval m.gguf d.jsonl --quant q4_k_m"),
    ("eval --limit 2 m.gguf -n 5 d.jsonl --force", "eval m.gguf d.jsonl --limit 2 --max-tokens 5 --force"),
    ("eval d.jsonl --limit 2 -m m.gguf", "eval m.gguf d.jsonl --limit 2"),
    ("eval --limit 2 -m m.gguf d.jsonl --json", "eval m.gguf d.jsonl --limit 2 --json"),
    ("batch m.gguf --quant f16 in.jsonl out.jsonl", "batch m.gguf in.jsonl out.jsonl --quant f16"),
    ("batch m.gguf in.jsonl --stream out.jsonl -n 5", "batch m.gguf in.jsonl out.jsonl --stream --max-tokens 5"),
    ("batch --stream m.gguf -c 2048 in.jsonl -n 5 out.jsonl --no-progress",
     "batch m.gguf in.jsonl out.jsonl --stream --n-ctx 2048 --max-tokens 5 --no-progress"),
    ("batch in.jsonl --stream -m m.gguf out.jsonl", "batch m.gguf in.jsonl out.jsonl --stream"),
    ("batch --stream in.jsonl out.jsonl -m m.gguf", "batch m.gguf in.jsonl out.jsonl --stream"),
    ("generate -p hi m.gguf -n 4", "generate m.gguf --prompt hi --max-tokens 4"),
    ("bench generate --rounds 2 m.gguf --quant q8_0", "bench generate m.gguf --rounds 2 --quant q8_0"),
    # after `--` every word is positional (argparse's own intermixed parsing lost the `--` before Python 3.13)
    ("generate -p hi -- m.gguf", "generate m.gguf --prompt hi"),
    ("eval m.gguf --limit 2 -- d.jsonl", "eval m.gguf d.jsonl --limit 2"),
    ("batch -m m.gguf --stream in.jsonl -- out.jsonl", "batch m.gguf in.jsonl out.jsonl --stream"),
])
def test_options_between_and_after_the_positionals(mixed: str, plain: str) -> None:
    same(mixed, plain)
    args = parse(mixed)
    assert args.model == "m.gguf"
    if args.command == "eval":
        assert args.data == "d.jsonl"
    if args.command == "batch":
        assert (args.input, args.output) == ("in.jsonl", "out.jsonl")


@pytest.mark.parametrize("line, error", [
    ("eval a.gguf --limit 2 d.jsonl -m b.gguf", "MODEL given twice ('a.gguf' and -m 'b.gguf'): give it once"),
    ("eval -m b.gguf a.gguf d.jsonl", "MODEL given twice ('a.gguf' and -m 'b.gguf'): give it once"),
    ("batch a.gguf --stream in.jsonl out.jsonl -m b.gguf",
     "MODEL given twice ('a.gguf' and -m 'b.gguf'): give it once"),
    ("eval --limit 2 d.jsonl", "the following arguments are required: MODEL (or -m MODEL)"),
    ("batch in.jsonl --stream out.jsonl", "the following arguments are required: MODEL (or -m MODEL)"),
    ("eval --limit 2", "the following arguments are required: data"),
    ("batch -m m.gguf --stream in.jsonl", "the following arguments are required: output"),
    ("eval m.gguf --limit 2 d.jsonl extra.jsonl", "unrecognized arguments: extra.jsonl"),
    ("eval m.gguf -o r.json d.jsonl -m", "argument -m/--model: expected one argument"),
    ("generate -- m.gguf -p hi", "unrecognized arguments: -p hi"),
])
def test_model_errors_with_options_between_the_positionals(line: str, error: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse(line)
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {error}")


def test_quant_names_in_any_case(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse("convert gguf ckpt -o out --quant Q4_K_M Q8_0 --mmproj-quant F16").quant == ["q4_k_m", "q8_0"]
    assert parse("convert gguf ckpt -o out --mmproj-quant Q8_0").mmproj_quant == "q8_0"
    assert parse("demo --quant Q4_K_M").quant == "q4_k_m"
    assert parse("demo --quant AWQ").quant == "awq"
    assert parse("generate m --quant Q5_K_M").quant == "q5_k_m"
    assert parse("eval m d.jsonl --quant Q4_K_M --reference r --reference-quant F16").reference_quant == "f16"
    assert parse("bench generate m --quant IQ4_XS").quant == "iq4_xs"
    assert parse("plan ckpt --quant Q4_K_M").quant == "q4_k_m"
    with pytest.raises(SystemExit):
        parse("convert gguf ckpt -o out --quant Q9_K")
    assert "argument --quant: invalid choice: 'q9_k'" in capsys.readouterr().err


def test_plan_takes_an_uppercase_quant(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(R1V3_CONFIG), "--quant", "Q4_K_M"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("gguf.llm.")]
    assert rows == ["gguf.llm.Q4_K_M"]
    assert main(["plan", str(R1V3_CONFIG), "--quant", "IQ2_XS"]) == 2
    assert capsys.readouterr().err.strip() == ("r1v plan: error: --quant iq2_xs: the plan knows the GGUF types "
                                               "f16, q8_0, q6_k, q5_k_m, q4_k_m")


def _parsers(parser: argparse.ArgumentParser, path: str = ""):
    yield path, parser
    for name, sub in subparsers(parser).items():
        yield from _parsers(sub, f"{path} {name}".strip())


ALL_PARSERS = dict(_parsers(build_parser()))


def test_every_command_has_examples_in_its_help() -> None:
    assert set(COMMANDS) <= set(ALL_PARSERS)
    for path, parser in ALL_PARSERS.items():
        text = parser.format_help()
        assert "\nexample:\n  r1v " in text or "\nexamples:\n  r1v " in text, f"r1v {path} --help has no example"


@pytest.mark.parametrize("path, line", [(p, line) for p, lines in EXAMPLES.items() for line in lines])
def test_every_example_parses(path: str, line: str) -> None:
    line = line.split("| ")[-1]  # `echo ... | r1v generate ...`
    words = shlex.split(line)
    assert words[0] == "r1v" and path in ALL_PARSERS, line
    if "COMMAND" in words:
        return
    args = build_parser().parse_args(words[1:])
    assert " ".join(words[1:]).startswith(path), f"example of `r1v {path}` runs another command: {line}"
    assert args.command == words[1]


def test_every_help_shows_the_defaults() -> None:
    missing = []
    for path, parser in ALL_PARSERS.items():
        text = " ".join(parser.format_help().split())  # undo the wrapping
        for action in parser._actions:
            if isinstance(action, _NO_DEFAULT_SHOWN) or action.default in (None, argparse.SUPPRESS, []):
                continue
            if not action.option_strings and action.nargs not in ("?", "*"):
                continue
            shown = format_default(action.default)
            said = {f"default {shown}", f"default: {shown}"}
            if isinstance(action.default, float):
                said.add(f"default {action.default:g}")  # (default %(default)g)
            if not any(s in text for s in said):
                missing.append(f"r1v {path} {action.option_strings[0]} (default {shown})")
    assert not missing, missing


def test_help_excerpt() -> None:
    text = ALL_PARSERS["generate"].format_help()
    assert "--n-ctx N, -c N, --ctx-size N" in text
    assert "--max-tokens MAX_TOKENS, -n MAX_TOKENS, --n-predict MAX_TOKENS" in text
    assert "(default 8192)" in " ".join(text.split())
    serve = " ".join(ALL_PARSERS["serve"].format_help().split())
    assert "--max-concurrency N, -np N, --parallel N, --max-num-seqs N" in serve
    assert "--n-ctx N, -c N, --ctx-size N, --max-model-len N" in serve
    assert "(default: 8000)" in serve and "(default: 1)" in serve


def test_bare_r1v_prints_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("usage: r1v [-h] [--version] COMMAND ...")
    assert all(f"    {name}" in out.out for name in COMMANDS)
    assert "examples:\n  r1v demo\n" in out.out
    assert out.err == ""
    run = subprocess.run([sys.executable, "-m", "r1v"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0 and run.stdout == out.out


# --- item 6: n_gpu_layers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def micro_q8() -> Path:
    from r1v.micro.files import micro_gguf

    return micro_gguf("q8_0", progress=False)


def test_n_gpu_layers_reaches_llama_model_params(micro_q8: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    from llama_cpp import llama_cpp as ll

    from r1v.runtime.api import load
    from r1v.runtime.backends.llamacpp import llama_params

    seen: list[int] = []
    original = ll.llama_model_load_from_file

    def recording(path: bytes, params: object) -> object:
        seen.append(params.n_gpu_layers)  # the struct llama.cpp reads
        return original(path, params)

    monkeypatch.setattr(ll, "llama_model_load_from_file", recording)
    monkeypatch.setattr(llama_params, "_gpu_notice_given", False)
    with caplog.at_level(logging.WARNING, logger="r1v.llama"):
        for n in (7, -1):
            with load(micro_q8, n_gpu_layers=n, n_ctx=256, n_threads=1, prefix_cache=False):
                pass
        with load(micro_q8, n_ctx=256, n_threads=1, prefix_cache=False):
            pass
    assert seen[0] == 7 and seen[-1] == 0 and -1 in seen
    assert not ll.llama_supports_gpu_offload()  # this machine's build: say it once, whatever the number of loads
    notices = [r.getMessage() for r in caplog.records if "CPU build" in r.getMessage()]
    assert notices == [llama_params.GPU_OFFLOAD_NOTICE.format(n=7)]


def test_n_gpu_layers_is_checked() -> None:
    from r1v.runtime.options import LoadOptions

    with pytest.raises(ValueError, match=r"^n_gpu_layers must be >= -1 \(-1: all layers\), got -2$"):
        LoadOptions(n_gpu_layers=-2)
    assert LoadOptions().n_gpu_layers == 0


def test_plan_split_follows_llama_cpp_layer_assignment() -> None:
    from r1v.converters.config import load_config
    from r1v.runtime.files.plan import gguf_llm_tensors, gguf_offload_split, kv_bytes_per_token, plan_memory

    cfg = load_config(R1V3_CONFIG)
    tensors = gguf_llm_tensors(cfg, "Q4_K_M")
    layer = [sum(b for n, (_, b) in tensors.items() if n.startswith(f"blk.{i}.")) for i in range(64)]
    output = tensors["output.weight"][1] + tensors["output_norm.weight"][1]
    embd = tensors["token_embd.weight"][1]
    kv_layer = kv_bytes_per_token(cfg) // 64 * 8192
    total = plan_memory(cfg, 8192).entry("gguf.llm.Q4_K_M").weights_bytes
    # -ngl 40 = llama.cpp's "offloaded 40/65 layers": decoder layers 25..63 and the output layer
    s = gguf_offload_split(cfg, "Q4_K_M", 40, 8192)
    assert (s.gpu_layers, s.cpu_layers, s.output_on_gpu) == (39, 25, True)
    assert s.gpu_weights_bytes == sum(layer[25:]) + output
    assert s.cpu_weights_bytes == sum(layer[:25]) + embd
    assert s.gpu_weights_bytes + s.cpu_weights_bytes == total
    assert (s.gpu_kv_bytes, s.cpu_kv_bytes) == (39 * kv_layer, 25 * kv_layer)
    one = gguf_offload_split(cfg, "Q4_K_M", 1, 8192)  # only the output layer
    assert (one.gpu_layers, one.gpu_weights_bytes, one.gpu_kv_bytes) == (0, output, 0)
    for n in (-1, 65, 99):
        every = gguf_offload_split(cfg, "Q4_K_M", n, 8192)
        assert (every.gpu_layers, every.cpu_weights_bytes, every.cpu_kv_bytes) == (64, embd, 0)
    none = gguf_offload_split(cfg, "Q4_K_M", 0, 8192)
    assert (none.gpu_bytes, none.cpu_weights_bytes) == (0, total)
    # the figures of the R1V3-38B Q4_K_M file: 19.41 GB of 19.84 GB go to the GPU with -ngl -1
    assert (every.gpu_weights_bytes, every.cpu_weights_bytes) == (19_405_775_248, 436_821_120)


def test_plan_split_of_tied_embeddings_duplicates_the_table(tmp_path: Path) -> None:
    from r1v.converters.config import load_config
    from r1v.runtime.files.plan import gguf_llm_tensors, gguf_offload_split

    raw = json.loads(R1V3_CONFIG.read_text())
    raw["llm_config"]["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = load_config(tmp_path / "config.json")
    tensors = gguf_llm_tensors(cfg, "Q8_0")
    assert "output.weight" not in tensors
    s = gguf_offload_split(cfg, "Q8_0", 1, 0)  # llama.cpp loads token_embd again as the output matrix
    assert s.gpu_weights_bytes == tensors["token_embd.weight"][1] + tensors["output_norm.weight"][1]
    assert s.cpu_weights_bytes == sum(b for _, b in tensors.values()) - tensors["output_norm.weight"][1]


def test_plan_command_prints_the_split(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(R1V3_CONFIG), "-ngl", "40", "--quant", "Q4_K_M"]) == 0
    out = capsys.readouterr().out
    assert ("GGUF with -ngl 40 (n_gpu_layers): 40/65 layers on the GPU (decoder layers 25-63 and the output layer); "
            "25 decoder layers and token_embd on the CPU.") in out
    assert "gguf.llm.Q4_K_M                 13.4    8.6" in out
    assert main(["plan", str(R1V3_CONFIG), "-ngl", "40", "--json"]) == 0
    split = json.loads(capsys.readouterr().out)["gguf_offload"]["gguf.llm.Q4_K_M"]
    assert (split["gpu_layers"], split["cpu_layers"], split["output_on_gpu"]) == (39, 25, True)


# --- item 10: progress and notices ---------------------------------------------------------------------------
@pytest.mark.slow
def test_first_use_build_says_what_it_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capfd: pytest.CaptureFixture[str]) -> None:
    from r1v.micro import files

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = files.micro_gguf("q4_k_m")
    err = capfd.readouterr().err
    assert f"micro-r1v: first use: building the q4_k_m GGUF files from the shipped checkpoint into {path.parent}\n" \
        in err
    assert "tensor" in err  # llama.cpp's quantizer bar
    files.micro_gguf("q4_k_m")
    assert capfd.readouterr().err == ""  # built: nothing to say
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "quiet"))
    files.micro_gguf("q4_k_m", progress=False)
    assert capfd.readouterr().err == ""


@pytest.mark.slow
def test_first_use_awq_build_shows_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capfd: pytest.CaptureFixture[str]) -> None:
    import r1v.quant.driver as driver
    from r1v.micro import files

    asked: list[bool] = []

    def fake_quantize(src: Path, out: Path, **kwargs: object) -> None:  # the real one takes minutes
        asked.append(bool(kwargs["progress"]))
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(driver, "quantize_checkpoint_awq", fake_quantize)
    monkeypatch.setattr(files, "AWQ_CALIBRATION_ITEMS", 2)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    out = files.micro_model("awq")
    assert asked == [True]
    assert "micro-r1v: first use: building the 4-bit AWQ checkpoint (awq+gptq, 2 calibration items; minutes on " \
           f"a CPU) from the shipped checkpoint into {out}" in capfd.readouterr().err
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "quiet"))
    files.micro_model("awq", progress=False)
    assert asked == [True, False] and capfd.readouterr().err == ""


def _generate_with_stdin(stdin_is_terminal: bool) -> tuple[int, str]:
    """`r1v generate` on a missing model with no --prompt; stdin a pseudo-terminal or a pipe."""
    argv = [sys.executable, "-m", "r1v", "generate", "/nonexistent/model-q4_k_m.gguf"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not stdin_is_terminal:
        run = subprocess.run(argv, input="hi\n", capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
        return run.returncode, run.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env)
    os.close(slave)
    first = proc.stderr.readline().decode()  # the notice comes before the read
    os.write(master, b"How many?\n\x04")  # a line, then Ctrl-D at the start of the next: end of input
    _, rest = proc.communicate(timeout=120)
    os.close(master)
    return proc.returncode, first + rest.decode()


@pytest.mark.slow
def test_generate_says_it_reads_stdin_on_a_terminal() -> None:
    from r1v.cli.generate_cmd import STDIN_NOTICE

    code, err = _generate_with_stdin(stdin_is_terminal=True)
    assert err.startswith(STDIN_NOTICE + "\n")
    assert "Ctrl-D" in STDIN_NOTICE
    assert code == 2 and "/nonexistent/model-q4_k_m.gguf" in err  # the question was read, then the model missed
    code, err = _generate_with_stdin(stdin_is_terminal=False)
    assert STDIN_NOTICE not in err and code == 2


@pytest.mark.slow
def test_convert_no_progress_is_silent_including_llama_cpp(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from r1v.micro import model_path

    assert main(["convert", "gguf", str(model_path()), "-o", str(tmp_path / "q"), "--quant", "Q4_K_M",
                 "--no-progress"]) == 0
    assert capfd.readouterr().err == ""


# --- item 11: what to run after a conversion -----------------------------------------------------------------
@pytest.mark.slow
def test_convert_prints_the_next_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from r1v.micro import model_path

    out = tmp_path / "my out"
    assert main(["convert", "gguf", str(model_path()), "-o", str(out), "--quant", "Q4_K_M", "Q8_0",
                 "--name", "micro", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    llm, mmproj = out / "micro-q4_k_m.gguf", out / "mmproj-micro-f16.gguf"
    assert lines[3:] == [
        "next:",
        f"  r1v generate '{llm}' --image IMAGE.png -p 'Describe the image.'",
        f"  llama-mtmd-cli -m '{llm}' --mmproj '{mmproj}' --jinja --image IMAGE.png -p 'Describe the image.'",
    ]
    # the printed r1v line is a valid command line
    assert parse(lines[4].strip().removeprefix("r1v ")).model == str(llm)
    # text only, with no projector in OUT
    assert main(["convert", "gguf", str(model_path()), "-o", str(tmp_path / "t"), "--quant", "q8_0",
                 "--no-mmproj", "--no-progress"]) == 0
    text_only = capsys.readouterr().out.splitlines()
    assert text_only[1:] == ["next:", f"  r1v generate {tmp_path}/t/model-q8_0.gguf -p 'Describe the image.'",
                             f"  llama-cli -m {tmp_path}/t/model-q8_0.gguf --jinja -p 'Describe the image.'"]


def test_awq_next_commands(tmp_path: Path) -> None:
    from r1v.cli.convert_cmd import next_commands_awq

    assert next_commands_awq(tmp_path / "awq").splitlines() == [
        "next:", f"  r1v generate {tmp_path}/awq --image IMAGE.png -p 'Describe the image.'",
        f"  vllm serve {tmp_path}/awq --trust-remote-code"]


# --- item 12: eval report names and conflicts ----------------------------------------------------------------
def test_eval_default_report_name() -> None:
    from r1v.cli.eval_cmd import default_output

    assert default_output("micro-r1v", "q4_k_m", "data/val.jsonl") == "eval-micro-r1v-q4_k_m-val.json"
    assert default_output("out/model-Q4_K_M.gguf", "q4_k_m", "val.jsonl") == "eval-model-Q4_K_M-val.json"
    assert default_output("ckpt-awq/", "awq", "val.jsonl", "out/model-f16.gguf") == \
        "eval-ckpt-awq-val-vs-model-f16.json"
    assert default_output("Org/Repo", None, "v.jsonl") == "eval-Repo-v.json"


def test_eval_conflict_is_one_line(tmp_path: Path) -> None:
    from r1v.apps.evaluation import ResultsFile

    path = tmp_path / "r.json.items.jsonl"
    ResultsFile(path, {"model": "micro-r1v (q8_0)", "data": "/d/val.jsonl", "reference": None, "limit": 5,
                       "max_tokens": 256})
    with pytest.raises(ValueError) as e:
        ResultsFile(path, {"model": "micro-r1v (q4_k_m)", "data": "/d/val.jsonl", "reference": None, "limit": 5,
                           "max_tokens": 128})
    assert str(e.value) == (
        f"{path} holds results of another run (model 'micro-r1v (q8_0)' there, 'micro-r1v (q4_k_m)' now; "
        "max_tokens 256 there, 128 now): r1v eval --force starts over (evaluate(..., overwrite=True)), or write "
        "the report elsewhere (-o)")
    path.write_text("not json\n")
    with pytest.raises(ValueError, match=r"r\.json\.items\.jsonl is not an r1v eval results file; r1v eval --force"):
        ResultsFile(path, {"model": "m"})
    fresh = ResultsFile(path, {"model": "m"}, overwrite=True)
    assert fresh.done == {} and json.loads(path.read_text())["model"] == "m"


def test_eval_command_names_its_report_and_forces(micro_q8: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from r1v.micro import task

    data = task.write_items(task.TEST_SEED + 40, 1, tmp_path / "val.jsonl")
    monkeypatch.chdir(tmp_path)
    common = ["eval", "micro-r1v", str(data), "-t", "1", "-tb", "1", "-c", "1024"]
    assert main([*common, "-n", "8"]) == 0
    assert (tmp_path / "eval-micro-r1v-q8_0-val.json").is_file()
    capsys.readouterr()
    assert main([*common, "-n", "16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_tokens 8 there, 16 now" in err and "--force" in err
    assert main([*common, "-n", "16", "--force"]) == 0
    report = json.loads((tmp_path / "eval-micro-r1v-q8_0-val.json").read_text())
    assert report["total"] == 1
    header = json.loads((tmp_path / "eval-micro-r1v-q8_0-val.json.items.jsonl").read_text().splitlines()[0])
    assert header["max_tokens"] == 16


def test_awq_calibration_shows_the_vision_tower_bar(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The calibration images through the ViT were minutes without a word on micro-r1v's first `--quant awq`."""
    import numpy as np

    from r1v.converters.checkpoint import open_checkpoint
    from r1v.quant.driver import embed_images
    from r1v.testing import make_tiny_checkpoint

    ckpt = open_checkpoint(make_tiny_checkpoint(tmp_path / "tiny", vit="300m", seed=0, dtype="f32"))
    size, layers = ckpt.config.vision.image_size, ckpt.config.vision.num_hidden_layers
    images = [np.zeros((2, 3, size, size), np.float32), np.ones((1, 3, size, size), np.float32)]
    quiet = embed_images(ckpt, images)
    assert capfd.readouterr().err == ""
    shown = embed_images(ckpt, images, progress=True)
    err = capfd.readouterr().err
    assert "vision tower, 3 calibration tiles: 100%" in err and f"{layers}/{layers}" in err
    assert all(np.array_equal(a, b) for a, b in zip(quiet, shown))


def test_serve_help_does_not_show_the_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("R1V_API_KEY", "sk-secret-123")
    text = subparsers(build_parser())["serve"].format_help()
    assert "sk-secret-123" not in text and "$R1V_API_KEY" in text
