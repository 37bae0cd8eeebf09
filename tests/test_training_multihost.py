"""Two processes (jax.distributed on localhost, 4 CPU devices each, one 8-device FSDP
mesh) train with the same losses as one process holding all 8 devices, and a SIGTERM to
one of them stops both at the same saved step."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from conftest import COMPILE_FLAGS, REPO
from lumos_jax.config import parse_gin
from lumos_jax.training.loop import train

# A learning rate that does not depend on max_steps (constant, no warmup): both tests' workers
# compile the same step program, so the second test's come from the session's compilation cache.
GIN = ["model_config.preset = 'tiny'", "make_mesh.fsdp = -1", "training_data.source = 'synthetic'",
       "training_data.synthetic_vocab = 512", "optimizer_settings.learning_rate = 1e-3",
       "optimizer_settings.schedule = 'constant'", "optimizer_settings.warmup_steps = 0",
       "train.seq_len = 32", "train.global_batch = 8", "train.max_steps = 6", "train.save_every = 3",
       "train.log_every = 1", "train.progress_bar = False"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_two(workdir, gin) -> list:
    """`lumos-jax train` as processes 0 and 1 of one job on localhost, 4 CPU devices each."""
    port = free_port()
    cmd = [sys.executable, "-c", "import sys; from lumos_jax.cli import main; sys.exit(main(sys.argv[1:]))",
           "train", f"--workdir={workdir}", *[f"--gin.{g.replace(' = ', '=')}" for g in gin]]
    procs = []
    for pid in range(2):
        env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {COMPILE_FLAGS}",
                   LUMOS_COORDINATOR_ADDRESS=f"localhost:{port}", LUMOS_NUM_PROCESSES="2",
                   LUMOS_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))
    return procs


def test_two_processes_match_one(tmp_path):
    procs = start_two(tmp_path / "multi", GIN)
    outs = [p.communicate(timeout=240)[0].decode() for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    summary = json.loads(outs[0].strip().splitlines()[-1])
    assert summary["processes"] == 2 and summary["devices"] == 8 and summary["step"] == 6
    records = [json.loads(x) for x in (tmp_path / "multi/logs/metrics.jsonl").read_text().splitlines()]
    multi = [r["loss"] for r in records if r["split"] == "train"]
    assert (tmp_path / "multi/checkpoints/6").is_dir()

    parse_gin([], GIN)
    single = train(workdir=str(tmp_path / "single"))["losses"]
    assert len(multi) == 6
    np.testing.assert_allclose(multi, [single[s] for s in range(1, 7)], rtol=0, atol=1e-5)


def test_sigterm_on_one_host_saves_the_same_step_on_both(tmp_path):
    """Preemption across processes goes through JAX's preemption service and orbax's
    `reached_preemption`: a SIGTERM to the non-lead process alone makes both save one agreed
    step and exit 143."""
    work = tmp_path / "run"
    gin = [g for g in GIN if not g.startswith(("train.max_steps", "train.save_every"))]
    procs = start_two(work, gin + ["train.max_steps = 100000", "train.save_every = 100000"])
    metrics = work / "logs/metrics.jsonl"
    t0 = time.time()
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert all(p.poll() is None for p in procs) and time.time() - t0 < 240
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=240)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [143, 143], [o[-2000:] for o in outs]
    said = [line for line in outs[0].splitlines() if "SIGTERM; saved step" in line]
    assert len(said) == 1, outs[0][-2000:]
    saved = int(said[0].split("saved step ")[1].split()[0])
    steps = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == saved > 3
    logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert logged == list(range(1, saved + 1))
