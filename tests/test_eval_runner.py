"""The resumable runner: oracle 100 / wrong 0, crash isolation, kill -9 and resume."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import DATA, REPO
from lumos_jax.evaluation import datasets as d
from lumos_jax.evaluation.agents import AgentResult, ScriptedAgent
from lumos_jax.evaluation.runner import evaluate, load_records

EVAL = DATA / "eval"


def _strip_timing(summary):
    return {k: v for k, v in summary.items() if k != "timing"}


@pytest.mark.parametrize("name", ["gsm8k", "svamp", "strategyqa", "hotpotqa", "hotpotqa_distractor"])
def test_oracle_100_wrong_0(tmp_path, name):
    reader, fname, _, metric = d.READERS[name]
    examples = reader(EVAL / fname)[:25]
    good = evaluate(examples, ScriptedAgent(metric), metric, tmp_path / "o", name, batch_size=7)
    bad = evaluate(examples, ScriptedAgent(metric, "wrong"), metric, tmp_path / "w", name, batch_size=7)
    assert good["score"] == 100.0 and good["n"] == 25
    assert bad["score"] == 0.0 and bad["error_kinds"] == {"wrong_answer": 25}
    for f in ("predictions.jsonl", "summary.json", "results.md", "plot.png"):
        assert (tmp_path / "o" / f).exists()
    assert (tmp_path / "o" / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 100.0 |" in (tmp_path / "o" / "results.md").read_text()


def test_mixed_agent_errors_are_classified(tmp_path):
    examples = d.read_gsm8k(EVAL / "gsm8k_test.jsonl")[:6]

    def agent(ex):
        i = int(ex.id.split("_")[1])
        if i == 0:
            raise RuntimeError("boom")
        if i == 1:
            return AgentResult(answer=None, rounds=8, stopped=False)
        if i == 2:
            return AgentResult(answer="", rounds=2, trace=[{"action": "Calculator(", "error": "parse"}])
        if i == 3:
            return {"answer": ex.answer, "rounds": 3, "trace": [{"plan": "Subgoal 1"}]}
        if i == 4:
            return ("", [])
        return AgentResult(answer="7", rounds=2, error="parse_error")

    s = evaluate(examples, agent, "numeric_match", tmp_path, "gsm8k", batch_size=4)
    assert s["error_kinds"] == {"agent_exception": 1, "correct": 1, "max_rounds": 1,
                                "no_answer": 1, "parse_error": 1, "tool_error": 1}
    assert s["by_rounds"]["3"] == {"n": 1, "correct": 1.0, "total": 1.0, "score": 100.0}
    recs = load_records(tmp_path / "predictions.jsonl", "gsm8k")
    assert "boom" in recs["gsm8k_0"]["error"]
    assert recs["gsm8k_3"]["trace"] == [{"plan": "Subgoal 1"}]


def test_batched_agent_is_used_and_falls_back(tmp_path):
    examples = d.read_gsm8k(EVAL / "gsm8k_test.jsonl")[:5]
    calls = []

    class Batched:
        def run_batch(self, batch):
            calls.append(len(batch))
            if any(ex.id == "gsm8k_4" for ex in batch) and len(batch) > 1:
                raise RuntimeError("batch failure")
            return [AgentResult(answer=ex.answer, rounds=1) for ex in batch]

    s = evaluate(examples, Batched(), "numeric_match", tmp_path, "gsm8k", batch_size=3)
    assert s["score"] == 100.0
    assert calls == [3, 2, 1, 1]


def test_streaming_agent_records_each_episode_as_it_ends_and_ends_in_dataset_order(tmp_path):
    examples = d.read_gsm8k(EVAL / "gsm8k_test.jsonl")[:8]
    pred = tmp_path / "predictions.jsonl"
    seen = {}

    class Streaming:
        def stream(self, todo, concurrency):
            seen["concurrency"] = concurrency
            for k, i in enumerate(reversed(range(len(todo)))):  # completion order != dataset order
                # every episode that ended before this one is already on disk
                lines = pred.read_text().splitlines() if pred.exists() else []
                assert [json.loads(x)["id"] for x in lines] == [todo[j].id for j in reversed(range(i + 1, len(todo)))]
                yield i, AgentResult(answer=todo[i].answer, rounds=1), 0.5

        def __call__(self, ex):
            raise AssertionError("the stream is used")

    progress = []
    s = evaluate(examples, Streaming(), "numeric_match", tmp_path, "gsm8k", concurrency=5,
                 on_batch=lambda done, total: progress.append(done))
    assert s["score"] == 100.0 and seen["concurrency"] == 5 and progress == list(range(1, 9))
    assert [json.loads(x)["id"] for x in pred.read_text().splitlines()] == [ex.id for ex in examples]
    assert all(json.loads(x)["seconds"] == 0.5 for x in pred.read_text().splitlines())


def test_a_failing_stream_falls_back_to_one_by_one_for_the_rest(tmp_path, caplog):
    examples = d.read_gsm8k(EVAL / "gsm8k_test.jsonl")[:5]
    called = []

    class Breaks:
        def stream(self, todo, concurrency):
            yield 3, AgentResult(answer=todo[3].answer), 0.0
            raise RuntimeError("engine died")

        def __call__(self, ex):
            called.append(ex.id)
            if ex.id == "gsm8k_1":
                raise ValueError("bad example")
            return AgentResult(answer=ex.answer)

    with caplog.at_level(logging.WARNING, logger="lumos_jax"):
        s = evaluate(examples, Breaks(), "numeric_match", tmp_path, "gsm8k")
    assert called == ["gsm8k_0", "gsm8k_1", "gsm8k_2", "gsm8k_4"]
    assert s["error_kinds"] == {"agent_exception": 1, "correct": 4}
    # nothing is swallowed: the stream's failure is in the log and in each retried record,
    # the crash in its record, the summary and the final warning
    assert s["failures"] == {"count": 1, "first_error": "gsm8k_1: ValueError: bad example"}
    recs = {r["id"]: r for r in load_records(tmp_path / "predictions.jsonl", "gsm8k").values()}
    assert "batch_error" not in recs["gsm8k_3"]
    assert all(recs[i]["batch_error"] == "RuntimeError: engine died" for i in ("gsm8k_0", "gsm8k_1", "gsm8k_4"))
    assert recs["gsm8k_1"]["error"] == "ValueError: bad example"
    logged = [r.getMessage() for r in caplog.records]
    assert any("stream failed after 1 of 5 examples (RuntimeError: engine died)" in m for m in logged)
    assert any("1 of 5 episodes failed; first: gsm8k_1: ValueError: bad example" in m for m in logged)


def test_a_failing_batch_is_recorded_and_retried_one_by_one(tmp_path):
    examples = d.read_gsm8k(EVAL / "gsm8k_test.jsonl")[:4]

    class Batched:
        def run_batch(self, batch):
            if len(batch) > 1:
                raise RuntimeError("out of memory")
            return [AgentResult(answer=batch[0].answer)]

    s = evaluate(examples, Batched(), "numeric_match", tmp_path, "gsm8k", concurrency=4)
    assert s["score"] == 100.0 and s["failures"] == {"count": 0, "first_error": None}
    recs = load_records(tmp_path / "predictions.jsonl", "gsm8k").values()
    assert [r["batch_error"] for r in recs] == ["RuntimeError: out of memory"] * 4


def test_concurrency_setting_and_its_deprecated_alias(tmp_path):
    from lumos_jax.evaluation.runner import resolve_concurrency

    assert resolve_concurrency(None) == 64 and resolve_concurrency(None, 16) == 16 and resolve_concurrency(8, 16) == 8
    with pytest.raises(ValueError, match="concurrency must be an integer >= 1, got 0"):
        evaluate([], ScriptedAgent("numeric_match"), "numeric_match", tmp_path, "gsm8k", batch_size=0)


def test_resume_skips_finished_and_drops_torn_line(tmp_path):
    examples = d.read_gsm8k(EVAL / "gsm8k_test.jsonl")[:10]
    full = evaluate(examples, ScriptedAgent("numeric_match"), "numeric_match", tmp_path / "a", "gsm8k")
    path = tmp_path / "b" / "predictions.jsonl"
    path.parent.mkdir()
    lines = (tmp_path / "a" / "predictions.jsonl").read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:4]) + lines[4][: len(lines[4]) // 2])  # torn 5th record
    seen = []

    def agent(ex):
        seen.append(ex.id)
        return AgentResult(answer=ex.answer, rounds=1, trace=[{"step": "scripted", "kind": "oracle", "answer": ex.answer}])

    resumed = evaluate(examples, agent, "numeric_match", tmp_path / "b", "gsm8k")
    assert seen == [f"gsm8k_{i}" for i in range(4, 10)]
    assert _strip_timing(resumed) == _strip_timing(full)
    with pytest.raises(d.DatasetError, match="not 'svamp'"):
        evaluate(examples, agent, "numeric_match", tmp_path / "b", "svamp")
    path.write_text("{bad\n" + lines[0])
    with pytest.raises(d.DatasetError, match=r"predictions.jsonl:1"):
        evaluate(examples, agent, "numeric_match", tmp_path / "b", "gsm8k")


CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from lumos_jax.evaluation import datasets as d
    from lumos_jax.evaluation.agents import AgentResult
    from lumos_jax.evaluation.runner import evaluate

    def agent(ex):
        time.sleep({delay})
        i = int(ex.id.split("_")[1])
        ans = ex.answer if i % 3 else "-1"
        return AgentResult(answer=ans, rounds=1 + i % 4, trace=[{{"round": 1, "out": ans}}])

    ex = d.read_gsm8k({path!r})[:30]
    evaluate(ex, agent, "numeric_match", sys.argv[1], "gsm8k", batch_size=3,
             info={{"experiment": "kill_test", "paper_score": 47.1}})
""")


def _child(out, delay):
    code = CHILD.format(repo=str(REPO), path=str(EVAL / "gsm8k_test.jsonl"), delay=delay)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-c", code, str(out)], env=env)


def test_kill_and_resume_gives_same_summary(tmp_path):
    ref = _child(tmp_path / "ref", 0.0)
    assert ref.wait(timeout=120) == 0
    victim = _child(tmp_path / "run", 0.03)
    pred = tmp_path / "run" / "predictions.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline:
        if pred.exists() and len(pred.read_text().splitlines()) >= 9:
            break
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    n_done = len(pred.read_text().splitlines())
    assert 9 <= n_done < 30, "the kill should land mid-run"
    assert not (tmp_path / "run" / "summary.json").exists()
    again = _child(tmp_path / "run", 0.0)
    assert again.wait(timeout=120) == 0
    a = json.loads((tmp_path / "ref" / "summary.json").read_text())
    b = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert b["timing"]["examples_this_run"] == 30 - n_done
    assert _strip_timing(a) == _strip_timing(b)
    assert a["score"] == pytest.approx(100.0 * 20 / 30)
    ids = [json.loads(x)["id"] for x in pred.read_text().splitlines()]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 30
