"""The reference protocol's execution module: run grounded actions the way the reference's
`eval/{gsm,svamp,hotpotqa,strategyqa}/run_eval.py` does, so a sample it would drop is dropped.

What differs from the robust executor (`execution.py`), each with the reference's lines:
- maths (gsm:14-57,163-186): only "", Calculator, SetEquation, SolveEquation and Define run;
  Count, SolveInequality and Code return None there, the unpack raises, and so does any failed
  or empty result: the sample is *void* (no prediction). One-time strips every stored value
  (gsm:296-299); iterative stores SolveEquation roots as cut after "=", i.e. with a leading
  space (gsm:49-50,171). A plain assignment stores the substituted text, uncomputed.
- complex QA (hotpotqa:81-195,296-306; strategyqa:25-126,227-238): a tool outside the list
  (Code included: it falls through to None) voids the sample; a failing tool returns ("", "")
  inside `execute`, so iterative goes on with an empty result, while one-time cannot read
  its final variable and the sample is void.
- the planner is told the text after the last "=" of `"{action} = {result}"` for the last
  action (gsm:105,180-182; hotpotqa:235,306), multi-outputs joined by ", ".
Where the reference crashes the whole run (HotpotQA's `str + list` when a subgoal ends with
KnowledgeQuery, StrategyQA one-time's unguarded unpack) we do what the code evidently
intended: `str()` of the result, and a void sample.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

from lumos_jax.agent.execution import ActionRecord, Executor, _clip, call_with_timeout
from lumos_jax.agent.parsing import Action
from lumos_jax.agent.tools.base import ToolContext, ToolError, value_text

MATHS_TOOLS = ("", "Calculator", "SetEquation", "SolveEquation", "Define")        # gsm:18
COMPLEX_QA_TOOLS = ("", "KnowledgeQuery", "ParagraphRetrieve", "QA", "Calculator")  # strategyqa:30
_REF_VARIABLE = re.compile(r"R[0-9]+")       # gsm/utils.py:78-82 (no word boundary)
_FUNC_CALL = re.compile(r"R[0-9]+\(")        # gsm/utils.py:94-98
_MATH_OPS = ("*", "/", "+", "-", "^")        # gsm/utils.py:8


@dataclasses.dataclass
class ReferenceOutcome:
    """The actions' records; `void` says why the reference would drop the sample (None: it
    would not); `feedback` is the planner's result text; `last_value` the last action's value."""

    records: list[ActionRecord]
    void: str | None = None
    feedback: str = ""
    last_value: Any = ""


def feedback_text(action_text: str, value: Any, join_lists: bool = True) -> str:
    """`(action + " = " + result).split('=')[-1].strip()` (gsm:105,180-182); a list result is
    ", "-joined (maths) or, in complex QA, `str()` of the list (strategyqa:238)."""
    if isinstance(value, (list, tuple)):
        texts = [value_text(v) for v in value]
        shown = ", ".join(texts) if join_lists else str(texts)
    else:
        shown = str(value)
    return f"{action_text} = {shown}".split("=")[-1].strip()


def reference_substitute(args: str, variables: dict) -> str:
    """gsm:19-35: plain `str.replace` in order when the text calls `R1(` or has no operator,
    else each variable as `(v)`, or `:(v):` when its value is an equation."""
    names = _REF_VARIABLE.findall(args)
    out = args
    plain = bool(_FUNC_CALL.search(args)) or not any(op in args for op in _MATH_OPS)
    for name in names:
        if name not in variables:
            raise KeyError(name)
        v = str(variables[name])
        out = out.replace(name, v if plain else (f":({v}):" if "=" in v else f"({v})"))
    return out


def solve_roots(value: Any) -> list[str]:
    """gsm:43-50: one root of a "±" pair kept as " + ", split on " ∧ ", text after "="."""
    if isinstance(value, (list, tuple)):
        parts = [value_text(v) for v in value]
    else:
        text = value_text(value)
        if "±" in text:
            terms = text.split("±")
            text = f"{terms[0]} + {terms[1]}"
        parts = text.split(" ∧ ")
    return [p[p.find("=") + 1:] for p in parts]


class ReferenceExecutor:
    """Runs one grounding output's actions under the reference protocol (module docstring)."""

    def __init__(self, executor: Executor, domain: str, formulation: str, yes_no: bool = False):
        self.executor, self.domain, self.formulation, self.yes_no = executor, domain, formulation, yes_no

    def run(self, actions: list[Action], ctx: ToolContext) -> ReferenceOutcome:
        if self.domain == "maths":
            return self._run(actions, ctx, self._maths, join_lists=True)
        if self.domain == "complex_qa":
            return self._run(actions, ctx, self._complex_qa, join_lists=False)
        records = self.executor.run(actions, ctx)
        return ReferenceOutcome(records, feedback=records[-1].observation if records else "")

    def _run(self, actions, ctx, step, join_lists: bool) -> ReferenceOutcome:
        out = ReferenceOutcome([])
        for k, a in enumerate(actions):
            rec = ActionRecord(raw=a.raw, outputs=list(a.outputs), tool=a.tool, args=a.args)
            start = time.perf_counter()
            void, value = step(a, k, len(actions), ctx, rec)
            rec.seconds = time.perf_counter() - start
            out.records.append(rec)
            if void:
                rec.error_kind = rec.error_kind or "voided"
                rec.error = rec.error or void
                rec.observation = _clip(f"Error ({rec.error_kind}): {rec.error}")
                out.void = f"{a.raw.strip()[:80]}: {void}"
                return out
            rec.result = value
            rec.observation = _clip(value_text(value))
            out.last_value = value
            out.feedback = feedback_text(a.raw.strip(), value, join_lists)
        return out

    def _call(self, a: Action, ctx: ToolContext, rec: ActionRecord, **kw) -> tuple[Any, str | None]:
        """(value, None) or (None, error text); the record keeps the error's kind."""
        try:
            if kw:
                tool = self.executor.registry.get(a.tool)
                fn = tool.reference_call if a.tool == "QA" else tool
                return call_with_timeout(lambda: fn(a.args, ctx, **kw), self.executor.registry.timeout_for(a.tool)), None
            return self.executor.call(a, ctx), None
        except ToolError as e:
            rec.error_kind = e.kind
            return None, str(e) or type(e).__name__
        except Exception as e:  # noqa: BLE001 - the reference's bare `except`
            rec.error_kind = "tool_exception"
            return None, f"{type(e).__name__}: {e}"

    def _maths(self, a: Action, k: int, n: int, ctx: ToolContext, rec: ActionRecord):
        if a.error:
            return a.error, None
        if not a.outputs:  # gsm/utils.py:109-113 then reads the name from the wrong offset
            rec.error_kind = "unsupported_tool"
            return "no ' = ': the reference reads no tool name", None
        if a.tool not in MATHS_TOOLS:
            rec.error_kind = "unsupported_tool"
            return f"the reference runs only {', '.join(t or '=' for t in MATHS_TOOLS)} (gsm:18)", None
        if a.tool == "":
            try:
                value, err = reference_substitute(a.args, ctx.variables), None
            except KeyError as e:
                rec.error_kind, value, err = "undefined_variable", None, f"undefined variable {e.args[0]}"
        else:
            value, err = self._call(a, ctx, rec)
        if err:
            return err, None
        onetime = self.formulation == "onetime"
        if a.tool == "SolveEquation":
            roots = solve_roots(value)
            if not roots or len(roots) < len(a.outputs):
                return f"{len(a.outputs)} output variables but {len(roots)} roots", None
            if onetime:
                roots = [r.strip() for r in roots]
            for name, root in zip(a.outputs, roots):
                ctx.variables[name] = root
            return None, roots
        if not value:
            return "empty result", None
        text = value_text(value)
        if a.outputs:
            ctx.variables[a.outputs[0]] = text.strip() if onetime else text
        return None, text

    def _complex_qa(self, a: Action, k: int, n: int, ctx: ToolContext, rec: ActionRecord):
        onetime = self.formulation == "onetime"
        if a.tool not in COMPLEX_QA_TOOLS or not a.outputs:  # no " = ": no readable name either
            rec.error_kind = "unsupported_tool"
            return f"the reference runs only {', '.join(t or '=' for t in COMPLEX_QA_TOOLS)}", None
        kw = {}
        if onetime and k == n - 1 and a.tool in ("QA", "Calculator"):
            # hotpotqa:410-411 asks the last step with the original question;
            # strategyqa:78-80,119-120 appends " Must answer yes/no." when k > 0.
            kw = {"yes_no": k > 0} if self.yes_no else {"orig_question": ctx.task}
        value, err = (None, a.error or "plain assignment") if a.error or a.tool == "" else self._call(a, ctx, rec, **kw)
        if err is None and value is None:
            rec.error_kind = "no_answer"
            return "Calculator-as-QA found no answer and has no fallback (hotpotqa:171-191)", None
        if err is not None:
            if onetime:  # results[""] = "": the final variable cannot be read
                return err, None
            rec.error_kind = rec.error_kind or "parse_error"
            rec.error, value = err, ""
            ctx.variables[""] = ""
            return None, value
        if a.outputs:
            ctx.variables[a.outputs[0]] = value
        return None, value
