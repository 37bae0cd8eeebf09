"""GSM8K rationales → converted subgoal plans, without an LLM teacher.

Calculations the rationale writes out without a mark ("4+6=10") get one first, when the
written result checks out. Each rationale line with calculator marks `<<expr=value>>` becomes one subgoal; its text is
the line with the marks folded back into plain expressions ("She sold 48/2 clips in May."),
and each mark becomes an action `R{n} = Calculator(expr)`, where a number equal to an
earlier mark's value is replaced by that result's variable (most recent first) unless the
question itself states that number. Every
action is then executed in order by an executor — by default the agent's own
`Calculator` tool (`lumos_jax.agent.tools.maths`, sympy-based), so the results written into
the plans read exactly as the execution module will report them at inference; a plain sympy
executor is the fallback — with the variables bound to the results computed so far. A
problem counts as executed when the last result equals the `#### answer`. Failures are kept
with a reason.
"""

from __future__ import annotations

import collections
import re
from fractions import Fraction
from pathlib import Path
from typing import Callable, NamedTuple

import sympy

from lumos_jax.agent.tools.base import ToolContext, ToolError
from lumos_jax.agent.tools.maths import Calculator
from lumos_jax.agent.tools.maths_parse import parse_math
from lumos_jax.jsonl import iter_jsonl

MARK = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?|\.\d+)(?![\w.])")
VARIABLE = re.compile(r"\bR(\d+)\b")
SAFE_EXPR = re.compile(r"^[\d\s.+\-*/()R%]*$")
# An unmarked calculation written out in the text: "4+6=10", "$40 − $4 = $36", "10 × $4 = 40".
_OPERAND = r"\(?\s*\$?\d[\d,]*(?:\.\d+)?%?\s*\)?"
PLAIN_CALC = re.compile(rf"((?:{_OPERAND}\s*[-+*/×x÷−–]\s*)+{_OPERAND})\s*=\s*\$?\s*(\d[\d,]*(?:\.\d+)?)")
_OPERATORS = str.maketrans({"×": "*", "x": "*", "÷": "/", "−": "-", "–": "-", "$": None, ",": None})


class Conversion(NamedTuple):
    ok: bool
    reason: str  # "" when ok
    row: dict | None  # converted row {task, natural_language_plan, subgoal_plan, ans}
    executed: bool  # every action ran and the last result equals the answer


def parse_number(text: str) -> Fraction | None:
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def sympy_calculator(expression: str) -> Fraction:
    """Exact value of an arithmetic expression (numbers, + - * / ( ) and %), read by the
    maths tools' parser (no `sympify`: `9**9**9**9` must be refused, not computed)."""
    if not SAFE_EXPR.match(expression) or "R" in expression:
        raise ValueError(f"not plain arithmetic: {expression!r}")
    try:
        value = parse_math(expression.replace("%", "/100"))
    except ToolError as e:
        raise ValueError(f"{e} ({expression[:60]!r})") from None
    if not value.is_number or not value.is_finite:
        raise ValueError(f"no finite value: {expression!r}")
    value = sympy.nsimplify(value)
    if not value.is_rational:
        raise ValueError(f"irrational result: {expression!r}")
    return Fraction(int(value.p), int(value.q))


