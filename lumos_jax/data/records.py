"""Reading and validating Lumos annotation records (`{dataset, id, messages}` JSONL).

Every problem is reported as `file:line: what`; with `skip_bad_records=True` the bad
lines are skipped and counted in a `BadRecordReport` instead, so nothing disappears
silently.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from pathlib import Path

from lumos_jax.atomic import atomic_path
from lumos_jax.jsonl import iter_jsonl_lines, parse_line

ROLES = ("system", "user", "assistant")


class BadRecordError(ValueError):
    """A malformed annotation record; the message starts with `file:line:`."""


@dataclasses.dataclass
class BadRecordReport:
    """Counts (and the first few messages) of skipped records, per reason."""

    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list = dataclasses.field(default_factory=list)
    max_examples: int = 20

    def add(self, reason: str, message: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no bad records"
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
        return f"{self.total} bad records skipped ({parts})"


def validate_record(record, where: str) -> tuple[str, str] | None:
    """None if `record` is a usable conversation, else (reason, message)."""
    if not isinstance(record, dict):
        return "not_an_object", f"{where}: record is {type(record).__name__}, expected a JSON object"
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return "no_messages", f"{where}: 'messages' must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return "bad_message", f"{where}: message {i} is not an object"
        role = m.get("role")
        if role is None:
            return "missing_role", f"{where}: message {i} has no 'role'"
        if role not in ROLES:
            return "unknown_role", f"{where}: message {i} has unknown role {role!r} (expected system/user/assistant)"
        content = m.get("content")
        if not isinstance(content, str):
            return "bad_content", f"{where}: message {i} content must be a string"
        if not content.strip():
            return "empty_content", f"{where}: message {i} ({role}) has empty content"
    if messages[-1]["role"] != "assistant":
        return "not_ending_with_assistant", f"{where}: conversation does not end with an assistant turn"
    return None


def parse_record(raw: bytes, where: str) -> tuple[dict | None, tuple[str, str] | None]:
    """Decode + parse + validate one line: (record, None) or (None, (reason, message))."""
    record, problem = parse_line(raw, where)
    if problem is not None:
        return None, problem
    problem = validate_record(record, where)
    return (None, problem) if problem else (record, None)


def read_annotations(path: str | os.PathLike, skip_bad_records: bool = False,
                     report: BadRecordReport | None = None, lines: list | None = None) -> list[dict]:
    """All valid records of one file; raises BadRecordError on the first bad one unless skipping.
    `lines`, when given, receives each returned record's line number."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"annotations file {path} does not exist")
    records = []
    for n, raw in iter_jsonl_lines(path):
        record, problem = parse_record(raw, f"{path}:{n}")
        if problem is None:
            records.append(record)
            if lines is not None:
                lines.append(n)
        elif skip_bad_records:
            if report is not None:
                report.add(*problem)
        else:
            raise BadRecordError(problem[1])
    return records


def untrained_message(count: int, where: list[str], max_len: int) -> str:
    """The one warning line for records whose every target token is masked (so they would
    train nothing): usually the assistant turns start past max_len."""
    shown = ", ".join(where[:5]) + (", ..." if count > 5 else "")
    return (f"training data: warning: {count} record(s) have no trained tokens (every assistant "
            f"token is past max_len {max_len}) and are left out: {shown}")


def write_jsonl_atomic(path: str | os.PathLike, lines) -> int:
    """Write text lines (each without newline) to `path`, atomically; returns how many."""
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
            count += 1
    return count
