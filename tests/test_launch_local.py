"""Local multi-process launcher: golden dry run, a real 2-process JAX job, failure
handling, and 2-process training giving the same losses as one process."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import COMPILE_FLAGS

from launch import local
from launch.procs import Worker, run_workers
from launch.commands import Shell
from launch.testing import assert_matches_golden, dry_run_output

REPO = Path(__file__).resolve().parent.parent


def test_dry_run_golden(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    out = dry_run_output(local.main, ["--num_processes=2", "--devices_per_process=2", "--python=python",
                                      "--gin_file=experiments/tiny_train.gin", "--workdir=runs/tiny"])
    assert_matches_golden(out, "local_2proc.txt")


def test_user_xla_flags_are_kept_after_the_device_count():
    assert local.worker_xla_flags(2, "") == "--xla_force_host_platform_device_count=2"
    assert local.worker_xla_flags(2, "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/d "
                                     "--xla_backend_optimization_level=1") == (
        "--xla_force_host_platform_device_count=2 --xla_dump_to=/tmp/d --xla_backend_optimization_level=1")


def _clean_env():
    """This session's environment: its XLA_FLAGS (8 fake devices and conftest's compile flags)
    reach the workers after the launcher's own device count, which wins (the selftest checks)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=8 {COMPILE_FLAGS}"
    env["PYTHONPATH"] = str(REPO)
    return env


def test_two_processes_form_one_jax_job(tmp_path):
    # The real thing: 2 processes x 2 CPU devices join through jax.distributed and sum
    # over all 4 devices; each must see the global device count and the right total.
    cmd = [sys.executable, "-m", "launch.local", "--num_processes=2", "--devices_per_process=2",
           f"--log_dir={tmp_path}", "--entry=launch.selftest", "--echo=none", "--timeout=120"]
    r = subprocess.run(cmd, cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    for i in range(2):
        log = (tmp_path / f"process_{i}.log").read_text()
        assert f"selftest: process {i}/2 local_devices=2 devices=4 sum=6 expected=6 ok" in log


def test_one_failure_stops_the_others(tmp_path):
    workers = [Worker([sys.executable, "-c", "import time; time.sleep(0.5); raise SystemExit(3)"],
                      {}, str(tmp_path / "process_0.log")),
               Worker([sys.executable, "-c", "import time; print('waiting', flush=True); time.sleep(120)"],
                      {}, str(tmp_path / "process_1.log"))]
    start = time.monotonic()
    code = run_workers(Shell(), workers, echo="none")
    assert code == 3
    assert time.monotonic() - start < 30  # the sleeper was stopped, not waited for
    assert "waiting" in (tmp_path / "process_1.log").read_text()


TINY_TRAIN_GIN = """
model_config.preset = 'tiny'
train.seq_len = 32
train.global_batch = 4
train.max_steps = 3
train.log_every = 1
train.save_every = 100
train.async_checkpoints = False
train.progress_bar = False
training_data.source = 'synthetic'
training_data.synthetic_vocab = 512
training_data.synthetic_examples_count = 32
"""


def _losses(workdir: Path) -> dict:
    rows = [json.loads(line) for line in (workdir / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("split") == "train"}


def test_two_process_training_matches_one_process(tmp_path):
    gin_file = tmp_path / "tiny_train.gin"
    gin_file.write_text(TINY_TRAIN_GIN)
    env = _clean_env()
    # Reference: one plain process holding both devices (no launcher involved); it runs
    # alongside the 2-process launch to save wall time.
    one = subprocess.Popen([sys.executable, "-m", "lumos_jax.cli", "train", f"--gin_file={gin_file}",
                            f"--workdir={tmp_path / 'one'}"], cwd=REPO, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env={**env, "JAX_PLATFORMS": "cpu",
                                "XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {COMPILE_FLAGS}"})
    two = subprocess.run([sys.executable, "-m", "launch.local", "--num_processes=2",
                          f"--log_dir={tmp_path / 'logs'}", "--echo=none", "--timeout=300",
                          f"--gin_file={gin_file}", f"--workdir={tmp_path / 'two'}"],
                         cwd=REPO, capture_output=True, text=True, env=env, timeout=360)
    _, one_err = one.communicate(timeout=300)
    assert one.returncode == 0, one_err[-2000:]
    assert two.returncode == 0, two.stderr[-2000:] + (tmp_path / "logs" / "process_1.log").read_text()[-2000:]
    ref, got = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(ref) == [1, 2, 3] and sorted(got) == [1, 2, 3]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=1e-5), (step, ref, got)
    # both processes ran and finished (process 1 logs the distributed start-up too)
    assert '"step": 3' in (tmp_path / "logs" / "process_0.log").read_text()
    assert (tmp_path / "logs" / "process_1.log").exists()