def format_value(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    as_float = float(value)
    return f"{as_float:.10g}" if Fraction(f"{as_float:.10g}") == value else f"{value.numerator}/{value.denominator}"


def mark_plain_calculations(line: str, calculator: Callable[[str], Fraction]) -> tuple[str, int]:
    """A line without marks, with each written-out calculation that checks out given a mark."""
    if MARK.search(line):
        return line, 0
    added = 0

    def repl(m):
        nonlocal added
        expression = m.group(1).translate(_OPERATORS).strip()
        value = parse_number(m.group(2))
        try:
            ok = value is not None and calculator(expression) == value
        except (ValueError, ZeroDivisionError, TypeError, SyntaxError):
            ok = False
        if not ok:
            return m.group(0)
        added += 1
        return f"{m.group(1).rstrip()} = <<{expression}={m.group(2).replace(',', '')}>>{m.group(2)}"

    return PLAIN_CALC.sub(repl, line), added


def _subgoal_text(line: str) -> str:
    """The sentence with each mark folded into its expression and its echoed value dropped."""
    out, at = [], 0
    for m in MARK.finditer(line):
        before = line[at:m.start()]
        after_at = m.end()
        echoed = line[after_at:after_at + len(m.group(2))]
        if echoed == m.group(2):
            after_at += len(echoed)
        shown = re.search(r"\s*=\s*\$?\s*$", before)
        if shown:  # "48/2 = <<48/2=24>>24" → "48/2"
            out.append(before[:shown.start()])
        else:  # "has <<5*2=10>>10 apples" → "has 5*2 apples"
            out.append(before.rstrip("$") + m.group(1).strip())
        at = after_at
    out.append(line[at:])
    return re.sub(r"\s+", " ", "".join(out)).strip()


def _substitute(expression: str, earlier: list[tuple[str, Fraction]], literals: set[Fraction]) -> str:
    """Numbers equal to an earlier result become its variable, unless the question states them."""
    def repl(m):
        value = parse_number(m.group(1))
        if value in literals:
            return m.group(1)
        for name, v in reversed(earlier):
            if value is not None and v == value:
                return name
        return m.group(1)

    return NUMBER.sub(repl, expression.strip())


Executor = Callable[[str, dict], str]  # (expression with R variables, {R: result text}) → result text


def sympy_executor(expression: str, variables: dict) -> str:
    bound = VARIABLE.sub(lambda v: f"({variables[v.group(0)]})", expression)
    return format_value(sympy_calculator(bound))


def agent_executor() -> Executor:
    """The agent's Calculator tool, called as the execution module calls it."""
    calculator = Calculator()

    def run(expression: str, variables: dict) -> str:
        return str(calculator(expression, ToolContext(variables=dict(variables), domain="maths")))

    run.__name__ = "lumos_jax.agent.tools.maths.Calculator"
    return run


def default_executor() -> Executor:
    try:
        return agent_executor()
    except ImportError:
        return sympy_executor


def convert_problem(problem: dict, executor: Executor | None = None,
                    calculator: Callable[[str], Fraction] = sympy_calculator) -> Conversion:
    question, answer = problem.get("question"), problem.get("answer")
    if not isinstance(question, str) or not isinstance(answer, str) or "####" not in answer:
        return Conversion(False, "missing_question_or_answer_line", None, False)
    rationale, _, final = answer.rpartition("####")
    gold = parse_number(final)
    if gold is None:
        return Conversion(False, "unreadable_final_answer", None, False)
    earlier: list[tuple[str, Fraction]] = []  # (variable, mark value) for substitution
    literals = {parse_number(x) for x in re.findall(r"\d[\d,]*(?:\.\d+)?|\.\d+", question)}
    blocks, actions_total, plain, last_line_marked = [], 0, 0, False
    for line in (ln.strip() for ln in rationale.strip().split("\n")):
        line, added = mark_plain_calculations(line, calculator)
        plain += added
        marks = list(MARK.finditer(line))
        last_line_marked = bool(marks)
        if not marks:
            continue
        actions = []
        for m in marks:
            mark_value = parse_number(m.group(2))
            expression = _substitute(m.group(1), earlier, literals)
            if mark_value is None or not expression or not SAFE_EXPR.match(expression):
                return Conversion(False, "unparsable_mark", None, False)
            actions_total += 1
            name = f"R{actions_total}"
            actions.append((name, expression, m.group(2).strip()))
            earlier.append((name, mark_value))
        blocks.append((_subgoal_text(line), actions))
    if not blocks:
        return Conversion(False, "no_calculation_marks", None, False)

    # Execute every action with the variables bound to computed (not annotated) results.
    executor = executor or default_executor()
    texts: dict[str, str] = {}
    values: dict[str, Fraction | None] = {}
    executed, lines_out, reason = True, [], ""
    for k, (text, actions) in enumerate(blocks, 1):
        lines_out.append(f"Subgoal {k}: {text}")
        for j, (name, expression, shown) in enumerate(actions, 1):
            result_text = shown
            if executed:
                try:
                    result_text = executor(expression, texts).strip()
                    texts[name], values[name] = result_text, parse_number(result_text)
                except Exception as e:  # any tool failure is a reason, never a crash
                    executed, reason = False, f"calculator_error: {type(e).__name__}"
                    result_text = shown
            lines_out.append(f"Action {k}-{j}: {name} = Calculator({expression}) = {result_text}")
        lines_out.append("")
    last = f"R{actions_total}"
    if executed and values.get(last) != gold:
        executed = False
        if gold in values.values():
            reason = "answer_is_an_earlier_result"  # the rationale's last step is a lookup or unmarked
        elif not last_line_marked:
            reason = "final_step_unmarked"  # the last step is in words or in a form we don't parse
        else:
            reason = "final_value_differs_from_answer"  # rounding, units or an annotation error
    row = {"task": question, "natural_language_plan": " ".join(rationale.strip().split("\n")),
           "subgoal_plan": "\n".join(lines_out).strip().replace("\n\n\n", "\n\n"),
           "ans": final.strip(), "unmarked_calculations": plain}
    return Conversion(True, reason, row, executed)


class GSM8KReport(NamedTuple):
    total: int
    converted: int
    executed: int
    failures: dict  # reason → count (conversion failures and execution failures)
    examples: dict  # reason → first few line numbers
    executor: str  # which calculator executed the actions


def convert_file(path: str | Path, executor: Executor | None = None) -> tuple[list[dict], GSM8KReport]:
    """Converted rows of every problem that converts, plus a report of rates and reasons."""
    executor = executor or default_executor()
    rows, failures, examples = [], collections.Counter(), collections.defaultdict(list)
    total = executed = 0
    for n, problem in iter_jsonl(path, bad="mark"):  # a line that is not JSON fails as {}
        total += 1
        result = convert_problem(problem if isinstance(problem, dict) else {}, executor)
        if result.row is not None:
            rows.append(result.row)
        executed += result.executed
        if result.reason:
            failures[result.reason] += 1
            if len(examples[result.reason]) < 5:
                examples[result.reason].append(n)
    report = GSM8KReport(total, len(rows), executed, dict(failures), dict(examples),
                         getattr(executor, "__name__", str(executor)))
    return rows, report
