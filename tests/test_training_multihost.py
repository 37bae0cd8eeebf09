"""Two processes (jax.distributed on localhost, 4 CPU devices each, one 8-device FSDP
mesh) train with the same losses as one process holding all 8 devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from conftest import REPO
from lumos_jax.config import parse_gin
from lumos_jax.training.loop import train

GIN = ["model_config.preset = 'tiny'", "make_mesh.fsdp = -1", "training_data.source = 'synthetic'",
       "training_data.synthetic_vocab = 512", "optimizer_settings.learning_rate = 1e-3",
       "train.seq_len = 32", "train.global_batch = 8", "train.max_steps = 6", "train.save_every = 3",
       "train.log_every = 1", "train.progress_bar = False"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-c", "import sys; from lumos_jax.cli import main; sys.exit(main(sys.argv[1:]))",
           "train", f"--workdir={tmp_path / 'multi'}", *[f"--gin.{g.replace(' = ', '=')}" for g in GIN]]
    procs = []
    for pid in range(2):
        env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   LUMOS_COORDINATOR_ADDRESS=f"localhost:{port}", LUMOS_NUM_PROCESSES="2",
                   LUMOS_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))
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
