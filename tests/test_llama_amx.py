"""The AMX guard (runtime/backends/llamacpp/llama_params.py): llama.cpp's AMX weight buffers crash at the first decode on many
hosts, so every GGUF load turns llama.cpp's extra buffer types off where its CPU backend reports AMX, unless
the user opts in. The decision is tested on reports of both kinds; the plumbing on this machine's llama.cpp,
by reading which weight buffers it allocated."""
from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest

from llama_cpp import llama_cpp as _ll
from r1v.converters.gguf import convert_gguf
from r1v.runtime.backends.llamacpp import llama_params
from r1v.runtime.api import load
from r1v.runtime.backends.llamacpp.llama_params import AMX_ENV, allow_amx_from_env, choose_buffers, library_has_amx, open_llama
from r1v.runtime.backends.llamacpp.mtmd import TextModel
from r1v.testing import make_tiny_checkpoint

# llama_print_system_info() as printed by llama.cpp (features that are 1 are listed; the AMX one from a
# Sapphire-Rapids build, the other from this project's AMD EPYC machines)
AMX_REPORT = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
              "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | "
              "REPACK = 1 | ")
NO_AMX_REPORT = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
                 "AVX512_VNNI = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")


@pytest.mark.parametrize("report, expected", [
    (AMX_REPORT, True),
    (NO_AMX_REPORT, False),
    ("CPU : AVX2 = 1 | AMX_INT8 = 0 | REPACK = 1 |", False),
    ("CPU : AMX_INT8 = 1", True),
    ("AMX_INT8 = 1 | CPU : AVX2 = 1", True),
    ("CPU : AMX_INT8 = 10 |", False),  # not the feature flag
    ("", False),
])
def test_library_has_amx_reads_llama_cpp_report(report: str, expected: bool):
    assert library_has_amx(report) is expected


def test_amx_library_gets_no_extra_buffers_unless_allowed():
    choice = choose_buffers(AMX_REPORT, environ={})
    assert (choice.use_extra_bufts, choice.library_has_amx) == (False, True)
    assert AMX_ENV in choice.reason and "#20824" in choice.reason
    assert choose_buffers(AMX_REPORT, environ={AMX_ENV: "1"}).use_extra_bufts is True
    assert choose_buffers(AMX_REPORT, environ={AMX_ENV: "off"}).use_extra_bufts is False
    assert choose_buffers(AMX_REPORT, True, environ={AMX_ENV: "0"}).use_extra_bufts is True  # the option wins
    assert choose_buffers(AMX_REPORT, False, environ={AMX_ENV: "1"}).use_extra_bufts is False


def test_library_without_amx_keeps_extra_buffers_unless_turned_off():
    for env in ("0", "1"):
        choice = choose_buffers(NO_AMX_REPORT, environ={AMX_ENV: env})
        assert (choice.use_extra_bufts, choice.library_has_amx) == (True, False)
    assert choose_buffers(NO_AMX_REPORT, False, environ={}).use_extra_bufts is False  # llama.cpp's --no-repack
    assert choose_buffers(NO_AMX_REPORT, True, environ={}).use_extra_bufts is True


@pytest.mark.parametrize("value", ["2", "maybe", "enable"])
def test_bad_environment_value_names_the_variable(value: str):
    with pytest.raises(ValueError, match=rf"^{AMX_ENV}='{value}': expected 1 or 0"):
        allow_amx_from_env({AMX_ENV: value})
    for report in (AMX_REPORT, NO_AMX_REPORT):  # refused where it would not matter too, not silently ignored
        with pytest.raises(ValueError, match=AMX_ENV):
            choose_buffers(report, environ={AMX_ENV: value})


# --- plumbing: the decision reaches llama.cpp's loader ------------------------------------------------------

@pytest.fixture(scope="module")
def q4_0_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Q4_0 text model: the type llama.cpp's CPU_REPACK buffer takes on x86 (rows a multiple of 8)."""
    root = tmp_path_factory.mktemp("amx")
    ckpt = make_tiny_checkpoint(root / "ckpt", llm_hidden=128, llm_intermediate=256, seed=3)
    return convert_gguf(ckpt, root / "gguf", quant=["q4_0"], mmproj_quant=None, progress=False).llm["q4_0"]


_BUFFER_LINE = re.compile(r"(\S+) model buffer size")


