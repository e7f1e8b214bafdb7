"""Reading JSON and JSON Lines files defensively, every problem tied to the file (and line) it is in.

`read_json_object`: a file that must hold one object (config.json, adapter_config.json, an index).
`read_lines`: JSON Lines, one JSON value per line.

Each line is decoded on its own, so a stray non-UTF-8 byte is reported with its line and byte offset instead of
failing the whole file with a bare UnicodeDecodeError, and a line longer than MAX_LINE_BYTES (a missing newline,
a binary file) is refused without holding it in memory. This module knows nothing about what the records mean:
train/data.py and serve/batch.py check their fields.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimlm.errors import CheckpointError

MAX_LINE_BYTES = 64 * 2**20  # one 64 MiB record is a broken file (a missing newline), not training data


@dataclass
class Line:
    """One non-blank line: its 1-based number and either the parsed JSON `value` or a short `error`."""

    number: int
    value: Any = None
    error: str | None = None


def read_lines(path: str | Path) -> Iterator[Line]:
    """Every non-blank line of a JSONL file, parsed; blank lines are skipped, a leading UTF-8 BOM is ignored.

    Problems come back as `Line.error` ("not UTF-8 ...", "invalid JSON ...", "longer than ..."), so the caller
    can report every bad line at once. A missing file or a folder raises FileNotFoundError / IsADirectoryError.
    """
    with open(path, "rb") as f:
        number, offset = 0, 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            number += 1
            start, offset = offset, offset + len(raw)
            if len(raw) > MAX_LINE_BYTES:
                if not raw.endswith(b"\n"):
                    offset += _skip_rest_of_line(f)
                yield Line(number, error=f"longer than {MAX_LINE_BYTES:,} bytes; is a newline missing?")
                continue
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # Windows editors write one; it is not part of the JSON
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Line(
                    number,
                    error=f"not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}, "
                    f"file offset {start + e.start}); save the file as UTF-8",
                )
                continue
            if text.strip():
                yield _parse(number, text)


def _parse(number: int, text: str) -> Line:
    try:
        return Line(number, json.loads(text.rstrip("\r\n")))  # one line, so e.colno is the column in the file
    except json.JSONDecodeError as e:
        return Line(number, error=f"invalid JSON ({e.msg} at column {e.colno}); each line must be one JSON object")
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        return Line(number, error=f"invalid JSON value ({e})")
    except RecursionError:
        return Line(number, error="invalid JSON: nested too deeply")


def _skip_rest_of_line(f) -> int:
    """Read past the end of an over-long line in bounded chunks; returns how many bytes were skipped."""
    skipped = 0
    while chunk := f.readline(2**20):
        skipped += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return skipped


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold one object (config.json, adapter_config.json, an index); errors name the file."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(
            f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); re-download or fix the file"
        ) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download or fix the file") from None
    if not isinstance(value, dict):
        raise CheckpointError(
            f"{path} holds a JSON {type(value).__name__}, not an object {{...}}; re-download or fix the file"
        )
    return value
