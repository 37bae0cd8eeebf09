"""Gold plans from the reference's converted format, tools that replay their results, and a
generator that replays gold turns at a real model's cost.

`converted/*.jsonl` rows hold `subgoal_plan` blocks ("Subgoal k: ..." then
"Action k-j: R1 = Tool(args) = result"). `gold_actions` reads them; `ReplayTool` answers a
tool call with the recorded result — a dry run of the loops without live services, and
the way to check prompts byte for byte against the annotations. `GoldForcing` (benchmarks)
makes a real model generate exactly as many tokens as each gold turn, then answers with
the gold text, so the compute is real and the episode follows the annotation.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable

from lumos_jax.agent.generators import Polling, ScriptedGenerator, as_polling
from lumos_jax.agent.parsing import parse_action
from lumos_jax.agent.tools.base import Tool, ToolContext, ToolError
from lumos_jax.jsonl import iter_jsonl

_ACTION_LINE = re.compile(r"^Action \d+-\d+: (.*)$")


def read_converted(path: str | Path) -> list[dict]:
    rows = []
    for n, row in iter_jsonl(path):
        if not (isinstance(row, dict) and "task" in row and "subgoal_plan" in row):
            raise ValueError(f"{path}:{n}: expected 'task' and 'subgoal_plan'")
        rows.append({"task": row["task"], "subgoal_plan": row["subgoal_plan"]})
    return rows


def gold_actions(subgoal_plan: str) -> list[tuple[str, str]]:
    """(action text, recorded result) for every action line, in order."""
    out = []
    for line in subgoal_plan.split("\n"):
        m = _ACTION_LINE.match(line.strip())
        if not m:
            continue
        text = m.group(1).strip()
        a = parse_action(text)
        prefix = f"{', '.join(a.outputs)} = {a.tool}({a.args})"
        rest = text[len(prefix):].strip() if text.startswith(prefix) else ""
        result = rest[1:].strip() if rest.startswith("=") else ""
        out.append((prefix, result))
    return out


class ReplayTool(Tool):
    """Answers `Tool(args)` with the recorded result for those exact arguments."""

    def __init__(self, name: str, table: dict[str, str]):
        self.name, self.table = name, table

    def __call__(self, args: str, ctx: ToolContext) -> str:
        if args not in self.table:
            raise ToolError(f"{self.name}: no recorded result for ({args[:60]})")
        result = self.table[args]
        if self.name == "QA":
            ctx.qa_pairs.append((args.split("Question: ")[-1], result))
        return result


def replay_tools(rows: list[dict], names: tuple[str, ...]) -> list[ReplayTool]:
    tables: dict[str, dict[str, str]] = {n: {} for n in names}
    for row in rows:
        for text, result in gold_actions(row["subgoal_plan"]):
            a = parse_action(text)
            if a.tool in tables:
                tables[a.tool][a.args] = result
    return [ReplayTool(n, t) for n, t in tables.items()]


class GoldForcing(Polling):
    """Wraps a model generator: each turn generates exactly `count(gold text)` tokens (no
    stop ids) and is answered with the gold text that `gold` (the annotations) holds for
    that conversation. `forced_tokens` sums the tokens generated."""

    def __init__(self, inner, gold: ScriptedGenerator, count: Callable[[str], int]):
        super().__init__()
        self.inner, self.gold, self.count = as_polling(inner), gold, count
        self._map: dict = {}
        self.forced_tokens = 0

    def _start(self, handle, request):
        text = self.gold.answer(request).text
        n = max(1, int(self.count(text)))
        inner = self.inner.submit(dataclasses.replace(request, max_new_tokens=n, ignore_stop=True))
        self._map[inner] = (handle, text)

    def _advance(self):
        if not self._map:
            return
        for inner, out in self.inner.poll(list(self._map)):
            handle, text = self._map.pop(inner)
            if out.finish_reason != "error":
                self.forced_tokens += len(out.tokens)
                out = dataclasses.replace(out, text=text)
            self._finish(handle, out)

    def release(self, session: str) -> None:
        self.inner.release(session)
