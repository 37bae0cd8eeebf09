"""Streaming episodes: each episode resumes the moment its own turn or tool finishes.

Checked with the annotation-replaying model (its answers are the annotations' turns, so a
trace is right when the model saw the annotation's conversation) and with the real Engine
on a tiny model, against traces of each episode run alone."""

import json
import threading

import pytest

from conftest import DATA, FIXTURES
from lumos_jax.agent.execution import Executor
from lumos_jax.agent.generators import BatchedGenerator, ChatModelGenerator, GenOutput, ScriptedGenerator
from lumos_jax.agent.loops import EpisodeConfig, episode, run_episode
from lumos_jax.agent.runner import EpisodeRunner
from lumos_jax.agent.tools.base import Tool, ToolRegistry
from lumos_jax.agent.tools.registry import build_registry

ANN = DATA / "lumos" / "annotations"
TASKS = [json.loads(x)["task"] for x in (DATA / "lumos/converted/maths.jsonl").read_text().splitlines()]
CFG = EpisodeConfig(domain="maths", max_rounds=8)


def _scripted(cls=ScriptedGenerator, **kw):
    return cls.from_files(ANN / "lumos_maths_plan_iterative.jsonl", ANN / "lumos_maths_ground_iterative.jsonl", **kw)


class Paced(ScriptedGenerator):
    """Answers a turn only after `polls(request)` polls, so turns of different episodes
    finish out of order; `log` records (event, session, turn) in order."""

    def __init__(self, *a, polls=lambda r: 1, log=None, **kw):
        super().__init__(*a, **kw)
        self.polls, self.log, self._left = polls, log if log is not None else [], {}

    def _start(self, handle, request):
        self.log.append(("submit", request.session, len(request.messages)))
        self._left[handle] = (request, self.polls(request))

    def _advance(self):
        for h, (r, n) in list(self._left.items()):
            if n <= 1:
                del self._left[h]
                self.log.append(("finish", r.session, len(r.messages)))
                self._finish(h, self.answer(r))
            else:
                self._left[h] = (r, n - 1)


def _strip(events):
    """Trace events without wall-clock fields (and the episode id, which is the index)."""
    return [{k: v for k, v in e.items() if k not in ("t", "seconds", "episode")} for e in events]


def _solo_traces(tasks):
    gen = _scripted()
    reg = build_registry("maths")
    return [_strip(run_episode(episode(t, CFG, Executor(reg)), {"plan": gen, "ground": gen}).trace.events)
            for t in tasks]


def test_streaming_traces_equal_each_episode_run_alone_and_the_batched_runner():
    tasks = [TASKS[i % len(TASKS)] for i in range(24)]
    solo = _solo_traces(tasks)
    reg = build_registry("maths")
    # turns take 1..5 polls depending on episode and turn: completion order is scrambled
    paced = _scripted(Paced, polls=lambda r: 1 + (int(r.session.split("/")[0]) * 7 + len(r.messages)) % 5)
    streamed = EpisodeRunner({"plan": paced, "ground": paced}, lambda i: (Executor(reg), None), CFG,
                             max_concurrent=8).run(tasks)
    assert paced.mismatches == []
    assert [_strip(r.trace.events) for r in streamed] == solo
    # the blocking form (every queued turn answered by one batched call)
    scripted = _scripted()
    batched = BatchedGenerator(scripted.generate)
    res = EpisodeRunner({"plan": batched, "ground": batched}, lambda i: (Executor(reg), None), CFG,
                        max_concurrent=24).run(tasks)
    assert [_strip(r.trace.events) for r in res] == solo
    # completion order is not submission order: episodes did overtake each other
    finish_order = [s for ev, s, _ in paced.log if ev == "finish"]
    submit_order = [s for ev, s, _ in paced.log if ev == "submit"]
    assert finish_order != submit_order


