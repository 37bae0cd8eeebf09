"""Lumos-I and Lumos-O (LUMOS_SPEC §4) as resumable episodes.

An episode is a Python generator that yields what it needs next — `Generate` (a planner or
grounder turn) or `Work` (tool calls) — and is resumed with the answer. The runner
(`runner.py`) drives many episodes at once: it batches every episode waiting on the same
module into one generation call and runs tools in a pool meanwhile. The same episode code
also runs alone (`run_episode`).
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Callable, Generator as PyGenerator

from lumos_jax.agent import prompts
from lumos_jax.agent.execution import ActionRecord, Executor, last_result_text
from lumos_jax.agent.generators import GenRequest
from lumos_jax.agent.parsing import KEEP_MARK, parse_actions, parse_onetime_plan, parse_plan_turn
from lumos_jax.agent.reference import ReferenceExecutor, ReferenceOutcome
from lumos_jax.agent.tools.base import ToolContext, value_text
from lumos_jax.agent.tools.qa import final_answer, reference_final_answer
from lumos_jax.agent.trace import Trace


@dataclasses.dataclass
class Generate:
    module: str
    messages: list[dict]
    prefill: str = ""   # text the assistant turn starts with (GenRequest.prefill)


@dataclasses.dataclass
class Work:
    """Tool work to run in the pool: `fn()` returns the value sent back."""

    fn: Callable[[], Any]
    kind: str = "tools"


@dataclasses.dataclass
class EpisodeConfig:
    domain: str = "maths"
    formulation: str = "iterative"     # or "onetime"
    style: str = "train"
    max_rounds: int = 8
    final_answer_qa: bool = True       # complex_qa: the QA step over all answers
    # 'reference': run as the reference's eval scripts do (agent/reference.py, docs/evaluation.md);
    # 'robust': errors as observations, every tool, the final QA whenever there are answers.
    protocol: str = "robust"
    yes_no: bool = False               # StrategyQA: the reference's "Must answer yes/no." rules
    # In-context exemplar turns put before the task's own (WebShop, an unseen task).
    plan_prefix: list = dataclasses.field(default_factory=list)
    ground_prefix: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class EpisodeResult:
    task: str
    answer: str | None
    reason: str          # "stopped", "max_rounds", "done", or an error description
    rounds: int
    trace: Trace
    variables: dict = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.reason in ("stopped", "max_rounds", "done")


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def final_variable(variables: dict) -> str | None:
    """The answer variable: `Output` if set, else the highest-numbered R."""
    if "Output" in variables:
        return "Output"
    rs = sorted((int(k[1:]), k) for k in variables if re.fullmatch(r"R\d+", k))
    return rs[-1][1] if rs else None


def _execute(executor: Executor, actions, ctx, cfg: EpisodeConfig) -> Work:
    if cfg.protocol == "reference":
        ref = ReferenceExecutor(executor, cfg.domain, cfg.formulation, cfg.yes_no)
        return Work(lambda: ref.run(actions, ctx))
    return Work(lambda: executor.run(actions, ctx))


WEBSHOP_PREFILL = "R1 = "   # webshop:145


def webshop_mangle(text: str) -> str:
    """webshop:194: `"R1 = " + action.strip("R1 = ")` — strips those characters off both ends."""
    return WEBSHOP_PREFILL + text.strip(WEBSHOP_PREFILL)


def _reference_subgoal(domain: str, k: int, text: str) -> str:
    """What the reference grounds: round 1 and every maths round the whole planner output
    (gsm:109,112), later rounds of the other domains the text after "No, I will keep
    planning." (hotpotqa:242, mind2web:172, webshop:148)."""
    if k == 1 or domain == "maths":
        return text.strip()
    return text.split(KEEP_MARK)[-1].strip()


