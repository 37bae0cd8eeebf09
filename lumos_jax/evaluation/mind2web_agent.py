"""Mind2Web with a Lumos-I planner and grounder, step by step as the reference evaluates it
(`eval/mind2web/run_eval.py`): teacher-forced.

At step i the planner sees the task and the gold history: for every earlier step a subgoal
synthesised from its `action_repr` ("Click button Browse Vehicles", "Type Brooklyn in the
searchbox ...") and the web feedback turn, then writes the subgoal of step i. The grounder
keeps its own conversation (its earlier outputs) and grounds that subgoal; on a step with
candidate elements its first CLICK/TYPE/SELECT runs against that page through the agent's web
tool (offline element ranker), and the chosen element, operation and text are that step's
prediction. Steps without candidates are generated (they shape the conversations) but not
scored. The reference picks the subgoal's verb at random ("Click"/"Visit"/...); we always take
the first one so runs are deterministic.

`protocol='reference'` follows the reference's loop instead (mind2web:122-229): steps 0-14
only, the grounder gets the planner's own subgoal even when it says stop (no gold fallback),
the page is the first 50 of positives + negatives in file order, and every grounded
CLICK/TYPE/SELECT action is a prediction of its step (scored per action).
"""

from __future__ import annotations

from typing import Sequence

from lumos_jax.agent import prompts
from lumos_jax.agent.execution import Executor
from lumos_jax.agent.generators import GenRequest
from lumos_jax.agent.parsing import KEEP_MARK, parse_actions, parse_plan_turn
from lumos_jax.agent.tools.base import ToolContext, ToolRegistry
from lumos_jax.agent.tools.web import ElementRanker, WebPage, web_tools
from lumos_jax.evaluation.agents import AgentResult
from lumos_jax.evaluation.datasets import Example
from lumos_jax.evaluation.mind2web import OPERATIONS, REFERENCE_MAX_STEPS, StepPrediction


def synthetic_subgoal(action_repr: str) -> str:
    """The reference's `translate_action` with its first phrase: "[tag] text -> OP: value"."""
    left, _, right = action_repr.partition(" -> ")
    tag_type = left[left.find("[") + 1:left.find("]")]
    contents = left[left.find("]") + 1:].strip()
    if "CLICK" in right or "HOVER" in right:
        return f"Click {tag_type} {contents}"
    if "TYPE" in right:
        return f"Type {right.split('TYPE:')[-1].strip()} in the {tag_type} {contents}"
    if "SELECT" in right:
        return f"Select {right.split('SELECT:')[-1].strip()} in the {tag_type} {contents}"
    return f"{right.split(':')[0].strip().lower()} {tag_type} {contents}."


class StepPage:
    """A one-page WebEnvironment: the step's candidates; the first action taken is kept."""

    def __init__(self, candidates: list[dict]):
        self.candidates = candidates
        self.choice: StepPrediction | None = None

    def page(self):
        return WebPage([c["html"] for c in self.candidates])

    def act(self, op: str, element_index: int, value: str = ""):
        if self.choice is None:
            self.choice = StepPrediction(self.candidates[element_index]["id"], op, value)
        return WebPage([])


class _Task:
    def __init__(self, example: Example):
        self.example = example
        self.reprs: list[str] = example.meta["action_reprs"]
        self.scored = {s["index"]: s for s in example.meta["steps"]}
        self.ground: list[dict] = []
        self.trace: list[dict] = [{"event": "start", "task": example.question, "domain": "web_agent",
                                   "formulation": "iterative", "style": "teacher-forced"}]
        self.predictions: dict[str, StepPrediction | list[StepPrediction]] = {}


