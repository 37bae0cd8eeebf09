"""Parsers for model output: the planner's stop decision and subgoals, and grounded actions.

Every function here accepts any string and never raises: the reference crashes a whole
sample on malformed output (LUMOS_SPEC §2); we turn each malformed piece into a value that
carries an `error`, which the execution module reports as an observation.
"""

from __future__ import annotations

import dataclasses
import re

STOP_MARK = "Yes, I will stop planning"
KEEP_MARK = "No, I will keep planning."
_SUBGOAL_SPLIT = re.compile(r"; (?=Subgoal \d+\s*:)")
_SUBGOAL_HEAD = re.compile(r"^Subgoal (\d+)\s*:")
_VARIABLE = re.compile(r"^(R\d+|Output)$")
_TOOL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class PlanStep:
    """One planner turn (Lumos-I): stop, or the next subgoal text ("Subgoal k: ...")."""

    stop: bool
    subgoal: str = ""
    error: str | None = None


def parse_plan_turn(text: str) -> PlanStep:
    """Stop decision and subgoal of an iterative planner output (reference rule: stop iff the
    output contains "Yes, I will stop planning"; the subgoal is the text after
    "No, I will keep planning."). Trailing spaces are kept: the training data has them."""
    if not isinstance(text, str):
        return PlanStep(stop=False, error=f"planner output is {type(text).__name__}, not text")
    if STOP_MARK in text:
        return PlanStep(stop=True)
    subgoal = text.split(KEEP_MARK)[-1].lstrip().rstrip("\r\n")
    if not subgoal.strip():
        return PlanStep(stop=False, error="planner output has no subgoal")
    return PlanStep(stop=False, subgoal=subgoal)


def parse_onetime_plan(text: str) -> list[str]:
    """Subgoals of a one-time plan ("Subgoal 1: ...; Subgoal 2: ..."), split only where a new
    "Subgoal k:" starts so a "; " inside a subgoal survives. Empty output gives []."""
    if not isinstance(text, str) or not text.strip():
        return []
    return [s for s in _SUBGOAL_SPLIT.split(text.strip("\r\n")) if s.strip()]


def subgoal_index(subgoal: str, default: int) -> int:
    """k of "Subgoal k: ..." (the model's own numbering), else `default`."""
    m = _SUBGOAL_HEAD.match(subgoal.strip())
    return int(m.group(1)) if m else default


def subgoal_body(subgoal: str) -> str:
    """The text after "Subgoal k: " (the whole text when there is no such head)."""
    s = subgoal.strip()
    pos = s.find(": ")
    return s[pos + 2:] if _SUBGOAL_HEAD.match(s) and pos >= 0 else s


@dataclasses.dataclass(frozen=True)
class Action:
    """One grounded action `VARS = Tool(args)`; `tool == ""` is a plain assignment
    (`Output = R9`), whose expression is in `args`. `error` is set when it cannot run."""

    raw: str
    outputs: tuple[str, ...] = ()
    tool: str = ""
    args: str = ""
    error: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def split_actions(text: str, plain: bool = False) -> list[str]:
    """Split a grounding output on "; " outside brackets (the reference splits on every
    "; "; ours keeps `QA([R1], Question: a; b)` whole). Unbalanced text falls back to the
    plain split so nothing is lost. `plain=True` is the reference's split (gsm:163)."""
    if not isinstance(text, str):
        return []
    text = text.strip()
    if not text:
        return []
    if plain:
        return [p.strip() for p in text.split("; ") if p.strip()]
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        ch = text[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and text.startswith("; ", i):
            parts.append(text[start:i])
            start = i + 2
            i += 2
            continue
        i += 1
    parts.append(text[start:])
    if depth != 0:
        parts = text.split("; ")
    return [p.strip() for p in parts if p.strip()]


def _matching_paren(text: str, open_pos: int) -> int:
    depth = 0
    for i in range(open_pos, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    return -1


def parse_action(text: str) -> Action:
    """One action by the reference's rule: variables before the first " = ", the tool name
    up to the first "(", arguments up to the matching ")"; a trailing " = value" (the
    converted-data style) is ignored."""
    raw = text if isinstance(text, str) else repr(text)
    s = raw.strip().rstrip(";").strip()
    if not s:
        return Action(raw=raw, error="empty action")
    eq = s.find(" = ")
    paren = s.find("(")
    if eq < 0 or (0 <= paren < eq):
        # No assignment: accept a bare `Tool(args)` call with no output variable.
        lhs, rhs = "", s
    else:
        lhs, rhs = s[:eq], s[eq + 3:]
    outputs = tuple(v.strip() for v in lhs.split(",")) if lhs else ()
    bad = [v for v in outputs if not _VARIABLE.match(v)]
    if bad:
        return Action(raw=raw, outputs=outputs, error=f"bad output variable {bad[0]!r} (expected R<n> or Output)")
    rhs = rhs.strip()
    paren = rhs.find("(")
    if paren < 0:
        if not outputs:
            return Action(raw=raw, error="not an action: expected 'VARS = Tool(args)'")
        expr = rhs.split(" = ")[0].strip()  # `Output = R9 = 40` assigns R9
        if not expr:
            return Action(raw=raw, outputs=outputs, error="empty assignment")
        return Action(raw=raw, outputs=outputs, tool="", args=expr)
    tool = rhs[:paren].strip()
    if re.fullmatch(r"R\d+", tool):
        # `Output = R1(R2)`: R1 with R2 substituted, evaluated like a plain assignment.
        expr = rhs.split(" = ")[0].strip() if _matching_paren(rhs, paren) >= 0 else rhs
        return Action(raw=raw, outputs=outputs, tool="", args=expr)
    if not _TOOL_NAME.match(tool):
        return Action(raw=raw, outputs=outputs, error=f"bad tool name {tool[:40]!r}")
    close = _matching_paren(rhs, paren)
    if close < 0:
        # The reference drops the last ")" it finds; we accept an unclosed call only when
        # nothing follows, so `Calculator(2 + (3` is an error but `Tool(a` runs on "a".
        return Action(raw=raw, outputs=outputs, tool=tool, error="unbalanced parentheses")
    args = rhs[paren + 1:close]
    rest = rhs[close + 1:].strip()
    if rest and not rest.startswith("=") and rest.strip(". ") != "":
        return Action(raw=raw, outputs=outputs, tool=tool, args=args,
                      error=f"unexpected text after the call: {rest[:40]!r}")
    return Action(raw=raw, outputs=outputs, tool=tool, args=args)


def parse_actions(text: str, plain_split: bool = False) -> list[Action]:
    """All actions of a grounding output, in order (possibly with errors)."""
    parts = split_actions(text, plain_split)
    if not parts:
        return [Action(raw=text if isinstance(text, str) else repr(text), error="no actions in grounding output")]
    return [parse_action(p) for p in parts]
