"""`lumos-jax agent` end to end (scripted backend), gin wiring, and the Engine session logic."""

import json

import pytest

from lumos_jax.agent.backends import EngineBackend
from lumos_jax.agent.cli import render_trace
from lumos_jax.cli import main as lumos_main

@pytest.fixture(autouse=True)
def _clear_gin():
    yield
    import gin

    gin.clear_config()  # leave no agent bindings to later tests


TASK = ("Peter goes to the store to buy a soda. The soda costs $.25 an ounch. He brought $2 with him and "
        "leaves with $.50. How many ounces of soda did he buy?")


def test_cli_runs_an_episode_and_writes_its_trace(tmp_path, capsys):
    out = tmp_path / "trace.jsonl"
    rc = lumos_main(["agent", "--gin_file=agent/maths.gin", "--gin_file=agent/onetime.gin",
                     "--gin_file=agent/scripted.gin", "--no_color", f"--task={TASK}", f"--trace_out={out}",
                     f"--trace_dir={tmp_path / 'per_episode'}"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "R2 = Calculator(R1 / 0.25)  -> 6" in text and "=> answer: 6  (done, 2 rounds)" in text
    events = [json.loads(x) for x in out.read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "generate", "generate", "action", "action", "end"]
    assert events[3]["tool"] == "Calculator" and events[3]["result"] == "1.5" and events[3]["seconds"] >= 0
    assert (tmp_path / "per_episode" / "episode_0.jsonl").read_text() == out.read_text()
    assert "\033[" in render_trace(events, colour=True) and "\033[" not in render_trace(events, colour=False)


def test_cli_bad_input_is_one_line(capsys):
    assert lumos_main(["agent", "--gin_file=agent/maths.gin", "--gin.agent_episode.style='chat'",
                       "--task=x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "prompt style 'chat'" in err
    assert lumos_main(["agent", "--gin_file=agent/greedy.gin", "--task=x"]) == 2
    assert "set plan_model and ground_model" in capsys.readouterr().err


def _annotated_tasks(path):
    """Task texts straight from the annotation file (the reference's conversion output)."""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    firsts = [r["messages"][0]["content"] for r in rows]
    return [f.split("\nTask: ", 1)[1].rsplit("; Initial Environment Description: None.", 1)[0] for f in firsts]


@pytest.mark.parametrize("domain, loop", [("maths", "iterative"), ("complex_qa", "onetime"),
                                          ("web_agent", "iterative")])
def test_list_scripted_tasks_prints_the_annotated_tasks(capsys, domain, loop):
    from lumos_jax.assets import bundled

    rc = lumos_main(["agent", f"--gin_file=agent/{domain}.gin", f"--gin_file=agent/{loop}.gin",
                     "--gin_file=agent/scripted.gin", "--list_scripted_tasks"])
    want = _annotated_tasks(bundled(f"demo_data/annotations/lumos_{domain}_plan_{loop}.jsonl"))
    assert rc == 0 and capsys.readouterr().out.splitlines() == want and len(want) >= 2


def test_task_outside_the_scripted_set_says_so(capsys):
    rc = lumos_main(["agent", "--gin_file=agent/maths.gin", "--gin_file=agent/scripted.gin",
                     "--task", "Peter goes to the store ..."])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "not in the scripted set" in err[0] and "--list_scripted_tasks" in err[0] and "planner" not in err[0]


def test_complex_qa_without_a_qa_backend_exits_1_saying_why(capsys):
    from lumos_jax.assets import bundled

    task = _annotated_tasks(bundled("demo_data/annotations/lumos_complex_qa_plan_iterative.jsonl"))[0]
    rc = lumos_main(["agent", "--gin_file=agent/complex_qa.gin", "--gin_file=agent/scripted.gin",
                     "--quiet", "--task", task])
    out, err = capsys.readouterr()
    assert rc == 1 and out.strip() == "None"
    assert "no QA backend" in err and "agent_tools.qa_endpoint" in err


def test_webshop_episode_config_carries_the_reference_exemplars():
    from lumos_jax.agent.gin_configurables import agent_episode
    from lumos_jax.config import parse_gin

    parse_gin(["agent/webshop.gin"])
    cfg = agent_episode()
    assert cfg.max_rounds == 5 and len(cfg.plan_prefix) == 24 and cfg.ground_prefix[0]["role"] == "user"


class FakeEngine:
    """The Engine API of docs/inference.md, answering every turn with fixed tokens."""

    def __init__(self, num_slots=4):
        self.num_slots, self._slots, self.stats = num_slots, {}, {"prefilled_tokens": 0}

    @property
    def free_slots(self):
        return self.num_slots - len(self._slots)

    def start(self, ids, params, request_id=None):
        slot = min(set(range(self.num_slots)) - set(self._slots))
        self._slots[slot] = {"seq": list(ids), "todo": True, "pre": len(ids)}
        self.stats["prefilled_tokens"] += len(ids)
        return slot

    def extend(self, slot, ids, params=None):
        s = self._slots[slot]
        assert not s["todo"]
        s["seq"] += ids
        s["pre"] += len(ids)
        s["todo"] = True
        self.stats["prefilled_tokens"] += len(ids)

    def step(self):
        from types import SimpleNamespace

        out = []
        for slot, s in self._slots.items():
            if s["todo"]:
                s["todo"] = False
                s["seq"] += [7, 8]
                out.append(SimpleNamespace(slot=slot, tokens=[7, 8], prompt_tokens=0))
        return out

    def sequence(self, slot):
        return list(self._slots[slot]["seq"])

    def prefilled_tokens(self, slot):
        return self._slots[slot]["pre"]

    def release(self, slot):
        del self._slots[slot]


def test_engine_backend_extends_matching_sessions_and_restarts_drifted_ones():
    eng = FakeEngine(num_slots=2)
    b = EngineBackend(eng)
    assert b.generate_tokens([("a", [1, 2, 3]), ("b", [4])], 2, [2]) == [([7, 8], 0), ([7, 8], 0)]
    b.generate_tokens([("a", [1, 2, 3, 7, 8, 9])], 2, [2])  # extends: only [9] is new
    assert eng.stats["prefilled_tokens"] == 3 + 1 + 1 and b.recomputed_tokens == 0
    b.generate_tokens([("a", [1, 2, 5])], 2, [2])  # re-tokenized prompt diverged: restart
    assert b.recomputed_tokens == 3 and eng.stats["prefilled_tokens"] == 5 + 3
    b.release("b")
    b.generate_tokens([("c", [1])], 2, [2])  # the released slot is reused
    with pytest.raises(RuntimeError, match="no free slot"):
        b.generate_tokens([("d", [1])], 2, [2])
    eng.start = lambda *a, **k: (_ for _ in ()).throw(ValueError("prompt needs 5000 cache entries"))
    b.release("a")
    out = b.generate_tokens([("c", [1, 7, 8, 3]), ("e", [9] * 5000)], 2, [2])
    assert out[0] == ([7, 8], 0) and out[1] == ([], 0, "prompt needs 5000 cache entries")
