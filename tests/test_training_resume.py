"""Exact resume: a real `lumos-jax train` subprocess SIGKILLed at a random step after a
checkpoint, then resumed (and SIGTERMed, saving on the way out, and resumed again), logs
losses bitwise identical to an uninterrupted run; a half-written checkpoint is never loaded."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

from conftest import REPO, FIXTURES
from lumos_jax.config import parse_gin
from lumos_jax.training.checkpointing import Checkpointer
from lumos_jax.training.loop import train

STEPS = 18
ANN = "../shared/data/lumos/annotations/lumos_{}_plan_{}.jsonl"
FILES = [ANN.format(t, f) for t in ("maths", "complex_qa") for f in ("iterative", "onetime")]
# The data engineer's pipeline (packed rows, per-epoch shuffle) on real annotation files:
# its iterator state goes into every checkpoint.
GIN = ["model_config.preset = 'tiny'", "model_config.overrides = {'vocab_size': 32001}",
       "make_mesh.fsdp = -1", "training_data.source = 'pipeline'", f"training_data.files = {FILES}",
       f"training_data.tokenizer = '{FIXTURES / 'llama2-tokenizer'}'",
       "training_data.max_seq_length = 128", "training_data.packing = True",
       "optimizer_settings.learning_rate = 1e-3", "train.seq_len = 128", "train.global_batch = 8",
       f"train.max_steps = {STEPS}", "train.save_every = 3", "train.log_every = 1",
       "train.progress_bar = False"]


def start(workdir, cache=None):
    cmd = [sys.executable, "-c", "import sys; from lumos_jax.cli import main; sys.exit(main(sys.argv[1:]))",
           "train", f"--workdir={workdir}", *[f"--gin.{g.replace(' = ', '=')}" for g in GIN]]
    # The three runs and the in-process reference compile the same programs: they share them
    # through the session's JAX compilation cache (conftest.py), inherited here.
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def logged(workdir, skip_lines=0) -> dict:
    path = workdir / "logs/metrics.jsonl"
    out = {}
    if path.exists():
        for line in path.read_text().splitlines()[skip_lines:]:
            if line.endswith("}"):
                r = json.loads(line)
                out[r["step"]] = r["loss"]  # a resumed run's record replaces the killed run's
    return out


def wait_until(proc, cond, timeout=120):
    t = time.time()
    while not cond():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() - t < timeout
        time.sleep(0.005)


def finished_steps(workdir):
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    work = tmp_path / "run"
    kill_after = random.randint(4, 8)
    proc = start(work)
    wait_until(proc, lambda: max(logged(work), default=0) >= kill_after and finished_steps(work))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(logged(work))
    assert killed_at < STEPS, "the run finished before it could be killed"

    # Resume; stop it again with SIGTERM (preemption): it must save where it is and exit 143.
    resume_from = max(finished_steps(work))
    lines = len((work / "logs/metrics.jsonl").read_text().splitlines())
    proc = start(work)
    # Records of this process only (the killed run's are still in the file).
    wait_until(proc, lambda: max(logged(work, lines), default=0) >= resume_from + 2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 143, out[-2000:]
    saved = max(finished_steps(work))
    assert saved == max(logged(work, lines)) > resume_from  # the SIGTERM save, where it stopped

    proc = start(work)
    out = proc.communicate(timeout=180)[0].decode()
    assert proc.returncode == 0, out[-2000:]
    interrupted = logged(work)

    parse_gin([], GIN)
    # uninterrupted and saving only at the end: a save that changed the state would show too
    reference = train(workdir=str(tmp_path / "reference"), save_every=10 * STEPS)["losses"]
    assert sorted(interrupted) == list(range(1, STEPS + 1))
    assert all(v > 0.5 for v in interrupted.values())  # real targets in every batch
    assert [interrupted[s] for s in range(1, STEPS + 1)] == [reference[s] for s in range(1, STEPS + 1)], \
        f"killed after step {killed_at}, resumed from {resume_from}, SIGTERM at {saved}"


def test_half_written_checkpoint_is_never_loaded(tmp_path):
    """Orbax commits a step by renaming its temporary directory; a save killed midway
    leaves only the temporary one, which must be ignored (and resumed past)."""
    synthetic = ["training_data.source = 'synthetic'", "training_data.synthetic_vocab = 512",
                 "model_config.overrides = {}"]
    parse_gin(["mesh/single_device.gin"], GIN[:-4] + synthetic + ["train.log_every = 1",
                                                                  "train.progress_bar = False"])
    work = tmp_path / "run"
    train(workdir=str(work), max_steps=6, save_every=3)
    ckpts = work / "checkpoints"
    assert finished_steps(work)[-2:] == [3, 6]
    partial = ckpts / "9.orbax-checkpoint-tmp-1234567890"
    shutil.copytree(ckpts / "6", partial)
    shutil.rmtree(partial / "state")
    assert Checkpointer(ckpts, 3).latest_step() == 6
    result = train(workdir=str(work), max_steps=8, save_every=3, keep_checkpoints=2)
    assert sorted(result["losses"]) == [7, 8]
    assert finished_steps(work) == [6, 8]  # keep_checkpoints=2: older steps deleted
