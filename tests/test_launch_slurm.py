"""SLURM launcher: golden sbatch scripts, and the script itself run under a fake
srun/scontrol on CPU: two tasks form one JAX job; USR1 requeues and waits for srun."""

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import slurm
from launch.testing import assert_matches_golden, dry_run_output

REPO = Path(__file__).resolve().parent.parent
TRAIN = ["--gin_file=experiments/x.gin", "--gin_file=mesh/gpu_2x8.gin", "--workdir=/shared/runs/x"]
COMMON = ["--workdir=/shared/lumos-jax", "--venv=.venv", "--partition=gpu", "--account=lumos"]


@pytest.mark.parametrize("golden, argv", [
    ("slurm_per_gpu_2x8.txt", ["--nodes=2", "--gpus_per_node=8", *COMMON, *TRAIN]),
    ("slurm_per_node_4x8.txt", ["--nodes=4", "--mode=per_node", "--cpus_per_task=96",
                                "--time=48:00:00", "--job_name=lumos-13b", *COMMON, *TRAIN]),
])
def test_dry_run_golden(golden, argv, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert_matches_golden(dry_run_output(slurm.main, argv), golden)


FAKE_SRUN = r'''#!{python}
"""srun stand-in: start SLURM_NTASKS copies of the command with SLURM_PROCID/LOCALID set."""
import os, subprocess, sys
args = sys.argv[1:]
out = next(a.split("=", 1)[1] for a in args if a.startswith("--output="))
while args[0].startswith("--"):
    args.pop(0)
n, per_node = int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_NTASKS_PER_NODE"])
procs = []
for t in range(n):
    path = out.replace("%x", os.environ["SLURM_JOB_NAME"]).replace("%j", os.environ["SLURM_JOB_ID"]).replace("%t", str(t))
    env = dict(os.environ, SLURM_PROCID=str(t), SLURM_LOCALID=str(t % per_node))
    procs.append(subprocess.Popen(args, env=env, stdout=open(path, "w"), stderr=subprocess.STDOUT))
sys.exit(max(p.wait() for p in procs))
'''

FAKE_SCONTROL = r'''#!/bin/bash
echo "$@" >> "$FAKE_SCONTROL_LOG"
if [ "$1" = show ]; then echo localhost; echo otherhost; fi
'''


def _job_id() -> int:
    # the script derives its coordinator port from the job id: pick one whose port is free
    for _ in range(50):
        job = random.randint(1, 4095)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 61440 + job))
                return job
            except OSError:
                continue
    pytest.skip("no free port in the SLURM port range")


def _run_script(tmp_path, entry, wait_then=None):
    out_dir = tmp_path / "out"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN.replace("{python}", sys.executable))
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    args, forwarded = slurm.parse_args(["--nodes=1", "--gpus_per_node=2", "--job_name=t", "--xla_flags=none",
                                        f"--workdir={REPO}", f"--output_dir={out_dir}",
                                        f"--python={sys.executable}", f"--entry={entry}"])
    script = tmp_path / "job.sbatch"
    script.write_text(slurm.render_script(args, forwarded))
    job = _job_id()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID=str(job), SLURM_JOB_NAME="t",
               SLURM_JOB_NODELIST="localhost", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2",
               FAKE_SCONTROL_LOG=str(tmp_path / "scontrol.log"), JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO))
    proc = subprocess.Popen(["bash", str(script)], env=env, cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if wait_then:
        wait_then(proc)
    output, _ = proc.communicate(timeout=180)
    return proc.returncode, output, out_dir, job


def test_script_runs_a_two_task_jax_job(tmp_path):
    code, output, out_dir, job = _run_script(tmp_path, "launch.selftest")
    assert code == 0, output
    for t in range(2):
        log = (out_dir / f"t-{job}-{t}.log").read_text()
        assert f"selftest: process {t}/2 local_devices=1 devices=2 sum=1 expected=1 ok" in log, log


def test_usr1_requeues_and_waits_for_the_tasks(tmp_path):
    def send_usr1(proc):
        time.sleep(1.0)  # the script's trap is set (its first lines), the tasks run 2 s more
        proc.send_signal(signal.SIGUSR1)

    entry = "timeit -n 1 -r 1 'import time; time.sleep(3)'"
    code, output, out_dir, job = _run_script(tmp_path, entry, wait_then=send_usr1)
    assert code == 0, output
    assert f"requeueing job {job}" in output
    assert f"requeue {job}" in (tmp_path / "scontrol.log").read_text()
    for t in range(2):  # the script kept waiting until both tasks had finished
        assert "1 loop" in (out_dir / f"t-{job}-{t}.log").read_text()
