"""Gold plans from the reference's converted format, and tools that replay their results.

`converted/*.jsonl` rows hold `subgoal_plan` blocks ("Subgoal k: ..." then
"Action k-j: R1 = Tool(args) = result"). `gold_actions` reads them; `ReplayTool` answers a
tool call with the recorded result — a dry run of the loops without live services, and
the way to check prompts byte for byte against the annotations.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lumos_jax.agent.parsing import parse_action
from lumos_jax.agent.tools.base import Tool, ToolContext, ToolError

_ACTION_LINE = re.compile(r"^Action \d+-\d+: (.*)$")


def read_converted(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    rows.append({"task": row["task"], "subgoal_plan": row["subgoal_plan"]})
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{path}:{n}: expected 'task' and 'subgoal_plan'") from None
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
