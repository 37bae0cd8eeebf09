"""JSONL reading with errors that name file:line — the one reader the library and its tools use.

Lines are read as bytes and decoded one by one, so a bad byte is reported at its line rather
than as a decode error somewhere in the file. Blank lines are skipped everywhere.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator


class _BadLine:
    """What a line that is not JSON gives with bad="mark" (JSON `null` stays None)."""

    def __repr__(self) -> str:
        return "BAD_LINE"


BAD_LINE = _BadLine()


def iter_jsonl_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) of each non-blank line."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                yield n, raw


def parse_line(raw: bytes, where: str) -> tuple[Any, tuple[str, str] | None]:
    """(value, None) or (None, (reason, "file:line: why")) for one raw line; reason is
    "not_utf8" or "bad_json" (the annotation reader counts skipped lines by reason)."""
    try:
        return json.loads(raw.decode("utf-8")), None
    except UnicodeDecodeError as e:
        return None, ("not_utf8", f"{where}: not valid UTF-8 (byte {e.start})")
    except json.JSONDecodeError as e:
        return None, ("bad_json", f"{where}: invalid JSON ({e.msg} at column {e.colno})")


def iter_jsonl(path: str | os.PathLike, *, error: type[Exception] = ValueError,
               bad: str = "raise") -> Iterator[tuple[int, Any]]:
    """(line number, value) for every non-blank line. A line that is not JSON (or not UTF-8)
    raises `error("file:line: why")`, or with bad="mark" gives (line number, BAD_LINE), for
    callers that count bad lines (a converter's report) or drop a torn tail (a resumed run)."""
    if bad not in ("raise", "mark"):
        raise ValueError(f"iter_jsonl: bad={bad!r}; expected 'raise' or 'mark'")
    for n, raw in iter_jsonl_lines(path):
        value, problem = parse_line(raw, f"{path}:{n}")
        if problem is not None and bad == "raise":
            raise error(problem[1])
        yield n, (value if problem is None else BAD_LINE)


def read_jsonl(path: str | os.PathLike, *, error: type[Exception] = ValueError) -> list:
    return [row for _, row in iter_jsonl(path, error=error)]


def read_appended(path: str | os.PathLike, *, error: type[Exception] = ValueError) -> tuple[list[tuple[int, Any]], bool]:
    """An append-only output file of a run that may have been killed mid-line: the (line, value)
    of every whole line, and whether a torn last line was left out. A bad line elsewhere is
    corruption, not an interruption: `error("file:line: ...")`."""
    rows = list(iter_jsonl(path, error=error, bad="mark"))
    torn = bool(rows) and rows[-1][1] is BAD_LINE
    if torn:
        rows.pop()
    for n, value in rows:
        if value is BAD_LINE:
            raise error(f"{path}:{n}: corrupt record (not JSON); remove the line to resume")
    return rows, torn
