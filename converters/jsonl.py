"""JSON Lines files read one line at a time: the one reader behind calibration files (quant/), evaluation items
and batch input/output (runtime/). It lives in converters/, the bottom layer, so both may import it.

Every error names the file and the line: a byte that is not UTF-8 (with its column), a line that is not JSON,
a line that is not a JSON object. Callers check the fields of each object themselves.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["read_jsonl", "text_lines"]

ErrorType = Callable[[str], Exception]  # the caller's error class (ValueError, CalibrationError, ...)


def text_lines(path: str | Path, *, error: ErrorType = ValueError) -> Iterator[tuple[int, str]]:
    """(number, line) of a UTF-8 text file, numbered from 1; a byte that is not UTF-8 raises `error` naming the
    file, the line and the column. Lines end at b"\\n" only (not at U+2028 and the like, which JSON strings hold)."""
    path = Path(path)
    with open(path, "rb") as f:
        for number, data in enumerate(f, 1):
            try:
                yield number, data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{path}:{number}: not UTF-8 text (byte 0x{data[e.start]:02x} at column "
                            f"{e.start + 1})") from None


def read_jsonl(path: str | Path, *, error: ErrorType = ValueError) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line of a JSONL file. A line that is not UTF-8, not JSON or not
    a JSON object raises `error` naming the file and the line; a missing file raises the OSError of `open`."""
    path = Path(path)
    for number, line in text_lines(path, error=error):
        if not line.strip():
            continue
        try:
            entry = json.loads(line.rstrip("\r\n"))  # without its line end, so columns count on the line
        except json.JSONDecodeError as e:
            raise error(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(entry, dict):
            raise error(f"{path}:{number}: expected a JSON object, got {type(entry).__name__}")
        yield number, entry
