"""`lumos-jax convert` and `lumos-jax generate` end to end in a real subprocess."""

import json
import os
import subprocess
import sys

from conftest import FIXTURES, REPO

STORIES = FIXTURES / "stories260k"


def lumos(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, "-m", "lumos_jax", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300, **kw)


def test_help_lists_commands():
    out = lumos("--help")
    assert out.returncode == 0
    for cmd in ("convert", "generate", "train", "eval", "demo"):
        assert cmd in out.stdout


def test_convert_both_ways_then_generate(tmp_path):
    out = lumos("convert", STORIES, tmp_path / "native")
    assert out.returncode == 0, out.stderr
    out = lumos("convert", tmp_path / "native", tmp_path / "hf", "--tokenizer", STORIES)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "hf" / "tokenizer.model").exists()
    out = lumos("generate", "--model", tmp_path / "hf", "--prompt", "Once upon a time",
                "--gin.generation_settings.max_new_tokens=60", "--gin.generation_settings.stop_at_eos=False")
    assert out.returncode == 0, out.stderr
    reference = json.loads((STORIES / "reference_greedy.json").read_text())["once_upon_a_time"]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["completion_ids"] == reference["generated_ids"]
    assert "Once upon a time" + row["completion"] == reference["text"]
