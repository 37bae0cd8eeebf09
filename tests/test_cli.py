"""`lumos-jax convert` and `lumos-jax generate` end to end: generate (and --help) in a real
subprocess, the two converts through the same `main(argv)` in-process (each subprocess costs
a JAX start-up; the process boundary is checked by the others)."""

import json
import os
import subprocess
import sys

from conftest import COMPILE_FLAGS, FIXTURES, REPO
from lumos_jax.cli import main

STORIES = FIXTURES / "stories260k"


def lumos(*args, **kw):
    # one CPU device as a user has (no fake ones), compiled with the session's faster settings
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": COMPILE_FLAGS}
    return subprocess.run([sys.executable, "-m", "lumos_jax", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300, **kw)


def test_help_lists_commands():
    out = lumos("--help")
    assert out.returncode == 0
    for cmd in ("convert", "generate", "train", "eval", "demo"):
        assert cmd in out.stdout


def test_convert_both_ways_then_generate(tmp_path):
    assert main(["convert", str(STORIES), str(tmp_path / "native")]) == 0
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "hf"), "--tokenizer", str(STORIES)]) == 0
    assert (tmp_path / "hf" / "tokenizer.model").exists()
    out = lumos("generate", "--model", tmp_path / "hf", "--prompt", "Once upon a time",
                "--gin.generation_settings.max_new_tokens=60", "--gin.generation_settings.stop_at_eos=False")
    assert out.returncode == 0, out.stderr
    reference = json.loads((STORIES / "reference_greedy.json").read_text())["once_upon_a_time"]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["completion_ids"] == reference["generated_ids"]
    assert "Once upon a time" + row["completion"] == reference["text"]
