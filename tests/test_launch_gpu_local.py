"""Single-node multi-GPU launcher: golden dry runs, and the recommended H100 XLA flags
are accepted by the installed XLA (an unknown flag aborts XLA at start-up)."""

import os
import subprocess
import sys

import pytest

from launch import gpu_local
from launch.testing import assert_matches_golden, dry_run_output
from launch.xla_flags import H100_XLA_FLAGS

TRAIN = ["--gin_file=experiments/x.gin", "--gin_file=mesh/gpu_1x8.gin", "--workdir=runs/x"]


@pytest.mark.parametrize("golden, argv", [
    ("gpu_local_single_8.txt", ["--num_gpus=8", *TRAIN]),
    ("gpu_local_per_gpu_4.txt", ["--num_gpus=4", "--mode=per_gpu", "--port=23456", *TRAIN]),
])
def test_dry_run_golden(golden, argv, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert_matches_golden(dry_run_output(gpu_local.main, ["--python=python", *argv]), golden)


def test_user_xla_flags_come_last(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/dump")
    out = dry_run_output(gpu_local.main, ["--python=python", "--num_gpus=1"])
    assert "--xla_gpu_all_reduce_combine_threshold_bytes=134217728 --xla_dump_to=/tmp/dump'" in out


def _jax_starts(flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"],
                          env=env, capture_output=True, text=True, timeout=120)


def test_h100_flags_are_known_to_xla():
    # XLA parses every --xla_* flag at start-up on any platform, so the CPU build checks names.
    bad = _jax_starts("--xla_gpu_no_such_flag_for_lumos=true")
    assert bad.returncode != 0 and "Unknown flag" in bad.stderr  # the check can fail
    good = _jax_starts(" ".join(H100_XLA_FLAGS))
    assert good.returncode == 0, good.stderr[-1000:]
    assert good.stdout.strip() == "3.0"


def test_per_gpu_processes_form_one_job(tmp_path):
    # Same plumbing as on a GPU host (coordinator, ids, JAX_LOCAL_DEVICE_IDS), run on CPU.
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(repo))
    r = subprocess.run([sys.executable, "-m", "launch.gpu_local", "--num_gpus=2", "--mode=per_gpu",
                        "--xla_flags=none", f"--log_dir={tmp_path}", "--echo=none",
                        "--entry=launch.selftest"], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    for i in range(2):
        assert f"selftest: process {i}/2 local_devices=1 devices=2 sum=1 expected=1 ok" in \
            (tmp_path / f"process_{i}.log").read_text()
