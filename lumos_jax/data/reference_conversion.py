"""Converted subgoal plans → the four Lumos training annotation types.

Reimplements the rules of the reference's `data/process_for_train.py` (plan/ground ×
iterative/one-time) so that its output is reproduced byte for byte, quirks included:
- the action-line parser works on string offsets (`" = "`, first `(`, matching `)`), with
  the reference's fallbacks for `Output = R9 = 40` and unmatched parentheses;
- iterative data renames `Output` to `R{n+1}` where n is the last `R` index seen — and
  that index carries over from earlier rows of the same file, as in the reference;
- rows whose subgoal has no action, or whose last variable cannot be read, are dropped
  (iterative formulations only), and counted in the returned stats;
- web feedback turns read `We have already {subgoal}`; complex-QA grounding turns append
  `The grounding could be based on the following results:` with every earlier result,
  ordered by the string `Subgoal k` (so `Subgoal 10` sorts before `Subgoal 2`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, NamedTuple

from lumos_jax.data.records import write_jsonl_atomic
from lumos_jax.jsonl import iter_jsonl

DOMAINS = ("maths", "complex_qa", "web_agent")
MODULES = ("plan", "ground")
FORMULATIONS = ("iterative", "onetime")

PLAN_PROMPT = ("Please provide a reasonable subgoal-based plan to solve the given task.\n"
               "Task: {task}; Initial Environment Description: None.")
GROUND_INSTRUCTION = ("Please ground the given subgoal to corresponding executable actions for solving "
                      "the given task. The grounded actions must be the one in available action list.\n\n")
ACTION_LISTS = {
    "maths": (
        "The available action list is 'Calculator', 'SetEquation', 'SolveEquation', 'Count', "
        "'SolveInequality', 'Code', and 'Define'.\n"
        "Calculator(formula): Calculate the input formula; SetEquation(equation): Set up an equation "
        "to be solved; SolveEquation(equation): Solve the previous set equation; Count(list): Count the "
        "number of elements in the given list; SolveInequality(inequality): Solve the previous set "
        "inequality; Code(pseudo_code): Generate a Python function that corresponds to the pseudo code; "
        "Define(variable/number): Define a variable or a number for latter usage.\n\n"),
    "complex_qa": (
        "The available action list is 'KnowledgeQuery', 'ParagraphRetrieve', 'QA', 'Calculator', and "
        "'Code'.\n"
        "Calculator(formula): Calculate the input formula; KnowledgeQuery(query): Capture the relevant "
        "webpages according to the query; ParagraphRetrieve(context, query): Given a query, retrieve the "
        "most relevant paragraphs from the given context; QA(context, query): Given context, answer the "
        "given query; Calculator(formula): Calculate the input formula; Code(pseudo_code): Generate a "
        "Python function that corresponds to the pseudo code.\n\n"),
    "web_agent": (
        "The available action list is 'CLICK', 'TYPE', 'SELECT'.\n"
        "CLICK(Env, Query): Click the relevant html region in Env according to Query; TYPE(Env, Query, "
        "Text): Type Text into the relevant html region in Env according to Query; SELECT(Env, Query, "
        "Text): Select the value Text of the relevant selection box in Env according to Query.\n\n"),
}


class Action(NamedTuple):
    variables: list[str]
    name: str
    args: str
    result: str

    def render(self) -> str:
        return f"{', '.join(self.variables)} = {self.name}({self.args})"


def split_subgoal_plan(plan: str) -> tuple[list[str], list[list[str]]]:
    """(subgoal lines, action lines per subgoal) of a `Subgoal 1: ...` block text."""
    blocks = plan[plan.find("Subgoal 1"):].split("\n\n")
    lines = [b.split("\n") for b in blocks]
    return [b[0] for b in lines], [b[1:] for b in lines]


def _matching_paren(line: str, open_at: int) -> int:
    """Offset where the bracket run starting at `open_at` balances (reference scan)."""
    depth, at = 0, open_at - 1
    for ch in line[open_at:]:
        at += 1
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            break
    return at


def parse_action_line(line: str, domain: str) -> Action:
    """`Action k-j: R1 = Tool(args) = result` → Action, with the reference's offsets."""
    eq = line.find(" = ")
    name_at = eq + 3
    paren = line.find("(")
    variables = line[line.find(":") + 2: name_at - 3].split(", ")
    name = line[name_at:paren]
    if domain == "web_agent":
        return Action(variables, name, line[line.find("(") + 1: line.rfind(")")], "")
    close = _matching_paren(line, paren)
    last_eq = line.rfind(" = ")
    if close + 2 >= len(line):
        args = line[paren + 1: line.rfind(")")]
        result = args
    elif close == paren:  # no call: a plain assignment such as `Output = R9 = 40`
        name = ""
        args = line[name_at:last_eq].strip()
        result = line[last_eq + 3:].strip()
    elif line[close + 2] != "=":  # brackets don't balance before the result
        args = line[paren + 1: last_eq - 1]
        result = line[last_eq + 3:].strip()
    else:
        args = line[paren + 1: close]
        result = line[close + 3:].strip()
    return Action(variables, name, args, result)