def test_a_slow_generation_does_not_hold_back_other_episodes():
    """Episode 0's first planner turn finishes only once episodes 1-3 have ended (or, if the
    runner waited on it, after 20,000 polls: then the order below fails)."""
    log, released = [], set()

    class Slow(Paced):
        def _advance(self):
            for h, (r, n) in list(self._left.items()):
                if r.session == "0/plan" and len(r.messages) == 1 and n < 20_000 and not {"1", "2", "3"} <= released:
                    self._left[h] = (r, n + 1)  # not yet
            super()._advance()

        def release(self, session):
            released.add(session.split("/")[0])

    paced = _scripted(Slow, log=log, polls=lambda r: 1)
    reg = build_registry("maths")
    results = EpisodeRunner({"plan": paced, "ground": paced}, lambda i: (Executor(reg), None), CFG,
                            max_concurrent=4).run(TASKS[:4])
    slow_done = log.index(("finish", "0/plan", 1))
    for i in (1, 2, 3):
        mine = [n for n, (ev, s, _) in enumerate(log) if s.startswith(f"{i}/")]
        assert max(mine) < slow_done, f"episode {i} waited for episode 0's slow turn"
    assert [r.answer for r in results] == ["6", "11", "1000", "110"]


class _Gate(Tool):
    """A tool that blocks until `gate` is set (episode 0's slow tool), logging start/end."""

    def __init__(self, inner: Tool, gate: threading.Event, log: list):
        self.inner, self.gate, self.log = inner, gate, log
        self.name, self.multi_output, self.timeout_s = inner.name, inner.multi_output, 30.0

    def __call__(self, args, ctx):
        self.log.append(("tool_start", "0"))
        opened = self.gate.wait(20.0)
        self.log.append(("tool_end", "0" if opened else "0-timeout"))
        return self.inner(args, ctx)


def test_a_slow_tool_in_one_episode_does_not_delay_another_episodes_generation():
    log: list = []
    gate = threading.Event()

    def answered(request, text):
        log.append(("generate", request.session.split("/")[0]))
        if request.session == "1/plan" and "stop planning" in text:
            gate.set()  # episode 1's last turn: only now may episode 0's tool return
        return text

    gen = _scripted(override=answered)
    base = build_registry("maths")
    slow = ToolRegistry([_Gate(base.get(n), gate, log) for n in base.names])
    runner = EpisodeRunner({"plan": gen, "ground": gen},
                           lambda i: (Executor(slow if i == 0 else base), None), CFG, max_concurrent=2)
    results = runner.run(TASKS[:2])
    start, end = log.index(("tool_start", "0")), log.index(("tool_end", "0"))
    ep1 = [n for n, e in enumerate(log) if e == ("generate", "1")]
    # episode 1 kept generating (to its last turn) while episode 0's first tool call ran
    during = [n for n in ep1 if start < n < end]
    assert len(during) >= 3 and during[-1] == ep1[-1] and end < len(log)
    assert [r.answer for r in results] == ["6", "11"] and gen.mismatches == []


def test_concurrency_is_bounded_and_tasks_are_read_as_places_free_up():
    live, peak, read = set(), [0], []

    class Counting(ScriptedGenerator):
        def _start(self, handle, request):
            live.add(request.session.split("/")[0])
            peak[0] = max(peak[0], len(live))
            super()._start(handle, request)

        def release(self, session):
            live.discard(session.split("/")[0])

    gen = _scripted(Counting)
    reg = build_registry("maths")
    runner = EpisodeRunner({"plan": gen, "ground": gen}, lambda i: (Executor(reg), None), CFG, max_concurrent=3)

    def tasks():
        for i in range(20):
            read.append(i)
            assert len(read) - len(ended) <= 4  # never read far ahead of the free places
            yield i, TASKS[i % len(TASKS)]

    ended = []
    for i, result, seconds in runner.stream(tasks()):
        ended.append(i)
        assert result.trace.complete and seconds >= 0
    assert sorted(ended) == list(range(20)) and peak[0] == 3 and runner.stats.max_live == 3
    with pytest.raises(ValueError, match="max_concurrent"):
        EpisodeRunner({}, lambda i: (Executor(reg), None), CFG, max_concurrent=0)


