"""`lumos-jax train` from gin: bad gin fails in one line before compiling; every shipped
experiment gin parses; a short CPU run writes metrics (JSONL, TensorBoard), a profiler
trace, a checkpoint and an HF export that transformers loads."""

import glob
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import gin
import jax
import numpy as np
import pytest

from conftest import REPO
from lumos_jax.cli import main as cli_main
from lumos_jax.config import parse_gin
from lumos_jax.data.loader import make_memory_iterator
from lumos_jax.models import PRESETS
from lumos_jax.sharding import make_mesh
from lumos_jax.training import data as data_lib
from lumos_jax.training import loop as loop_lib
from lumos_jax.training.checkpointing import Checkpointer
from lumos_jax.training.data import training_data
from lumos_jax.training.metrics import MetricsWriter

BASE = ["--gin_file=runs/cpu_debug.gin", "--gin_file=mesh/fsdp.gin",
        "--gin.training_data.source='synthetic'", "--gin.training_data.synthetic_vocab=512",
        "--gin.model_config.overrides={}", "--gin.train.seq_len=32", "--gin.train.global_batch=8"]
# A learning rate that does not depend on max_steps: runs of BASE with different max_steps
# compile the same step program, so they share the session's XLA compilation cache.
FLAT_LR = ["--gin.optimizer_settings.schedule='constant'", "--gin.optimizer_settings.warmup_steps=0"]


