"""TPU VM launcher: golden dry runs per generation, and the real control flow
(create, start, preemption -> recreate -> restart, log collection) against a fake gcloud."""

import json
import sys

import pytest

from launch import tpu_vm
from launch.testing import assert_matches_golden, dry_run_output
from launch.topology import parse_accelerator_type

TRAIN = ["--gin_file=models/tiny.gin", "--workdir=gs://my-bucket/lumos/run1"]

CASES = {
    "tpu_v4_32_spot.txt": ["--name=lumos-v4", "--zone=us-central2-b", "--accelerator_type=v4-32",
                           "--spot", *TRAIN, "--gin_file=mesh/tpu_v4_32.gin"],
    "tpu_v5e_16_queued.txt": ["--name=lumos-v5e", "--zone=us-west4-a", "--accelerator_type=v5litepod-16",
                              "--queued", "--spot", *TRAIN, "--gin_file=mesh/tpu_v5e_16.gin"],
    "tpu_v5p_8.txt": ["--name=lumos-v5p", "--zone=us-east5-a", "--accelerator_type=v5p-8",
                      "--project=my-project", *TRAIN, "--gin_file=mesh/tpu_v5p_8.gin"],
    "tpu_v6e_64_queued.txt": ["--name=lumos-v6e", "--zone=us-east1-d", "--accelerator_type=v6e-64",
                              "--queued", "--project=my-project", "--delete_when_done", *TRAIN,
                              "--gin_file=mesh/tpu_v6e_64.gin", "--gin.train.max_steps=100"],
}


@pytest.mark.parametrize("golden", sorted(CASES))
def test_dry_run_golden(golden):
    assert_matches_golden(dry_run_output(tpu_vm.main, CASES[golden]), golden)


@pytest.mark.parametrize("accelerator_type, chips, hosts", [
    ("v4-8", 4, 1), ("v4-32", 16, 4), ("v5litepod-8", 8, 1), ("v5litepod-16", 16, 4),
    ("v5p-8", 4, 1), ("v5p-128", 64, 16), ("v6e-8", 8, 1), ("v6e-256", 256, 64)])
def test_slice_shapes(accelerator_type, chips, hosts):
    # Google's published slice shapes: v4/v5p types count TensorCores (2 per chip), 4 chips
    # per VM; v5e/v6e count chips, single-VM up to 8 chips, else 4 chips per VM.
    s = parse_accelerator_type(accelerator_type)
    assert (s.chips, s.hosts) == (chips, hosts)


@pytest.mark.parametrize("bad", ["v4-12", "v5e-16", "v6e-3", "v5p-7", "h100"])
def test_bad_accelerator_type_is_one_clear_error(bad, capsys):
    with pytest.raises(SystemExit):
        tpu_vm.main(["--name=x", "--zone=z", f"--accelerator_type={bad}", "--dry_run"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unknown TPU accelerator type" in err and bad in err


def test_gin_file_outside_repo_is_refused(tmp_path, capsys):
    outside = tmp_path / "mine.gin"
    outside.write_text("model_config.preset = 'tiny'\n")
    code = tpu_vm.main(["--name=x", "--zone=z", "--accelerator_type=v4-8", "--dry_run",
                        f"--gin_file={outside}"])
    assert code == 1
    assert "outside the repository" in capsys.readouterr().err


FAKE_GCLOUD = r'''#!{python}
"""A stand-in for gcloud: a TPU whose state lives in a JSON file, scripted worker statuses."""
import json, os, pathlib, sys
path = pathlib.Path(os.environ["FAKE_GCLOUD_STATE"])
st = json.loads(path.read_text())
argv = sys.argv[1:]
st["calls"].append(argv)
words = [a for a in argv if not a.startswith("--")]
verb = words[3]
def done(code=0, out=""):
    path.write_text(json.dumps(st))
    sys.stdout.write(out)
    sys.exit(code)
if verb == "describe":
    done(1) if st["state"] is None else done(0, st["state"] + "\n")
if verb == "create":
    st["state"] = "ACTIVE" if words[2] == "queued-resources" else "READY"
    st["creates"] += 1
    done()
if verb == "delete":
    st["state"] = None
    done()
if verb == "scp":
    src, dst = words[4], words[5]
    if ":" in src:
        worker = next(a for a in argv if a.startswith("--worker=")).split("=")[1]
        pathlib.Path(dst).write_text(f"worker {worker} of slice #{st['creates']}\n")
    done()
if verb == "ssh":
    command = next(a for a in argv if a.startswith("--command="))
    if "tpu_worker.sh status" not in command:
        done()
    event = st["events"].pop(0)
    hosts = st["hosts"]
    if event == "preempt":
        st["state"] = "PREEMPTED"
        done(255)
    line = {"running": "state=running", "done": "state=exited code=0"}.get(event)
    if event == "fail":
        lines = [f"lumos-jax-status host=w{w} state=exited code={3 if w == 1 else 0}" for w in range(hosts)]
    else:
        lines = [f"lumos-jax-status host=w{w} {line}" for w in range(hosts)]
    done(0, "\n".join(lines) + "\n")
done(2)
'''


def run_with_fake_gcloud(tmp_path, monkeypatch, events, extra=()):
    gcloud = tmp_path / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.replace("{python}", sys.executable))
    gcloud.chmod(0o755)
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"state": None, "creates": 0, "calls": [], "events": events, "hosts": 4}))
    monkeypatch.setenv("FAKE_GCLOUD_STATE", str(state))
    code = tpu_vm.main(["--name=lumos-v4", "--zone=us-central2-b", "--accelerator_type=v4-32",
                        f"--gcloud={gcloud}", "--poll_seconds=0", f"--log_dir={tmp_path / 'logs'}",
                        *extra, *TRAIN])
    return code, json.loads(state.read_text())