class Mind2WebStepAgent:
    """Teacher-forced step-level Mind2Web evaluation over a batch of tasks."""

    def __init__(self, generators: dict, style: str = "reference", ranker=None, protocol: str = "robust"):
        if protocol not in ("reference", "robust"):
            raise ValueError(f"Mind2WebStepAgent protocol={protocol!r}: expected 'reference' or 'robust'")
        self.generators, self.style, self.protocol = generators, style, protocol
        self.registry = ToolRegistry(web_tools(ranker or ElementRanker()))

    def _plan_messages(self, task: _Task, i: int) -> list[dict]:
        msgs = [{"role": "user", "content": prompts.plan_first(task.example.question)}]
        for j in range(i):
            sub = synthetic_subgoal(task.reprs[j])
            head = f"Subgoal {j + 1}: {sub}"
            if self.style == "train" and j > 0:
                head = "No, I will keep planning. " + head
            msgs.append({"role": "assistant", "content": head})
            msgs.append({"role": "user", "content": prompts.plan_feedback("web_agent", self.style, j + 1,
                                                                          f"Subgoal {j + 1}: {sub}", "")})
        return msgs

    def _generate(self, module: str, sessions: list[str], conversations: list[list[dict]]):
        reqs = [GenRequest(session=s, module=module, messages=list(c)) for s, c in zip(sessions, conversations)]
        return self.generators[module].generate(reqs)

    def run_batch(self, examples: Sequence[Example]) -> list[AgentResult]:
        tasks = [_Task(ex) for ex in examples]
        executor = Executor(self.registry)
        ref = self.protocol == "reference"
        steps = max((len(t.reprs) for t in tasks), default=0)
        for i in range(min(steps, REFERENCE_MAX_STEPS) if ref else steps):
            live = [t for t in tasks if i < len(t.reprs)]
            plans = [self._plan_messages(t, i) for t in live]
            # the plan prompt is rebuilt from the gold history each step: a fresh session
            outs = self._generate("plan", [f"{t.example.id}/plan/{i}" for t in live], plans)
            subgoals = []
            for t, out in zip(live, outs):
                self.generators["plan"].release(f"{t.example.id}/plan/{i}")
                step = parse_plan_turn(out.text)
                if ref:  # mind2web:169,172: whatever the planner wrote
                    subgoal = out.text.strip() if i == 0 else out.text.split(KEEP_MARK)[-1].strip()
                elif step.subgoal:
                    subgoal = step.subgoal.strip()
                else:
                    subgoal = f"Subgoal {i + 1}: {synthetic_subgoal(t.reprs[i])}"
                subgoals.append(subgoal)
                t.trace.append({"event": "generate", "module": "plan", "round": i + 1, "raw_output": out.text,
                                "parsed": {"stop": step.stop, "subgoal": step.subgoal, "error": step.error},
                                "seconds": out.seconds, "new_prompt_tokens": out.new_tokens,
                                "error": out.error})
            for t, subgoal in zip(live, subgoals):
                if not t.ground:
                    t.ground = [{"role": "user", "content": prompts.ground_first("web_agent", t.example.question, subgoal)}]
                else:
                    t.ground.append({"role": "user", "content": prompts.ground_next("web_agent", self.style, subgoal, [])})
            gouts = self._generate("ground", [f"{t.example.id}/ground" for t in live], [t.ground for t in live])
            for t, out in zip(live, gouts):
                t.ground.append({"role": "assistant", "content": out.text})
                actions = parse_actions(out.text, plain_split=ref)
                t.trace.append({"event": "generate", "module": "ground", "round": i + 1, "raw_output": out.text,
                                "parsed": [a.to_dict() for a in actions], "seconds": out.seconds,
                                "new_prompt_tokens": out.new_tokens, "error": out.error})
                step = t.scored.get(i)
                if step is None:
                    continue
                if ref:
                    t.predictions[step["action_uid"]] = self._reference_step(executor, t, step, actions, i)
                    continue
                page = StepPage(step["candidates"])
                ctx = ToolContext(variables={}, task=t.example.question, domain="web_agent", env=page)
                for a in actions:
                    rec = executor.run_one(a, ctx)
                    t.trace.append({"event": "action", "round": i + 1, **rec.to_dict()})
                    if page.choice is not None:
                        break
                if page.choice is not None:
                    t.predictions[step["action_uid"]] = page.choice
        results = []
        for t in tasks:
            self.generators["ground"].release(f"{t.example.id}/ground")
            t.trace.append({"event": "end", "reason": "done", "answer": f"{len(t.predictions)} steps acted",
                            "rounds": len(t.reprs)})
            results.append(AgentResult(answer=t.predictions, trace=t.trace, rounds=len(t.reprs), stopped=True))
        return results

    def _reference_step(self, executor, t: _Task, step: dict, actions, i: int) -> list[StepPrediction]:
        """One prediction per grounded CLICK/TYPE/SELECT action, each on the reference's page."""
        by_id = {c["id"]: c for c in step["candidates"]}
        pool = [by_id[j] for j in step.get("reference_pool", []) if j in by_id]
        preds = []
        for a in actions:
            if a.tool not in OPERATIONS:  # the reference executes (and counts) only these
                continue
            page = StepPage(pool)
            ctx = ToolContext(variables={}, task=t.example.question, domain="web_agent", env=page)
            rec = executor.run_one(a, ctx)
            t.trace.append({"event": "action", "round": i + 1, **rec.to_dict()})
            preds.append(page.choice or StepPrediction(None, a.tool, ""))
        return preds

    def __call__(self, example: Example) -> AgentResult:
        return self.run_batch([example])[0]