@pytest.fixture
def no_compile(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("compiled a train step despite bad input")
    monkeypatch.setattr(loop_lib, "make_train_step", boom)
    monkeypatch.setattr(loop_lib.state_lib, "init_state", boom)
    monkeypatch.setattr(loop_lib.state_lib, "random_state", boom)


@pytest.mark.parametrize("bad, needle", [
    ("--gin.train.no_such_arg=1", "no_such_arg"),
    ("--gin.make_mesh.data=3", "does not divide"),
    ("--gin.train.global_batch=6", "not divisible"),
    ("--gin.training_data.synthetic_vocab=600", "up to 599 (data vocab_size 600"),
])
def test_bad_gin_is_one_clear_line_before_compile(tmp_path, capsys, no_compile, bad, needle):
    rc = cli_main(["train", f"--workdir={tmp_path}", *BASE, bad])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and needle in err[0] and err[0].startswith("lumos-jax train: error:"), err
    assert not (tmp_path / "checkpoints").exists()


def test_every_experiment_gin_parses():
    files = sorted(glob.glob(str(REPO / "gin/experiments/*.gin")))
    assert len(files) >= 12
    for f in files:
        parse_gin([f])
        name = f.rsplit("/", 1)[1][len("lumos_"):-len(".gin")]
        task, module, formulation = (gin.query_parameter(f"%{k}")
                                     for k in ("TASK", "MODULE", "FORMULATION"))
        assert str(gin.query_parameter("training_data.task")) == "%TASK"
        assert name.startswith(f"{task}_{module}_{formulation}_"), f
        assert gin.query_parameter("optimizer_settings.learning_rate") == 2e-5
        assert gin.query_parameter("train.global_batch") == 128


def test_cli_run_writes_metrics_checkpoint_and_hf_export(tmp_path):
    """Held-out loss logged at step 4 equals HF transformers' loss of the exported model
    on the same held-out rows: eval, export and the trained weights agree. (seq_len 512: at
    256 two of the ten conversations have no trained token and are left out.)"""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    export = tmp_path / "hf"
    files = ("['../shared/data/lumos/annotations/lumos_maths_plan_onetime.jsonl', "
             "'../shared/data/lumos/annotations/lumos_complex_qa_plan_onetime.jsonl']")
    rc = cli_main(["train", f"--workdir={tmp_path / 'run'}", "--gin_file=runs/cpu_debug.gin",
                   "--gin_file=mesh/fsdp.gin", "--gin.train.eval_every=2",
                   f"--gin.train.export_hf_dir='{export}'", "--gin.train.progress_bar=False",
                   f"--gin.training_data.files={files}", "--gin.training_data.packing=False",
                   "--gin.training_data.holdout_fraction=0.2", "--gin.train.seq_len=512",
                   "--gin.train.global_batch=8", "--profile"])
    assert rc == 0
    assert glob.glob(str(tmp_path / "run/profile/**/*.xplane.pb"), recursive=True)
    records = [json.loads(line) for line in (tmp_path / "run/logs/metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "step_time_s"):
        assert all(np.isfinite(r[key]) for r in train_rows), key
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    if importlib.util.find_spec("tensorboardX"):  # optional dependency
        assert glob.glob(str(tmp_path / "run/logs/tensorboard/events.out.tfevents.*"))
    assert (tmp_path / "run/checkpoints/4").is_dir()


    _, held_out = training_data(seq_len=512, global_batch=8, seed=0)
    hf = transformers.LlamaForCausalLM.from_pretrained(export).float().eval()
    # `lumos-jax convert` of the run's final native checkpoint gives the same weights.
    assert cli_main(["convert", str(tmp_path / "run/model"), str(tmp_path / "hf2"), "--to", "hf"]) == 0
    hf2 = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf2").float().eval()
    for (name, a), (_, b) in zip(hf.state_dict().items(), hf2.state_dict().items()):
        assert torch.equal(a, b), name
    total, count = 0.0, 0.0
    with torch.no_grad():
        for b in held_out():
            live = b["segment_ids"].any(axis=1)
            b = {k: torch.tensor(v[live]).long() for k, v in b.items()}
            logits = hf(input_ids=b["input_ids"], attention_mask=(b["segment_ids"] != 0).long(),
                        position_ids=b["positions"]).logits
            xent = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["targets"].flatten(),
                                                     reduction="none")
            total += float((xent * b["loss_mask"].flatten()).sum())
            count += float(b["loss_mask"].sum())
    assert count == evals[-1]["target_tokens"] > 0
    assert abs(total / count - evals[-1]["loss"]) < 1e-4
    assert abs(evals[-1]["perplexity"] - np.exp(evals[-1]["loss"])) < 1e-3 * evals[-1]["perplexity"]
    # The run's gin values as gin itself reads them back (t5x's operative config).
    operative = (tmp_path / "run/operative_config.gin").read_text()
    gin.clear_config()
    gin.parse_config(operative)
    assert gin.query_parameter("train.seq_len") == 512
    assert gin.query_parameter("training_data.holdout_fraction") == 0.2
    assert gin.query_parameter("model_config.preset") == "tiny"
    gin.clear_config()


def test_workdir_of_another_model_fails_in_one_line(tmp_path, capsys):
    """Resuming from a checkpoint written for other shapes names the array and both shapes,
    before orbax reads anything."""
    run = [f"--workdir={tmp_path}", *BASE, *FLAT_LR, "--gin.train.max_steps=1", "--gin.train.save_every=1",
           "--gin.train.progress_bar=False"]
    assert cli_main(["train", *run]) == 0
    capsys.readouterr()
    rc = cli_main(["train", *run, "--gin.train.max_steps=2",
                   "--gin.model_config.overrides={'intermediate_size': 96}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "checkpoint array" in err[0] and "fresh workdir" in err[0] and "96" in err[0], err


def test_ctrl_c_saves_at_a_step_boundary_and_exits_130(tmp_path):
    """ctrl-C (SIGINT) lets the step in flight finish, saves it, prints one line and exits 130;
    the resumed run's metrics.jsonl has each step once."""
    work = tmp_path / "run"
    cmd = [sys.executable, "-m", "lumos_jax", "train", f"--workdir={work}", *BASE, *FLAT_LR, "--gin.train.max_steps=100000",
           "--gin.train.save_every=100000", "--gin.train.progress_bar=False"]
    # the session's XLA compilation cache (conftest.py, inherited), FLAT_LR: both runs reuse the
    # step program test_workdir_of_another_model compiled in-process, the resumed run the first's
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = work / "logs/metrics.jsonl"
    t0 = time.time()
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() - t0 < 120, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = (x.decode() for x in proc.communicate(timeout=120))
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "Traceback" not in out
    said = [line for line in err.splitlines() if "interrupted (ctrl-C)" in line]  # logged: stderr
    assert len(said) == 1 and "run the same command again to resume" in said[0], err
    saved = int(said[0].split("saved step ")[1].split()[0])
    assert (work / "checkpoints" / str(saved)).is_dir()
    rc = subprocess.run([*cmd[:-3], f"--gin.train.max_steps={saved + 2}", "--gin.train.progress_bar=False"],
                        cwd=tmp_path, env=env, capture_output=True).returncode
    assert rc == 0
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, saved + 3)), steps


def test_resume_drops_metrics_rows_past_the_restored_step(tmp_path):
    """A run killed after its last checkpoint logged steps it will redo: those rows go (a
    torn last line too), so the history has each step once."""
    logs = tmp_path / "logs"
    logs.mkdir()
    rows = [json.dumps({"step": s, "split": "train", "loss": 1.0 / s}) for s in range(1, 7)]
    (logs / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 7, "spl')
    writer = MetricsWriter(logs, resume_step=4)
    writer.write(5, {"loss": 0.5})
    writer.close()
    steps = [json.loads(x)["step"] for x in (logs / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_train_builds_nothing_itself_its_parts_are_injected(tmp_path):
    """Model config, mesh, data, optimizer settings and checkpointer come from train's
    factories: with data of our own (one epoch = its steps_per_epoch) and a checkpointer that
    records what it was built with, the run uses exactly those."""
    parse_gin([], [])
    examples = data_lib.synthetic_examples(32, 300, 8, 40, seed=5)  # packed: 4 full batches in epoch 0
    built = {}

    def data(seq_len, global_batch, seed):
        built["data"] = make_memory_iterator(examples, seq_len=seq_len, global_batch=global_batch, seed=seed,
                                             token_vocab_size=300)
        return built["data"], None

    def checkpointer(directory, save_every, keep, async_save):
        built["ckpt"] = (save_every, keep)
        return Checkpointer(directory, save_every, keep, async_save)

    config = PRESETS["tiny"].replace(vocab_size=300, hidden_size=32, intermediate_size=48)
    result = loop_lib.train(
        str(tmp_path / "run"), seq_len=48, global_batch=2, num_epochs=1, save_every=7, keep_checkpoints=1,
        log_every=2, progress_bar=False, export_native=False, config_factory=lambda: config,
        mesh_factory=lambda: make_mesh(devices=jax.devices()[:1]), data_factory=data,
        optimizer_factory=lambda: dict(loop_lib.state_lib.optimizer_settings(), learning_rate=0.5),
        checkpointer_factory=checkpointer)
    assert result["step"] == built["data"].steps_per_epoch > 2
    assert result["setup"].config == config and result["setup"].mesh.size == 1
    assert built["ckpt"] == (7, 1)
    assert max(float(result["setup"].schedule(s)) for s in range(result["step"])) == pytest.approx(0.5)
    assert (tmp_path / "run/operative_config.gin").exists()
