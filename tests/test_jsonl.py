"""The one JSONL reader (converters/jsonl.py) behind calibration files, eval items and batch input/output."""
from __future__ import annotations

import pytest

from r1v.converters.jsonl import read_jsonl, text_lines


class MyError(ValueError):
    pass


def test_objects_come_with_their_line_numbers_blank_lines_skipped(tmp_path):
    path = tmp_path / "items.jsonl"
    # CRLF endings, a blank and a whitespace-only line, a U+2028 inside a string (not a line end in JSONL)
    path.write_bytes(b'{"a": 1}\r\n\r\n   \n{"b": "x\xe2\x80\xa8y"}\n{"c": [1, 2]}')
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (4, {"b": "x\u2028y"}), (5, {"c": [1, 2]})]
    assert list(read_jsonl(tmp_path / "items.jsonl")) == list(read_jsonl(str(path)))


@pytest.mark.parametrize("data,message", [
    (b'{"a": 1}\n{"a" 2}\n', r"items.jsonl:2: not valid JSON \(Expecting ':' delimiter at column 6\)"),
    (b'{"a": 1}\n\n"text"\n', r"items.jsonl:3: expected a JSON object, got str"),
    (b'[1, 2]\n', r"items.jsonl:1: expected a JSON object, got list"),
    (b'{"a": 1}\n{"a": "\xff"}\n', r"items.jsonl:2: not UTF-8 text \(byte 0xff at column 8\)"),
])
def test_bad_lines_raise_the_callers_error_naming_file_and_line(tmp_path, data, message):
    path = tmp_path / "items.jsonl"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message):
        list(read_jsonl(path))
    with pytest.raises(MyError, match=message):
        list(read_jsonl(path, error=MyError))


def test_lines_before_a_bad_one_are_yielded_first(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_bytes(b'{"a": 1}\nnope\n')
    rows = read_jsonl(path)
    assert next(rows) == (1, {"a": 1})
    with pytest.raises(ValueError, match=r"items.jsonl:2: not valid JSON \(Expecting value at column 1\)"):
        next(rows)


def test_text_lines_keep_line_ends_and_missing_files_raise_oserror(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b"one\n\ntwo")
    assert list(text_lines(path)) == [(1, "one\n"), (2, "\n"), (3, "two")]
    with pytest.raises(FileNotFoundError):
        list(read_jsonl(tmp_path / "missing.jsonl"))
