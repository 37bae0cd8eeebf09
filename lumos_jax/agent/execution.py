"""The execution module: run grounded actions with tools, keep the variables, report errors.

Actions run in order; each result is stored under its output variables (`R5, R6 = ...`
takes one value per variable). A failure of any kind (malformed action, unknown tool,
bad arguments, undefined variable, tool exception, timeout) becomes an error observation
in the action's record; its variables stay unset, so the episode goes on and later
actions that need them report an undefined variable.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from typing import Any

from lumos_jax.agent.parsing import Action
from lumos_jax.agent.tools.base import (BadArguments, ToolContext, ToolError, ToolRegistry, ToolTimeout,
                                        value_text)

_SINGLE_VAR = re.compile(r"^\s*(R\d+)\s*$")
OBSERVATION_LIMIT = 2000


@dataclasses.dataclass
class ActionRecord:
    """What happened to one action; `error_kind` is None on success."""

    raw: str
    outputs: list[str]
    tool: str
    args: str
    result: Any = None
    observation: str = ""
    error: str | None = None
    error_kind: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error_kind is None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["result"] = _jsonable(self.result)
        return d


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


def call_with_timeout(fn, timeout_s: float | None):
    """Run fn() in a daemon thread and wait at most timeout_s; a tool that hangs is
    abandoned (the thread ends on its own) and reported as a timeout."""
    if not timeout_s or timeout_s <= 0:
        return fn()
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True, name="lumos-tool")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise ToolTimeout(f"timed out after {timeout_s:g}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


class Executor:
    """Runs actions against a registry; one Executor serves many episodes (it is stateless;
    each episode brings its own ToolContext)."""

    def __init__(self, registry: ToolRegistry):
        self.registry = registry

    def run(self, actions: list[Action], ctx: ToolContext) -> list[ActionRecord]:
        return [self.run_one(a, ctx) for a in actions]

    def run_one(self, action: Action, ctx: ToolContext) -> ActionRecord:
        rec = ActionRecord(raw=action.raw, outputs=list(action.outputs), tool=action.tool, args=action.args)
        start = time.perf_counter()
        try:
            if action.error:
                raise BadArguments(action.error) if action.tool else _ParseError(action.error)
            value = self.call(action, ctx)
            self._store(action, value, ctx)
            rec.result = value
            rec.observation = _clip(value_text(value))
        except ToolError as e:
            rec.error, rec.error_kind = str(e) or type(e).__name__, e.kind
        except Exception as e:  # noqa: BLE001 - a tool bug must not end the episode
            rec.error, rec.error_kind = f"{type(e).__name__}: {e}", "tool_exception"
        if rec.error_kind:
            rec.observation = _clip(f"Error ({rec.error_kind}): {rec.error}")
        rec.seconds = time.perf_counter() - start
        return rec

    def call(self, action: Action, ctx: ToolContext) -> Any:
        """The action's value (raises ToolError/exceptions; `run_one` turns them into records)."""
        if action.tool == "":
            return self._assign(action.args, ctx)
        tool = self.registry.get(action.tool)
        timeout = self.registry.timeout_for(action.tool)
        return call_with_timeout(lambda: tool(action.args, ctx), timeout)

    def _assign(self, expr: str, ctx: ToolContext) -> Any:
        m = _SINGLE_VAR.match(expr)
        if m:
            return ctx.value(m.group(1))
        if "Calculator" in self.registry:
            tool = self.registry.get("Calculator")
            return call_with_timeout(lambda: tool(expr, ctx), self.registry.timeout_for("Calculator"))
        return ctx.substitute(expr)

    @staticmethod
    def _store(action: Action, value: Any, ctx: ToolContext) -> None:
        outs = list(action.outputs)
        if not outs:
            return
        if len(outs) == 1:
            ctx.variables[outs[0]] = value
            return
        values = value if isinstance(value, (list, tuple)) else [value]
        if len(values) != len(outs):
            raise BadArguments(f"{len(outs)} output variables but the tool returned {len(values)} values")
        for name, v in zip(outs, values):
            ctx.variables[name] = v


class _ParseError(ToolError):
    kind = "parse_error"


def _clip(text: str) -> str:
    return text if len(text) <= OBSERVATION_LIMIT else text[:OBSERVATION_LIMIT] + " ..."


def last_result_text(records: list[ActionRecord]) -> str:
    """The subgoal's result reported to the planner: the last action's observation."""
    return records[-1].observation if records else "Error (parse_error): no actions"
