"""Maths tools: offline stand-ins for the reference's WolframAlpha calls, safe on hostile text.

    maths_tools(protocol="robust", limits=Limits(), server=None) -> [Calculator, SetEquation,
        SolveEquation, SolveInequality, Define, Count]

Safety: formulas are read by our own tokenizer and recursive-descent parser
(`maths_parse.py`), which builds sympy objects directly — no `eval`, `sympify` or
`parse_expr` ever sees model or tool text — and checks sizes (digits, exponents, factorials,
nesting, expansion terms, value lengths) before sympy works. Every call runs in a child of
a fork server (`limits.ForkServer`) under RLIMIT_CPU / RLIMIT_AS and a wall-clock kill, so
a hang or a memory blow-up is an error observation (`timeout`, `resource_limit`) within
the limit + 2 s and never stalls the agent's other threads. The parent sends only the
argument text and the text of the variables it names.

Results read as the reference's data writes WolframAlpha answers: integers plainly, a
decimal when the input had decimals or percentages (`1 - 25%` -> 0.75), a fraction
otherwise (`1 - 2/5` -> 3/5), symbolic results over one denominator with implicit products
(`40% * p` -> 2p/5). `%` after an operand is a percentage, `a % b` the remainder.

`protocol="robust"` (default, our behaviour):
  - variables inside a formula become `(value)` (a lone variable, a number or a one-letter
    value plainly) in every tool, Define and SetEquation included; numbers are pulled out
    of prose values (a QA answer "about 25 people" -> 25);
  - a multi-letter name is one symbol unless all its letters are also used alone;
  - symbolic results are not expanded (`(n - 2)^2`); SolveEquation returns every root
    (`-3, 3`) and stripped values; SetEquation checks that its equation can be read.

`protocol="reference"` (what allenai/lumos eval/gsm stores, for reference-exact scores):
  - substitution exactly as gsm/run_eval.py:19-35: plain `str(value)` when the arguments
    hold `R<n>(` or none of `* / + - ^`, else `(value)` (`:(value):` for equations, which
    Calculator combines side by side as gsm/utils.py:54-70);
  - implicit multiplication of letters as WolframAlpha reads it (`xy` -> x*y);
  - Calculator on symbolic input expands (`Expand x` first, math_tool.py:22-31) and writes
    the result over one denominator: `(n-2)^2` -> n^2 - 4n + 4, `25% * (p + 600)` ->
    (p + 600)/4; an all-digit input is returned as is (math_tool.py:17-18);
  - SolveEquation values are the text after `=` of each ` ∧ `-separated solution,
    unstripped (` 1000`, gsm:47-51; an expression without `=` gives `110`), one value per
    unknown (a list when several: the caller joins them with ", " as gsm:182 does); a `±`
    pair keeps the ` + a` root (gsm:44-46); other multi-root answers are an error (the
    reference cannot store WolframAlpha's list);
  - SetEquation and Define return the substituted text unread (math_tool.py:33-46).
  Count, SolveInequality and Code are never executed by the reference (gsm:18); the
  executor decides that under its protocol, these tools stay available.
"""

from __future__ import annotations

import threading

from lumos_jax.agent.tools.base import BadArguments, Tool, ToolContext, VARIABLE_RE, value_text
from lumos_jax.agent.tools.limits import ForkServer, Limits
from lumos_jax.agent.tools.maths_core import MAX_VALUE, PROTOCOLS

_CORE = "lumos_jax.agent.tools.maths_core"
MAX_ARGS = 2_000  # characters of an action's argument text
MAX_VARIABLE = 4 * MAX_VALUE  # characters of a variable's text sent to the worker
_server: ForkServer | None = None
_server_lock = threading.Lock()


def maths_server() -> ForkServer:
    """The process-wide fork server for maths (started on first use, warmed in the background)."""
    global _server
    with _server_lock:
        if _server is None:
            _server = ForkServer((_CORE,))
            _server.start()
        return _server


class MathsTool(Tool):
    """A maths tool: checks sizes, sends the call to the limited worker, returns its value."""

    timeout_s = 0  # the worker enforces its own limits; no abandoned thread in the executor

    def __init__(self, protocol: str = "robust", limits: Limits | None = None, server: ForkServer | None = None):
        if protocol not in PROTOCOLS:
            raise ValueError(f"maths_tools: protocol={protocol!r}, expected one of {PROTOCOLS}")
        self.protocol, self.limits, self._server = protocol, limits or Limits(), server

    def __call__(self, args: str, ctx: ToolContext):
        if len(args) > MAX_ARGS:
            raise BadArguments(f"{self.name}: arguments longer than {MAX_ARGS} characters")
        variables = {}
        for name in VARIABLE_RE.findall(args):
            text = value_text(ctx.value(name))
            if len(text) > MAX_VARIABLE:
                raise BadArguments(f"{self.name}: the value of {name} is {len(text)} characters "
                                   f"(limit {MAX_VARIABLE})")
            variables[name] = text
        server = self._server or maths_server()
        return server.call(f"{_CORE}:run_tool", [self.name, args, variables, self.protocol], self.limits)


class Calculator(MathsTool):
    name = "Calculator"
    description = "Calculate the input formula"


class SetEquation(MathsTool):
    name = "SetEquation"
    description = "Set up an equation to be solved"


class SolveEquation(MathsTool):
    """One unknown -> its value; several -> one value per unknown (sorted by name), so
    `R5, R6 = SolveEquation(...)` assigns both."""

    name = "SolveEquation"
    description = "Solve the previous set equation"
    multi_output = True


class SolveInequality(MathsTool):
    name = "SolveInequality"
    description = "Solve the previous set inequality"


class Define(MathsTool):
    name = "Define"
    description = "Define a variable or a number for latter usage"


class Count(MathsTool):
    name = "Count"
    description = "Count the number of elements in the given list"


def maths_tools(protocol: str = "robust", limits: Limits | None = None,
                server: ForkServer | None = None) -> list[Tool]:
    """The maths tool set under `protocol` ('robust' or 'reference', see the module docstring)."""
    return [cls(protocol, limits, server) for cls in (Calculator, SetEquation, SolveEquation, SolveInequality,
                                                       Define, Count)]
