"""Checkpoint integrity (issue 12): a byte flip or a truncated file in the latest step is
found before it is read and the run resumes from the previous intact step (or refuses
with one line when none is left); a diverging run stops non-zero without saving NaNs."""

import hashlib
import json
import shutil
import time

import jax.numpy as jnp
import numpy as np
import pytest

from lumos_jax.config import parse_gin
from lumos_jax.training.checkpointing import DIGEST_FILE, Checkpointer
from lumos_jax.training.loop import train

GIN = ["model_config.preset = 'tiny'", "model_config.overrides = {}", "training_data.source = 'synthetic'",
       "training_data.synthetic_vocab = 512", "training_data.synthetic_examples_count = 64",
       "optimizer_settings.learning_rate = 1e-3", "train.seq_len = 32", "train.global_batch = 4",
       "train.log_every = 1", "train.progress_bar = False", "train.export_native = False"]


def steps(ckpts):
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())


def biggest_file(step_dir):
    return max((p for p in step_dir.rglob("*") if p.is_file() and p.name != DIGEST_FILE),
               key=lambda p: p.stat().st_size)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """6 steps saved at 3 and 6 (orbax also keeps step 1), and their losses."""
    parse_gin(["mesh/single_device.gin"], GIN)
    work = tmp_path_factory.mktemp("ckpt") / "run"
    losses = train(workdir=str(work), max_steps=6, save_every=3)["losses"]
    return work, losses


def copy_of(trained, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(trained[0], work)
    return work, work / "checkpoints"


def test_every_saved_step_carries_a_digest_of_its_files(trained):
    ckpts = trained[0] / "checkpoints"
    assert {3, 6} <= set(steps(ckpts))
    for step in steps(ckpts):
        manifest = json.loads((ckpts / str(step) / DIGEST_FILE).read_text())
        assert manifest["step"] == step
        files = [p for p in (ckpts / str(step)).rglob("*") if p.is_file() and p.name != DIGEST_FILE]
        assert sorted(manifest["files"]) == sorted(str(p.relative_to(ckpts / str(step))) for p in files)
        for p in files:  # checked with hashlib itself, not our helper
            entry = manifest["files"][str(p.relative_to(ckpts / str(step)))]
            assert entry["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
            assert entry["size"] == p.stat().st_size


def test_damaged_steps_fall_back_to_the_newest_intact_one(trained, tmp_path, caplog):
    """A byte flipped in the latest step (6) and the previous one (3) truncated: both are
    found before reading, and the run resumes from step 1 (one run covers both kinds)."""
    work, ckpts = copy_of(trained, tmp_path)
    assert steps(ckpts) == [1, 3, 6]
    flipped, truncated = biggest_file(ckpts / "6"), biggest_file(ckpts / "3")
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    parse_gin(["mesh/single_device.gin"], GIN)
    result = train(workdir=str(work), max_steps=6, save_every=3)
    err = caplog.text
    lines = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(lines) == 2, err
    assert "checkpoint step 6 is damaged" in lines[0] and flipped.name in lines[0]
    assert "sha256 differs" in lines[0]
    assert "checkpoint step 3 is damaged" in lines[1] and truncated.name in lines[1]
    assert "bytes, the digest says" in lines[1]
    assert (ckpts / "damaged-6").is_dir() and (ckpts / "damaged-3").is_dir()
    # Resumed from step 1: steps 2..6 retrained, the same losses as the undamaged run.
    assert sorted(result["losses"]) == [2, 3, 4, 5, 6]
    np.testing.assert_allclose([result["losses"][s] for s in range(2, 7)],
                               [trained[1][s] for s in range(2, 7)], rtol=1e-6)
    ck = Checkpointer(ckpts, 3)
    try:
        for step in (3, 6):  # written again, sealed
            ck.verify(step)
    finally:
        ck.close()


def test_no_intact_step_is_a_clear_refusal(trained, tmp_path):
    work, ckpts = copy_of(trained, tmp_path)
    for step in steps(ckpts):
        victim = biggest_file(ckpts / str(step))
        victim.write_bytes(victim.read_bytes()[:-1])
    (ckpts / "3" / DIGEST_FILE).unlink()  # a save that never finished
    ck = Checkpointer(ckpts, 3)
    try:
        with pytest.raises(ValueError, match=r"no intact checkpoint in .*/6: file state/.*: \d+ bytes, "
                                             r"the digest says \d+; .*/3: no " + DIGEST_FILE):
            ck.restore_latest({})
    finally:
        ck.close()


def test_divergence_stops_nonzero_and_keeps_the_last_good_checkpoint(trained, tmp_path, capsys):
    from lumos_jax.cli import main

    work, ckpts = copy_of(trained, tmp_path)
    # A learning rate that blows the weights up within a few steps of the resumed run.
    args = ["train", f"--workdir={work}", "--gin_file=mesh/single_device.gin",
            *[f"--gin.{g.replace(' = ', '=')}" for g in GIN],
            "--gin.optimizer_settings.learning_rate=1e30",
            "--gin.optimizer_settings.warmup_steps=0", "--gin.optimizer_settings.schedule='constant'",
            "--gin.train.max_steps=20", "--gin.train.save_every=1"]
    rc = main(args)
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not line.startswith("lumos-jax train: resumed from")]  # the run's INFO line
    assert rc != 0
    assert len(err) == 1 and "training diverged at step" in err[0] and "last good checkpoint" in err[0], err
    diverged = int(err[0].split("training diverged at step ")[1].split(" ")[0])
    assert 6 < diverged <= 20
    saved = steps(ckpts)
    assert max(saved) == diverged - 1  # every step before it saved, that one not
    ck = Checkpointer(ckpts, 1)
    try:
        for step in saved:
            ck.verify(step)
    finally:
        ck.close()


def test_a_finished_save_is_sealed_without_waiting_for_the_next(tmp_path):
    """Sealing happens while training goes on (each step's save call), not only at the next
    save or at exit, so a SIGKILLed run leaves its last finished step verifiable."""
    ck = Checkpointer(tmp_path / "ckpts", save_every=1000)
    try:
        assert ck.save(1000, {"w": jnp.arange(4.0)}, {"epoch": 0})
        manifest = tmp_path / "ckpts" / "1000" / DIGEST_FILE
        step = 1001
        deadline = time.monotonic() + 60
        while not manifest.exists() and time.monotonic() < deadline:
            assert not ck.save(step, {"w": jnp.arange(4.0)}, {"epoch": 0})  # not due: no save
            step += 1
            time.sleep(0.01)
        assert manifest.exists()
        ck._sealer.join()
        ck.verify(1000)
    finally:
        ck.close()