class _RIndex:
    """The last `R{n}` index seen; carries across rows of a file like the reference's variable."""

    def __init__(self):
        self.value = None

    def update_or_rename(self, variable: str, text: str) -> str:
        """Record `R{n}`, or rename `Output` in text to `R{last+1}`; raises if impossible."""
        if variable[0] == "R":
            self.value = int(variable[1:])
            return text
        if self.value is None:
            raise LookupError("no earlier R variable")
        return text.replace("Output", "R" + str(self.value + 1))


def plan_messages(row: dict, domain: str, formulation: str, r_index: _RIndex) -> list[dict] | None:
    subgoals, actions = split_subgoal_plan(row["subgoal_plan"])
    messages = [{"role": "user", "content": PLAN_PROMPT.format(task=row["task"])}]
    if formulation == "onetime":
        messages.append({"role": "assistant", "content": "; ".join(subgoals)})
        return messages
    for j, (subgoal, acts) in enumerate(zip(subgoals, actions)):
        if not acts:
            return None
        if domain == "web_agent":
            done = subgoal[subgoal.find(": ") + 2:]
            done = done[0].lower() + done[1:]
            feedback = f"We have already {done}".strip(".")
        else:
            last = acts[-1]
            feedback = f"The executed result for Subgoal {j + 1} is " + last[last.rfind("=") + 2:].strip().strip(".")
        feedback = feedback.strip() + ". Should we stop planning?"
        try:
            variable = acts[-1].split(" = ")[0].split(":")[1].strip().split(", ")[-1]
            feedback = r_index.update_or_rename(variable, feedback)
        except (IndexError, ValueError, LookupError):
            return None
        content = subgoal if j == 0 else "No, I will keep planning. " + subgoal
        messages.append({"role": "assistant", "content": content})
        messages.append({"role": "user", "content": feedback})
    messages.append({"role": "assistant", "content": "Yes, I will stop planning."})
    return messages


def ground_messages(row: dict, domain: str, formulation: str, r_index: _RIndex) -> list[dict] | None:
    subgoals, actions = split_subgoal_plan(row["subgoal_plan"])
    instruction = GROUND_INSTRUCTION + ACTION_LISTS[domain] + f"Task: {row['task']} \n"
    if formulation == "onetime":
        rendered = [parse_action_line(a, domain).render() for acts in actions for a in acts]
        return [{"role": "user", "content": instruction + f"Subgoals to be grounded: {'; '.join(subgoals)}\n"},
                {"role": "assistant", "content": "; ".join(rendered)}]
    messages, results = [], {}
    for j, (subgoal, acts) in enumerate(zip(subgoals, actions)):
        if not acts:
            return None
        if j == 0:
            user = instruction + f"Subgoal to be grounded: {subgoal}\n"
        elif domain == "complex_qa":
            user = f"Subgoal to be grounded: {subgoal} The grounding could be based on the following results:"
            user += "".join(f" The execution result for {k} is {results[k]}" for k in sorted(results))
            user += "\n"
        else:
            user = f"Subgoal to be grounded: {subgoal}\n"
        parsed = [parse_action_line(a, domain) for a in acts]
        results[subgoal[:subgoal.find(":")]] = parsed[-1].result
        assistant = "; ".join(p.render() for p in parsed)
        try:
            assistant = r_index.update_or_rename(parsed[-1].variables[-1], assistant)
        except (IndexError, ValueError, LookupError):
            return None
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    return messages


class ConversionStats(NamedTuple):
    written: int
    dropped: int


def convert_rows(rows: Iterable[dict], domain: str, module: str, formulation: str) -> tuple[list[str], ConversionStats]:
    """JSONL lines (as the reference writes them) of one annotation type, plus counts."""
    if domain not in DOMAINS:
        raise ValueError(f"domain {domain!r}: expected one of {DOMAINS}")
    if module not in MODULES or formulation not in FORMULATIONS:
        raise ValueError(f"module/formulation {module}/{formulation}: expected {MODULES} x {FORMULATIONS}")
    build = plan_messages if module == "plan" else ground_messages
    r_index, lines, dropped = _RIndex(), [], 0
    for row in rows:
        messages = build(row, domain, formulation, r_index)
        if messages is None:
            dropped += 1
            continue
        record = {"dataset": domain, "id": f"{domain}_{len(lines)}", "messages": messages}
        lines.append(json.dumps(record))
    return lines, ConversionStats(len(lines), dropped)


def read_converted(paths: Iterable[str | Path]) -> list[dict]:
    """Rows `{task, subgoal_plan, ...}` of converted files, in the given order."""
    rows = []
    for path in paths:
        for n, row in iter_jsonl(path):
            if not isinstance(row, dict) or not isinstance(row.get("task"), str) \
                    or not isinstance(row.get("subgoal_plan"), str):
                raise ValueError(f"{path}:{n}: a converted row needs string 'task' and 'subgoal_plan'")
            rows.append(row)
    return rows


def convert_domain(paths: Iterable[str | Path], domain: str, out_dir: str | Path) -> dict[str, ConversionStats]:
    """Write `lumos_{domain}_{module}_{formulation}.jsonl` (all four) into out_dir."""
    rows = read_converted(paths)
    stats = {}
    for module in MODULES:
        for formulation in FORMULATIONS:
            lines, st = convert_rows(rows, domain, module, formulation)
            name = f"lumos_{domain}_{module}_{formulation}.jsonl"
            write_jsonl_atomic(Path(out_dir) / name, lines)
            stats[name] = st
    return stats
