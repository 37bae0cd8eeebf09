"""Remote workdirs (gs://...) keep their URI through the trainer's path handling
(pathlib's absolute() would make `gs://b/run` a local `/cwd/gs:/b/run`), local ones become
absolute; metrics for a remote log dir go to a local mirror copied up through epath.
Nothing here contacts GCS."""

import json
import os
from pathlib import Path


from lumos_jax.training import checkpointing, loop
from lumos_jax.training.metrics import MetricsWriter, local_mirror_for
from lumos_jax.training.paths import resolve_dir


def test_remote_uri_survives_and_local_path_becomes_absolute(tmp_path, monkeypatch):
    remote = resolve_dir("gs://bucket/run")
    assert str(remote) == "gs://bucket/run" and os.fspath(remote / "checkpoints") == "gs://bucket/run/checkpoints"
    monkeypatch.chdir(tmp_path)
    local = resolve_dir("runs/a")
    assert isinstance(local, Path) and local == tmp_path / "runs" / "a"


def test_checkpointer_and_train_hand_orbax_the_gs_uri(tmp_path, monkeypatch):
    seen = {}

    class FakeManager:
        def __init__(self, directory, options=None, item_names=(), item_handlers=None):
            seen["manager"] = os.fspath(directory)

    monkeypatch.setattr(checkpointing.ocp, "CheckpointManager", FakeManager)
    assert str(checkpointing.Checkpointer("gs://bucket/run/checkpoints", 10).directory) == \
        "gs://bucket/run/checkpoints"
    assert seen["manager"] == "gs://bucket/run/checkpoints"
    monkeypatch.setattr(loop, "_run", lambda workdir, **_: seen.setdefault("workdir", workdir))
    monkeypatch.setattr(loop, "write_operative_config", lambda d: seen.setdefault("gin", d))
    monkeypatch.setattr(loop.jax, "set_mesh", lambda mesh: __import__("contextlib").nullcontext())
    loop.train(workdir="gs://bucket/run", mesh_factory=lambda: None)
    assert str(seen["workdir"]) == "gs://bucket/run" == str(seen["gin"])
    assert os.fspath(seen["workdir"] / "checkpoints") == "gs://bucket/run/checkpoints"


def test_metrics_mirror_is_copied_up_and_history_kept_on_resume(tmp_path):
    assert local_mirror_for("gs://b/run/logs").parts[-4:] == ("gs", "b", "run", "logs")
    remote = tmp_path / "remote_logs"  # stands in for gs://...: same code path via mirror_dir
    first = MetricsWriter(remote, mirror_dir=tmp_path / "mirror1")
    first.write(1, {"loss": 2.0})
    first.close()
    lines = (remote / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1]
    resumed = MetricsWriter(remote, mirror_dir=tmp_path / "mirror2")  # another machine
    resumed.write(2, {"loss": 1.5})
    resumed.close()
    assert [json.loads(x)["step"] for x in (remote / "metrics.jsonl").read_text().splitlines()] == [1, 2]
