"""Per-episode traces: every step as one JSON object (prompt turn, raw output, parsed
actions, tool inputs/results/errors, timings), written as JSONL atomically."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable

from lumos_jax.atomic import atomic_path


class Trace:
    def __init__(self, task: str, domain: str = "", formulation: str = "", style: str = "", episode_id: str = ""):
        self.episode_id = episode_id
        self.events: list[dict] = []
        self._t0 = time.perf_counter()
        self.event("start", task=task, domain=domain, formulation=formulation, style=style)

    def event(self, kind: str, **fields) -> None:
        self.events.append({"episode": self.episode_id, "event": kind,
                            "t": round(time.perf_counter() - self._t0, 6), **fields})

    def generation(self, module: str, round_: int, prompt: str, out, parsed) -> None:
        self.event("generate", module=module, round=round_, prompt=prompt, raw_output=out.text,
                   parsed=parsed, prompt_tokens=getattr(out, "prompt_tokens", 0),
                   new_prompt_tokens=getattr(out, "new_tokens", 0),
                   finish_reason=getattr(out, "finish_reason", ""), error=getattr(out, "error", None),
                   seconds=round(getattr(out, "seconds", 0.0), 6))

    def actions(self, round_: int, records) -> None:
        for r in records:
            self.event("action", round=round_, **r.to_dict())

    def end(self, reason: str, answer, rounds: int) -> None:
        self.event("end", reason=reason, answer=answer, rounds=rounds)

    @property
    def complete(self) -> bool:
        return bool(self.events) and self.events[0]["event"] == "start" and self.events[-1]["event"] == "end"

    def lines(self) -> list[str]:
        return [json.dumps(e, ensure_ascii=False, default=str) for e in self.events]


def write_traces(path: str | Path, traces: Iterable[Trace]) -> None:
    """All traces into one JSONL file, via a temporary file and a rename."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for t in traces:
            for line in t.lines():
                f.write(line + "\n")
