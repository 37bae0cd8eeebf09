"""What a tool is: a name, an argument parser and a call; errors are typed, never crashes.

A tool receives the raw argument text of `R3 = Tool(args)` and a `ToolContext` (the
episode's variables, task and environment). It returns a value (text, a list of
paragraphs, a dict) or raises a `ToolError`; the execution module turns errors into
observations so the episode goes on.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

VARIABLE_RE = re.compile(r"\bR\d+\b")


class ToolError(Exception):
    """A tool failed in an expected way; `kind` names the category for traces."""

    kind = "tool_error"


class BadArguments(ToolError):
    kind = "bad_arguments"


class UndefinedVariable(ToolError):
    kind = "undefined_variable"


class ToolTimeout(ToolError):
    kind = "timeout"


class UnknownTool(ToolError):
    kind = "unknown_tool"


@dataclasses.dataclass
class ToolContext:
    """Per-episode state a tool may read: variables (R1, ...), the task, an environment."""

    variables: dict[str, Any]
    task: str = ""
    domain: str = ""
    env: Any = None
    subgoal: str = ""
    qa_pairs: list = dataclasses.field(default_factory=list)  # (question, answer) of QA calls

    def value(self, name: str) -> Any:
        if name not in self.variables:
            raise UndefinedVariable(f"undefined variable {name}")
        return self.variables[name]

    def referenced(self, text: str) -> list[str]:
        return VARIABLE_RE.findall(text)

    def substitute(self, text: str, wrap: Callable[[str], str] | None = None) -> str:
        """Replace every R<n> in `text` by its value's text (optionally wrapped)."""
        def repl(m):
            v = value_text(self.value(m.group(0)))
            return wrap(v) if wrap else v
        return VARIABLE_RE.sub(repl, text)


def value_text(value: Any) -> str:
    """How a stored value reads inside another action or an observation."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return "\n".join(value_text(v) for v in value)
    if isinstance(value, dict) and "summary" in value:
        return str(value["summary"])
    return str(value)


class Tool:
    """Base class: subclasses set `name` and implement `__call__(args, ctx)`.

    `multi_output` tools return a list with one value per output variable
    (`R5, R6 = SolveEquation(...)`)."""

    name: str = ""
    description: str = ""
    multi_output: bool = False
    timeout_s: float | None = None  # None: the registry's default

    def __call__(self, args: str, ctx: ToolContext) -> Any:  # pragma: no cover - interface
        raise NotImplementedError


class FunctionTool(Tool):
    """A tool from a plain function `fn(args, ctx) -> value`."""

    def __init__(self, name: str, fn: Callable[[str, ToolContext], Any], multi_output: bool = False,
                 timeout_s: float | None = None, description: str = ""):
        self.name, self._fn, self.multi_output = name, fn, multi_output
        self.timeout_s, self.description = timeout_s, description

    def __call__(self, args, ctx):
        return self._fn(args, ctx)


class ToolRegistry:
    """name -> Tool, with a default per-call timeout."""

    def __init__(self, tools: list[Tool] | None = None, default_timeout_s: float = 30.0):
        self._tools: dict[str, Tool] = {}
        self.default_timeout_s = default_timeout_s
        for t in tools or []:
            self.register(t)

    def register(self, tool: Tool) -> None:
        if not tool.name:
            raise ValueError(f"tool {tool!r} has no name")
        self._tools[tool.name] = tool

    def get(self, name: str) -> Tool:
        if name not in self._tools:
            known = ", ".join(sorted(self._tools)) or "none"
            raise UnknownTool(f"unknown tool {name!r} (available: {known})")
        return self._tools[name]

    def __contains__(self, name: str) -> bool:
        return name in self._tools

    @property
    def names(self) -> list[str]:
        return sorted(self._tools)

    def timeout_for(self, name: str) -> float:
        t = self._tools.get(name)
        return t.timeout_s if t is not None and t.timeout_s is not None else self.default_timeout_s