class _LoaderLog:
    """Collects llama.cpp's loader log ("<BUFFER TYPE> model buffer size = ... MiB") while installed."""

    def __init__(self) -> None:
        self.lines: list[str] = []

        @_ll.llama_log_callback
        def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            self.lines.append(text.decode("utf-8", "replace") if text else "")

        self._callback = callback  # referenced while llama.cpp may call it

    def __enter__(self) -> _LoaderLog:
        _ll.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc: object) -> None:
        from llama_cpp._logger import llama_log_callback as default_callback

        _ll.llama_log_set(default_callback, ctypes.c_void_p(0))

    @property
    def buffers(self) -> set[str]:
        return {m.group(1) for line in self.lines for m in [_BUFFER_LINE.search(line)] if m}


def _buffers_of_a_load(path: Path, monkeypatch: pytest.MonkeyPatch, report: str) -> set[str]:
    monkeypatch.setattr(llama_params, "system_info", lambda: report)
    with _LoaderLog() as log, TextModel(path, verbose=True):
        pass
    return log.buffers


def test_amx_report_loads_weights_without_extra_buffer_types(q4_0_model: Path, monkeypatch: pytest.MonkeyPatch):
    """The parameter reaches llama.cpp: given an AMX report, the Q4_0 weights go to the plain CPU buffer;
    given a report without AMX, llama.cpp uses its default placement (CPU_REPACK where it repacks Q4_0)."""
    monkeypatch.delenv(AMX_ENV, raising=False)
    real_report = llama_params.system_info()
    guarded = _buffers_of_a_load(q4_0_model, monkeypatch, AMX_REPORT)
    assert guarded and guarded <= {"CPU", "CPU_Mapped"}, guarded
    unguarded = _buffers_of_a_load(q4_0_model, monkeypatch, NO_AMX_REPORT)
    params = _ll.llama_model_default_params()
    assert params.use_extra_bufts  # llama.cpp's default, which the report without AMX keeps
    if "REPACK = 1" in real_report:
        assert "CPU_REPACK" in unguarded, unguarded
    monkeypatch.setenv(AMX_ENV, "1")
    assert _buffers_of_a_load(q4_0_model, monkeypatch, AMX_REPORT) == unguarded


@pytest.mark.slow
def test_real_report_decides_every_gguf_load(q4_0_model: Path):
    """On this machine's llama.cpp: our runtime and the plain llama-cpp-python baseline both load and decode
    with the guard's decision (on an AMX build without the guard, the decode below segfaults)."""
    report = llama_params.system_info()
    expected = choose_buffers(report).use_extra_bufts
    assert llama_params.model_params().use_extra_bufts is expected
    with load(q4_0_model, n_ctx=128, n_threads=1, prefix_cache=False) as model:
        result = model.generate("hello", max_tokens=4, temperature=0)
    assert result.completion_tokens == 4 or result.finish_reason == "stop"
    llama = open_llama(q4_0_model, n_ctx=128, n_threads=1, verbose=False)
    try:
        tokens = llama.tokenize(b"hello", add_bos=False)
        llama.eval(tokens)  # the first decode: where ggml_backend_amx_mul_mat crashed
        assert llama.n_tokens == len(tokens)
    finally:
        llama.close()


def test_plain_llama_is_guarded_only_inside_the_block(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(llama_params, "system_info", lambda: AMX_REPORT)
    monkeypatch.delenv(AMX_ENV, raising=False)
    original = _ll.llama_model_default_params
    with llama_params.llama_with_safe_buffers():
        assert _ll.llama_model_default_params().use_extra_bufts is False  # what llama_cpp.Llama will read
    assert _ll.llama_model_default_params is original
    assert _ll.llama_model_default_params().use_extra_bufts is True
    with pytest.raises(RuntimeError, match="boom"), llama_params.llama_with_safe_buffers():
        raise RuntimeError("boom")
    assert _ll.llama_model_default_params is original


def test_extra_buffers_benchmark_runs_both_settings(q4_0_model: Path):
    from r1v.bench.extra_buffers import bench_extra_buffers

    result = bench_extra_buffers(str(q4_0_model), repeats=2, decode_tokens=4, prompt_repeats=1)
    rates = result["tokens_per_second"]
    assert set(rates) == {"on", "off"} and all(v > 0 for side in rates.values() for v in side.values())
    assert result["off_over_on"]["decode"] == pytest.approx(rates["off"]["decode"] / rates["on"]["decode"])


def test_extra_buffers_benchmark_names_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from r1v.bench.extra_buffers import main

    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a model")
    with pytest.raises(SystemExit) as exit_info:
        main([str(bad)])
    assert exit_info.value.code == 2
    assert f"{bad}: not a GGUF file" in capsys.readouterr().err
