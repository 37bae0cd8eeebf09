"""The host-side executor: many episodes at once, failures contained, traces complete, and
(with the real Engine on a tiny JAX model) every prompt token prefilled exactly once."""

import json
import random
import threading
import time

import pytest

from conftest import DATA, FIXTURES
from lumos_jax.agent.execution import Executor
from lumos_jax.agent.generators import ChatModelGenerator, ScriptedGenerator
from lumos_jax.agent.loops import EpisodeConfig
from lumos_jax.agent.runner import EpisodeRunner
from lumos_jax.agent.tools.base import Tool, ToolRegistry
from lumos_jax.agent.tools.registry import build_registry
from lumos_jax.agent.trace import write_traces

ANN = DATA / "lumos" / "annotations"


class _Flaky(Tool):
    """Wraps a tool: 5% of calls raise, 5% hang past the timeout (seeded, thread-safe)."""

    def __init__(self, inner: Tool, rng: random.Random, lock: threading.Lock, counts: dict):
        self.inner, self.rng, self.lock, self.counts = inner, rng, lock, counts
        self.name, self.multi_output, self.timeout_s = inner.name, inner.multi_output, 0.1

    def __call__(self, args, ctx):
        with self.lock:
            u = self.rng.random()
            kind = "raise" if u < 0.05 else "hang" if u < 0.10 else None
            if kind:
                self.counts[kind] += 1
        if kind == "raise":
            raise RuntimeError("injected failure")
        if kind == "hang":
            time.sleep(2.0)  # far past the 0.1 s timeout, even on a loaded machine
        return self.inner(args, ctx)


def test_1000_scripted_episodes_with_10_percent_tool_failures_finish_with_complete_traces(tmp_path):
    gen = ScriptedGenerator.from_files(ANN / "lumos_maths_plan_iterative.jsonl",
                                       ANN / "lumos_maths_ground_iterative.jsonl")
    tasks = [json.loads(x)["task"] for x in (DATA / "lumos/converted/maths.jsonl").read_text().splitlines()]
    counts, lock, rng = {"raise": 0, "hang": 0}, threading.Lock(), random.Random(7)
    base = build_registry("maths")
    registry = ToolRegistry([_Flaky(base.get(n), rng, lock, counts) for n in base.names])
    executor = Executor(registry)
    cfg = EpisodeConfig(domain="maths", max_rounds=8)
    runner = EpisodeRunner({"plan": gen, "ground": gen}, lambda i: (executor, None), cfg,
                           max_concurrent=200, tool_workers=16)
    results = runner.run([tasks[i % len(tasks)] for i in range(1000)])
    assert len(results) == 1000 and all(r is not None and r.trace.complete for r in results)
    assert all(r.reason in ("stopped", "max_rounds") for r in results)
    kinds = [e.get("error_kind") for r in results for e in r.trace.events if e["event"] == "action"]
    calls = len(kinds)
    assert kinds.count("tool_exception") == counts["raise"] > 0
    # Every injected hang is a timeout observation (a slow real call on a busy CPU may add more).
    assert kinds.count("timeout") >= counts["hang"] > 0
    assert 0.05 < (counts["raise"] + counts["hang"]) / calls < 0.15
    # Failures change results, so later planner turns differ from the script: still no crash.
    ok = [r for r in results if not any(e.get("error_kind") for e in r.trace.events if e["event"] == "action")]
    assert all(r.answer in ("6", "11", "1000", "110", "990", "45") for r in ok)
    assert runner.stats.max_batch > 100  # episodes share generation calls
    out = tmp_path / "traces.jsonl"
    write_traces(out, [r.trace for r in results])
    lines = out.read_text().splitlines()
    assert sum(json.loads(x)["event"] == "end" for x in lines) == 1000


def test_a_failing_generator_or_episode_bug_ends_only_that_episode():
    class Broken:
        def generate(self, reqs):
            raise RuntimeError("device lost")

        def release(self, s):
            pass

    reg = build_registry("maths")
    runner = EpisodeRunner({"plan": Broken(), "ground": Broken()}, lambda i: (Executor(reg), None),
                           EpisodeConfig())
    res = runner.run(["a", "b"])
    assert [r.reason for r in res] == ["generation_error: RuntimeError: device lost"] * 2
    assert all(r.trace.complete for r in res)


@pytest.fixture(scope="module")
def tiny_models():
    from lumos_jax.models import PRESETS
    from lumos_jax.models.llama import create_model
    from lumos_jax.tokenization import Tokenizer

    tok = Tokenizer(FIXTURES / "stories260k")
    return tok, create_model(PRESETS["tiny"], 0), create_model(PRESETS["tiny"], 1)


def test_64_episodes_on_the_engine_prefill_each_prompt_token_once(tiny_models):
    from lumos_jax.agent.backends import EngineBackend, GreedyBackend
    from lumos_jax.inference import Engine

    tok, plan_model, ground_model = tiny_models
    tasks = [json.loads(x)["question"] for x in (DATA / "eval/gsm8k_test.jsonl").read_text().splitlines()[:64]]
    cfg = EpisodeConfig(domain="maths", max_rounds=2)
    reg = build_registry("maths")
    sizes = dict(num_slots=64, max_len=1024, steps_per_call=4)
    engines = {m: Engine(model, **sizes) for m, model in (("plan", plan_model), ("ground", ground_model))}
    gens = {m: ChatModelGenerator(EngineBackend(e), tok, style="train", max_new_tokens=4) for m, e in engines.items()}
    runner = EpisodeRunner(gens, lambda i: (Executor(reg), None), cfg, max_concurrent=64)
    results = runner.run(tasks)
    assert all(r.trace.complete for r in results) and runner.stats.max_batch == 64
    for m, g in gens.items():
        engine = engines[m]
        assert len(g.closed) == 64 and engine.free_slots == 64
        # The engine's own counter: tokens run through prefill, all slots, all turns ...
        prefilled = engine.stats["prefilled_tokens"]
        # ... equals the prompt tokens of the final sequences (every token not generated),
        # so no prompt token was computed twice; turns after the first sent only new tokens.
        assert prefilled == sum(held - generated for held, generated in g.closed) == g.supplied_tokens
        assert g.backend.recomputed_tokens == 0
        gen_turns = [e for r in results for e in r.trace.events if e["event"] == "generate" and e["module"] == m]
        later = [e for e in gen_turns if e["round"] > 1]
        assert later and all(e["new_prompt_tokens"] < e["prompt_tokens"] for e in later)
    # The same 4 episodes through the plain greedy generator (full recomputation each turn, on
    # a fresh engine of the same sizes: the programs compiled above) give the same outputs,
    # and prefill more.
    greedy = {m: ChatModelGenerator(GreedyBackend(model, **sizes), tok, style="train", max_new_tokens=4)
              for m, model in (("plan", plan_model), ("ground", ground_model))}
    slow = EpisodeRunner(greedy, lambda i: (Executor(reg), None), cfg).run(tasks[:4])
    outputs = lambda rs: [[e["raw_output"] for e in r.trace.events if e["event"] == "generate"] for r in rs]
    assert outputs(slow) == outputs(results[:4])
    assert greedy["ground"].backend.prefilled_tokens > sum(h - g for h, g in greedy["ground"].closed)
