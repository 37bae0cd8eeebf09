"""JSONL reading with errors that name file:line — the one reader the library uses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, value) for every non-blank line; bad JSON -> ValueError naming file:line."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None


def read_jsonl(path: str | Path) -> list:
    return [row for _, row in iter_jsonl(path)]