def _starts(calls):
    return [c for c in calls if any("tpu_worker.sh start" in a for a in c)]


def test_preemption_recreates_the_slice_and_restarts(tmp_path, monkeypatch):
    code, st = run_with_fake_gcloud(tmp_path, monkeypatch, ["running", "preempt", "running", "done"])
    assert code == 0
    assert st["creates"] == 2 and st["events"] == []
    verbs = [c[3] for c in st["calls"] if c[3] in ("create", "delete")]
    assert verbs == ["create", "delete", "create"]
    starts = _starts(st["calls"])
    assert len(starts) == 2
    for call in starts:
        assert "--worker=all" in call
        command = next(a for a in call if a.startswith("--command="))
        assert "--gin_file=models/tiny.gin" in command
        assert "--gin.initialize_distributed.auto=True" in command
    # the code is copied again to the new slice before the second start
    copies = [i for i, c in enumerate(st["calls"]) if c[3] == "scp" and "--worker=all" in c]
    start_at = [i for i, c in enumerate(st["calls"]) if c in starts]
    deleted_at = next(i for i, c in enumerate(st["calls"]) if c[3] == "delete")
    assert len(copies) == 2 and start_at[0] < deleted_at < copies[1] < start_at[1]
    logs = sorted(p.name for p in (tmp_path / "logs" / "attempt_1").iterdir())
    assert logs == [f"worker_{w}.log" for w in range(4)]
    assert (tmp_path / "logs" / "attempt_1" / "worker_3.log").read_text() == "worker 3 of slice #2\n"
    assert (tmp_path / "logs" / "lumos-jax.tar.gz").stat().st_size > 0


def test_training_failure_is_reported_not_restarted(tmp_path, monkeypatch, capsys):
    code, st = run_with_fake_gcloud(tmp_path, monkeypatch, ["fail"])
    assert code == 3
    assert st["creates"] == 1 and len(_starts(st["calls"])) == 1
    assert "exited with 3 on 1 worker" in capsys.readouterr().err
    assert len(list((tmp_path / "logs" / "attempt_0").iterdir())) == 4


def test_ready_slice_is_reused(tmp_path, monkeypatch):
    gcloud_state = {"events": ["done"]}
    code, st = run_with_fake_gcloud(tmp_path, monkeypatch, gcloud_state["events"])
    assert code == 0 and st["creates"] == 1
    # second launch on the same (still READY) slice: no create
    state = tmp_path / "state.json"
    st.update(events=["done"], calls=[])
    state.write_text(json.dumps(st))
    code = tpu_vm.main(["--name=lumos-v4", "--zone=us-central2-b", "--accelerator_type=v4-32",
                        f"--gcloud={tmp_path / 'gcloud'}", "--poll_seconds=0",
                        f"--log_dir={tmp_path / 'logs'}", *TRAIN])
    after = json.loads(state.read_text())
    assert code == 0 and after["creates"] == 1
    assert not [c for c in after["calls"] if c[3] == "create"]
