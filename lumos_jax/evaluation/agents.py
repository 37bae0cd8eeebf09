"""The agent seam of the evaluator, and scripted agents for tests.

An agent is any callable `agent(example) -> result`, or an object with
`run_batch(examples) -> results` (used when present, so a batched Lumos engine can advance
many episodes together). A result may be an `AgentResult`, a dict with at least `answer`, a
`(answer, trace)` tuple or a bare answer. `as_result` turns each into an `AgentResult`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lumos_jax.evaluation.datasets import Example
from lumos_jax.evaluation.metrics import parse_number, yes_no_gold
from lumos_jax.evaluation.mind2web import StepPrediction, oracle_predictions


@dataclass
class AgentResult:
    """One episode. `stopped` is False when the loop hit its round limit without the planner
    saying stop; `error` is the agent's own error kind (e.g. `parse_error`), if any."""

    answer: Any
    trace: list = field(default_factory=list)
    rounds: int = 0
    stopped: bool = True
    error: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def as_result(obj: Any) -> AgentResult:
    if isinstance(obj, AgentResult):
        return obj
    if isinstance(obj, dict) and "answer" in obj:
        known = {k: obj[k] for k in ("answer", "trace", "rounds", "stopped", "error") if k in obj}
        return AgentResult(**known)
    if isinstance(obj, tuple) and len(obj) == 2:
        return AgentResult(answer=obj[0], trace=list(obj[1] or []))
    for attr in ("answer", "final_answer"):
        if hasattr(obj, attr):
            return AgentResult(answer=getattr(obj, attr), trace=list(getattr(obj, "trace", []) or []),
                               rounds=int(getattr(obj, "rounds", 0) or 0),
                               stopped=bool(getattr(obj, "stopped", True)),
                               error=getattr(obj, "error", None))
    return AgentResult(answer=obj)


def _oracle_answer(example: Example, metric: str) -> Any:
    if metric == "yes_no":
        return "Answer: " + ("yes" if yes_no_gold(example.answer) else "no")
    if metric == "mind2web_step_sr":
        return oracle_predictions(example)
    if metric == "webshop_reward":
        return 1.0
    return example.answer


def _wrong_answer(example: Example, metric: str) -> Any:
    if metric == "numeric_match":
        value = parse_number(example.answer)
        return str((value or 0) + 1)
    if metric == "yes_no":
        return "Answer: " + ("no" if yes_no_gold(example.answer) else "yes")
    if metric == "mind2web_step_sr":
        wrong = {}
        for step, gold in zip(example.meta["steps"], example.answer):
            others = [c["id"] for c in step["candidates"] if c["id"] not in gold["element_ids"]]
            wrong[gold["action_uid"]] = StepPrediction(others[0] if others else None, gold["op"], gold["value"])
        return wrong
    if metric == "webshop_reward":
        return 0.0
    return "xyzzy " + str(example.answer) + " plugh"


class ScriptedAgent:
    """Answers from the gold (`oracle`) or deliberately wrong (`wrong`); for tests and demos."""

    def __init__(self, metric: str, kind: str = "oracle"):
        if kind not in ("oracle", "wrong"):
            raise ValueError(f"scripted agent kind must be 'oracle' or 'wrong', got {kind!r}")
        self.metric, self.kind = metric, kind

    def __call__(self, example: Example) -> AgentResult:
        make = _oracle_answer if self.kind == "oracle" else _wrong_answer
        answer = make(example, self.metric)
        shown = answer if isinstance(answer, (str, int, float)) else "<structured>"
        return AgentResult(answer=answer, rounds=1,
                           trace=[{"step": "scripted", "kind": self.kind, "answer": shown}])