def lumos_iterative(task: str, cfg: EpisodeConfig, executor: Executor, ctx: ToolContext,
                    trace: Trace) -> PyGenerator[Any, Any, tuple[str, int]]:
    """Plan one subgoal, ground it, execute it, report back; until the planner stops."""
    d, style, ref = cfg.domain, cfg.style, cfg.protocol == "reference"
    plan = list(cfg.plan_prefix) + [_user(prompts.plan_first(task))]
    ground: list[dict] = []
    earlier: list[tuple[str, str, bool]] = []
    subgoal_results: dict[str, Any] = {}    # reference complex QA: "Subgoal k" -> last result
    for k in range(1, cfg.max_rounds + 1):
        out = yield Generate("plan", plan)
        plan.append(_assistant(out.text))
        step = parse_plan_turn(out.text)
        trace.generation("plan", k, plan[-2]["content"], out, {"stop": step.stop, "subgoal": step.subgoal,
                                                               "error": step.error})
        if step.stop:
            return "stopped", k - 1
        if ref:  # the reference grounds whatever the planner wrote, even nothing
            subgoal = _reference_subgoal(d, k, out.text)
            ctx.subgoal = out.text.strip()
        elif step.error:
            return f"planner_error: {step.error}", k - 1
        else:
            subgoal = step.subgoal.strip() if style == "reference" else step.subgoal
            ctx.subgoal = subgoal
        if k == 1:
            ground = list(cfg.ground_prefix) + [_user(prompts.ground_first(d, task, subgoal))]
        elif ref and d == "complex_qa":
            ground.append(_user(prompts.ground_next_reference_qa(subgoal, subgoal_results)))
        else:
            ground.append(_user(prompts.ground_next(d, style, subgoal, earlier)))
        prefill = WEBSHOP_PREFILL if ref and d == "webshop" and k == 1 else ""
        gout = yield Generate("ground", ground, prefill=prefill)
        text = gout.text
        if prefill:
            text = webshop_mangle(text)
        ground.append(_assistant(text))
        actions = parse_actions(text, plain_split=ref)
        trace.generation("ground", k, ground[-2]["content"], gout, [a.to_dict() for a in actions])
        done = yield _execute(executor, actions, ctx, cfg)
        if isinstance(done, ReferenceOutcome):
            trace.actions(k, done.records)
            if done.void:
                return f"voided: {done.void}", k
            result = done.feedback
            head = out.text.strip().split(":")[0].split(KEEP_MARK)[-1].strip()   # hotpotqa:295
            subgoal_results[head] = done.last_value
        else:
            records: list[ActionRecord] = done
            trace.actions(k, records)
            result = last_result_text(records)
            from_qa = bool(records) and records[-1].tool == "QA" and records[-1].ok
            earlier.append((f"Subgoal {k}", result, from_qa))
        plan.append(_user(prompts.plan_feedback(d, style, k, subgoal, result)))
    return "max_rounds", cfg.max_rounds


def lumos_onetime(task: str, cfg: EpisodeConfig, executor: Executor, ctx: ToolContext,
                  trace: Trace) -> PyGenerator[Any, Any, tuple[str, int]]:
    """Plan all subgoals, ground them all, execute in order."""
    ref = cfg.protocol == "reference"
    plan = [_user(prompts.plan_first(task))]
    out = yield Generate("plan", plan)
    subgoals = parse_onetime_plan(out.text)
    trace.generation("plan", 1, plan[0]["content"], out, {"subgoals": subgoals})
    if ref:  # gsm:249: the plan text as it is, grounded even when empty
        text = ctx.subgoal = out.text.strip()
    elif not subgoals:
        return "planner_error: no subgoals", 0
    else:
        text = "; ".join(subgoals)
    ground = [_user(prompts.ground_first(cfg.domain, task, text.strip() if cfg.style == "reference" else text,
                                         onetime=True))]
    gout = yield Generate("ground", ground)
    actions = parse_actions(gout.text, plain_split=ref)
    trace.generation("ground", 1, ground[0]["content"], gout, [a.to_dict() for a in actions])
    done = yield _execute(executor, actions, ctx, cfg)
    if isinstance(done, ReferenceOutcome):
        trace.actions(1, done.records)
        if done.void:
            return f"voided: {done.void}", len(subgoals)
    else:
        trace.actions(1, done)
    return "done", len(subgoals)


