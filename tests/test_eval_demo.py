"""`lumos-jax demo` end to end with tiny settings (the full-size run is CI's own step).

It runs as a user runs it, in its own process on one CPU device (not the test session's 8 fake
ones), with a compilation cache private to the test, so the grounder's training reuses the
planner's compiled step (same shapes): a third less CPU time than in-process. It compiles with
the test session's faster XLA:CPU settings (conftest.COMPILE_FLAGS); CI's own demo step runs
the full-size demo with XLA's defaults."""

import json
import os
import subprocess
import sys

from conftest import COMPILE_FLAGS


def test_demo_runs_every_stage(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", XLA_FLAGS=COMPILE_FLAGS)
    p = subprocess.run([sys.executable, "-m", "lumos_jax", "demo", f"--workdir={tmp_path}", "--steps=2",
                        "--batch=8", "--seq_len=1024", "--train_examples=8", "--num_questions=2",
                        "--max_new_tokens=6", "--no_color"], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert "data: GSM8K rationales converted 491/500" in out
    assert "--- one episode's trace" in out and "Task: Janet" in out
    assert "| demo_tiny_lumos_i | gsm8k | exact match (%) |" in out and "| 47.1 | 2 |" in out
    for module in ("plan", "ground"):
        assert (tmp_path / module / "checkpoints" / "2").is_dir()           # orbax, from the trainer
        model = tmp_path / module / "model"                                  # the model the agent loads:
        assert (model / "config.json").exists() and (model / "tokenizer.model").exists()  # with its tokenizer
        assert not (tmp_path / f"{module}_model").exists()                   # saved once
    lines = (tmp_path / "data" / "gsm8k_ground_iterative.jsonl").read_text().splitlines()
    assert len(lines) == 8 and json.loads(lines[0])["messages"][1]["content"] == "R1 = Calculator(48/2)"
    records = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["gsm8k_0", "gsm8k_1"]
    for r in records:
        events = [e["event"] for e in r["trace"]]
        modules = {e.get("module") for e in r["trace"] if e["event"] == "generate"}
        assert events[0] == "start" and events[-1] == "end" and modules == {"plan", "ground"}
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["n"] == 2 and (tmp_path / "eval" / "plot.png").exists()