def test_a_failing_episode_ends_alone():
    class OneBad(ScriptedGenerator):
        def answer(self, r):
            if r.session == "2/ground":
                return GenOutput(text="", error="device lost", finish_reason="error")
            return super().answer(r)

    gen = _scripted(OneBad)
    reg = build_registry("maths")
    tasks = TASKS[:6]
    res = EpisodeRunner({"plan": gen, "ground": gen}, lambda i: (Executor(reg), None), CFG,
                        max_concurrent=6).run(tasks)
    assert res[2].reason == "generation_error: device lost" and res[2].trace.complete
    solo = _solo_traces(tasks)
    assert [_strip(r.trace.events) for i, r in enumerate(res) if i != 2] == solo[:2] + solo[3:]


def test_engine_sessions_beyond_its_slots_are_evicted_and_recomputed_not_failed():
    """4 concurrent two-round episodes on engines with 2 slots: idle sessions (waiting on the
    other model or on tools) give their slot up and restart later; every episode gives the
    outputs it gives alone. (Two rounds: a one-round episode ends, releasing its slots, in
    the pass its planner turn ends, so nothing needs evicting.)"""
    from lumos_jax.agent.backends import EngineBackend
    from lumos_jax.inference import Engine
    from lumos_jax.models import PRESETS
    from lumos_jax.models.llama import create_model
    from lumos_jax.tokenization import Tokenizer

    tok = Tokenizer(FIXTURES / "stories260k")
    models = {"plan": create_model(PRESETS["tiny"], 0), "ground": create_model(PRESETS["tiny"], 1)}
    tasks = [json.loads(x)["question"] for x in (DATA / "eval/gsm8k_test.jsonl").read_text().splitlines()[:4]]
    cfg = EpisodeConfig(domain="maths", max_rounds=2)
    reg = build_registry("maths")

    def run(slots, concurrent):
        gens = {m: ChatModelGenerator(EngineBackend(Engine(models[m], num_slots=slots, max_len=1024,
                                                           steps_per_call=4)), tok, max_new_tokens=4)
                for m in models}
        res = EpisodeRunner(gens, lambda i: (Executor(reg), None), cfg, max_concurrent=concurrent).run(tasks)
        return res, gens

    outputs = lambda rs: [[e["raw_output"] for e in r.trace.events if e["event"] == "generate"] for r in rs]
    small, gens = run(2, 4)
    assert all(r.trace.complete and not r.reason.startswith(("generation_error", "internal_error")) for r in small)
    assert sum(g.backend.evicted_sessions for g in gens.values()) > 0
    alone, _ = run(2, 1)
    assert outputs(small) == outputs(alone)


def test_gold_forcing_generates_each_gold_turns_token_count_and_continues_with_the_gold_text():
    """The benchmark generator: a real backend generates exactly count(gold) tokens with no
    stop ids, and the episode goes on with the annotation's text (same answers as replay)."""
    from lumos_jax.agent.replay import GoldForcing
    from lumos_jax.tokenization import Tokenizer

    calls = []

    class Recording:
        def generate_tokens(self, batch, max_new_tokens, stop_ids):
            calls.append((len(batch), max_new_tokens, list(stop_ids)))
            return [([7] * max_new_tokens, len(ids)) for _, ids in batch]

        def release(self, session):
            pass

    tok = Tokenizer(FIXTURES / "stories260k")
    scripted = _scripted()
    count = lambda text: 3 + len(text) % 5  # noqa: E731 - any deterministic count will do
    gens = {m: GoldForcing(ChatModelGenerator(Recording(), tok, style="reference"), scripted, count)
            for m in ("plan", "ground")}
    reg = build_registry("maths")
    res = EpisodeRunner(gens, lambda i: (Executor(reg), None), EpisodeConfig(domain="maths", style="reference"),
                        max_concurrent=6).run(TASKS)
    assert [r.answer for r in res] == ["6", "11", "1000", "110", "990", "45"] and scripted.mismatches == []
    turns = [e for r in res for e in r.trace.events if e["event"] == "generate"]
    assert all(stops == [] for _, _, stops in calls)
    assert sorted(n for b, n, _ in calls for _ in range(b)) == sorted(count(e["raw_output"]) for e in turns)
    assert sum(g.forced_tokens for g in gens.values()) == sum(count(e["raw_output"]) for e in turns)