def episode(task: str, cfg: EpisodeConfig, executor: Executor, ctx: ToolContext | None = None,
            trace: Trace | None = None) -> PyGenerator[Any, Any, EpisodeResult]:
    """One whole episode: the loop, then the answer (and complex QA's final QA step)."""
    prompts.check(cfg.domain, cfg.style)
    ctx = ctx or ToolContext(variables={}, task=task, domain=cfg.domain)
    trace = trace or Trace(task=task, domain=cfg.domain, formulation=cfg.formulation, style=cfg.style)
    loop = lumos_iterative if cfg.formulation == "iterative" else lumos_onetime
    if cfg.formulation not in ("iterative", "onetime"):
        raise ValueError(f"formulation {cfg.formulation!r}: expected 'iterative' or 'onetime'")
    reason, rounds = yield from loop(task, cfg, executor, ctx, trace)
    if cfg.protocol == "reference":
        answer = yield from _reference_answer(task, cfg, executor, ctx, trace, reason)
    else:
        answer = yield from _robust_answer(task, cfg, executor, ctx, trace)
    trace.end(reason, answer, rounds)
    return EpisodeResult(task=task, answer=answer, reason=reason, rounds=rounds, trace=trace,
                         variables={k: value_text(v) for k, v in ctx.variables.items()})


def _robust_answer(task, cfg, executor, ctx, trace):
    answer = None
    var = final_variable(ctx.variables)
    actions = [e for e in trace.events if e["event"] == "action"]
    if var is not None and not (actions and actions[-1]["error_kind"]):
        # As in the reference, a failed last action leaves no answer (not an older value).
        answer = value_text(ctx.variables[var])
    if cfg.domain == "complex_qa" and cfg.final_answer_qa and ctx.qa_pairs and "QA" in executor.registry:
        qa = executor.registry.get("QA")
        final = yield from _final_qa(lambda: final_answer(qa, task, list(ctx.qa_pairs)), trace,
                                     qa_pairs=[list(p) for p in ctx.qa_pairs])
        if final is not None:
            answer = final
    return answer


def _reference_answer(task, cfg, executor, ctx, trace, reason):
    """The reference's prediction: none for a void sample; complex QA iterative only from the
    final QA, run only when the planner stopped (hotpotqa:286-289, strategyqa:217-220);
    otherwise the final variable's text (gsm:192-193; one-time hotpotqa:424-429 and
    strategyqa:345-354 read "Answer: " off it, which the scorer does)."""
    if reason.startswith("voided"):
        return None
    if cfg.domain == "complex_qa" and cfg.formulation == "iterative":
        if reason != "stopped" or not ctx.variables or not cfg.final_answer_qa or "QA" not in executor.registry:
            return None
        qa = executor.registry.get("QA")
        return (yield from _final_qa(lambda: reference_final_answer(qa, task, ctx.variables, cfg.yes_no), trace))
    var = final_variable(ctx.variables)
    value = ctx.variables.get(var) if var is not None else None
    return value if isinstance(value, str) else None


def _final_qa(fn, trace, **extra):
    """Run the final QA step as tool work; a failure is traced and leaves no answer."""
    start = time.perf_counter()

    def ask():
        try:
            return fn(), None
        except Exception as e:  # noqa: BLE001 - reported in the trace, answer falls back
            return None, f"{type(e).__name__}: {e}"

    final, err = yield Work(ask, kind="final_answer")
    trace.event("final_answer", **extra, answer=final, error=err, seconds=time.perf_counter() - start)
    return final


def run_episode(ep, generators: dict) -> EpisodeResult:
    """Drive one episode alone (no batching): handy for the CLI and tests."""
    try:
        req = next(ep)
        while True:
            if isinstance(req, Generate):
                t0 = time.perf_counter()
                out = generators[req.module].generate([_request(req, "solo")])[0]
                out.seconds = time.perf_counter() - t0
                req = ep.send(out)
            else:
                req = ep.send(req.fn())
    except StopIteration as stop:
        for g in generators.values():
            for m in ("plan", "ground"):
                g.release(f"solo/{m}")
        return stop.value


def _request(req: Generate, episode_id: str):
    return GenRequest(session=f"{episode_id}/{req.module}", module=req.module, messages=list(req.messages),
                      prefill=req.prefill)
