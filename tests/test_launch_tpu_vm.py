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


FAKE_GCLOUD = r"""#!{python}
# A stand-in for gcloud. The slice's state lives in a JSON file; each worker is a
# directory used as $HOME, where scp/ssh really copy and run (so the archive, its
# extraction, tpu_worker.sh and the logs are real). `pip install` is skipped.
# Scripted events, one per status poll: "preempt" (the slice disappears) or "ok".
import json, os, pathlib, shutil, subprocess, sys
path = pathlib.Path(os.environ["FAKE_GCLOUD_STATE"])
st = json.loads(path.read_text())
argv = sys.argv[1:]
st["calls"].append(argv)
words = [a for a in argv if not a.startswith("--")]
flag = lambda name: next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")), None)
verb = words[3]
def homes():
    root = pathlib.Path(st["root"]) / f"slice{st['creates']}"
    ws = [root / f"w{w}" for w in range(st["hosts"])]
    pick = flag("worker")
    return ws if pick in (None, "all") else [ws[int(pick)]]
def done(code=0, out=""):
    path.write_text(json.dumps(st))
    sys.stdout.write(out)
    sys.exit(code)
if verb == "describe":
    done(1) if st["state"] is None else done(0, st["state"] + "\n")
if verb == "create":
    st["state"] = "ACTIVE" if words[2] == "queued-resources" else "READY"
    st["creates"] += 1
    for h in homes():
        h.mkdir(parents=True)
    done()
if verb == "delete":
    st["state"] = None
    done()
if st["state"] not in ("READY", "ACTIVE"):
    done(255)
if verb == "scp":
    src, dst = words[4], words[5]
    for h in homes():
        if ":" in src:
            shutil.copy(h / src.split(":", 1)[1], dst)
        else:
            shutil.copy(src, h / dst.split(":", 1)[1])
    done()
if verb == "ssh":
    command = flag("command")
    if st.get("preempt_on") and st["preempt_on"][0] in command:
        st["preempt_on"].pop(0)
        st["state"] = "PREEMPTED"
        done(255)
    if "tpu_worker.sh status" in command and st["events"]:
        if st["events"].pop(0) == "preempt":
            st["state"] = "PREEMPTED"
            done(255)
    if "pip install" in command:
        command = command.split(" && cd ")[0]  # extract only
    out, code = "", 0
    for h in homes():
        r = subprocess.run(["bash", "-c", command], cwd=h, env={**os.environ, "HOME": str(h)},
                           capture_output=True, text=True)
        out += r.stdout
        code = code or r.returncode
    done(code, out)
done(2)
"""


def run_with_fake_gcloud(tmp_path, monkeypatch, events, entry="launch.selftest", accelerator="v4-16",
                         preempt_on=()):
    gcloud = tmp_path / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.replace("{python}", sys.executable))
    gcloud.chmod(0o755)
    state = tmp_path / "state.json"
    hosts = parse_accelerator_type(accelerator).hosts
    state.write_text(json.dumps({"state": None, "creates": 0, "calls": [], "events": events,
                                 "hosts": hosts, "root": str(tmp_path / "slices"),
                                 "preempt_on": list(preempt_on)}))
    monkeypatch.setenv("FAKE_GCLOUD_STATE", str(state))
    for var in ("XLA_FLAGS", "JAX_PLATFORMS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    code = tpu_vm.main(["--name=lumos-v4", "--zone=us-central2-b", f"--accelerator_type={accelerator}",
                        f"--gcloud={gcloud}", "--poll_seconds=0.5", f"--log_dir={tmp_path / 'logs'}",
                        f"--python={sys.executable}", f"--entry={entry}", *TRAIN])
    return code, json.loads(state.read_text())


def _starts(calls):
    return [i for i, c in enumerate(calls) if any("tpu_worker.sh start" in a for a in c)]


def test_preemption_recreates_the_slice_and_restarts(tmp_path, monkeypatch):
    code, st = run_with_fake_gcloud(tmp_path, monkeypatch, ["preempt"])
    assert code == 0
    assert st["creates"] == 2 and st["events"] == []
    calls = st["calls"]
    verbs = [c[3] for c in calls if c[3] in ("create", "delete")]
    assert verbs == ["create", "delete", "create"]
    starts = _starts(calls)
    copies = [i for i, c in enumerate(calls) if c[3] == "scp" and "--worker=all" in c]
    deleted_at = next(i for i, c in enumerate(calls) if c[3] == "delete")
    # the code is copied again to the new slice before the second start
    assert len(starts) == 2 and len(copies) == 2
    assert starts[0] < deleted_at < copies[1] < starts[1]
    for i in starts:
        assert "--worker=all" in calls[i]
    # each worker of the new slice ran the job from the extracted archive; logs came back
    logs = sorted(p.name for p in (tmp_path / "logs" / "attempt_1").iterdir())
    assert logs == ["worker_0.log", "worker_1.log"]
    for name in logs:
        text = (tmp_path / "logs" / "attempt_1" / name).read_text()
        assert "=== lumos-jax start" in text
        assert "selftest: process 0/1 local_devices=1 devices=1 sum=0 expected=0 ok" in text
        assert "--gin_file=models/tiny.gin" in text


def test_preemption_while_starting_starts_over(tmp_path, monkeypatch):
    # `python -m this` (prints the Zen of Python) stands in for a quick job
    code, st = run_with_fake_gcloud(tmp_path, monkeypatch, [], entry="this",
                                    preempt_on=["tpu_worker.sh start"])
    assert code == 0
    assert st["creates"] == 2 and st["preempt_on"] == []
    assert len(_starts(st["calls"])) == 2
    assert (tmp_path / "logs" / "attempt_1" / "worker_0.log").exists()


def test_default_entry_asks_jax_to_autodetect_the_slice():
    out = dry_run_output(tpu_vm.main, CASES["tpu_v4_32_spot.txt"])
    starts = [line for line in out.splitlines() if "tpu_worker.sh start" in line]
    assert starts and all("--gin.initialize_distributed.auto=True" in line for line in starts)


def test_training_failure_is_reported_not_restarted(tmp_path, monkeypatch, capsys):
    code, st = run_with_fake_gcloud(tmp_path, monkeypatch, [], entry="lumos_no_such_module")
    assert code == 1
    assert st["creates"] == 1 and len(_starts(st["calls"])) == 1
    assert "exited with 1 on 2 worker" in capsys.readouterr().err
    log = (tmp_path / "logs" / "attempt_0" / "worker_1.log").read_text()
    assert "No module named lumos_no_such_module" in log


def test_ready_slice_is_reused(tmp_path, monkeypatch):
    code, st = run_with_fake_gcloud(tmp_path, monkeypatch, [], entry="this")
    assert code == 0 and st["creates"] == 1
    state = tmp_path / "state.json"
    st["calls"] = []
    state.write_text(json.dumps(st))
    code = tpu_vm.main(["--name=lumos-v4", "--zone=us-central2-b", "--accelerator_type=v4-16",
                        f"--gcloud={tmp_path / 'gcloud'}", "--poll_seconds=0.5",
                        f"--log_dir={tmp_path / 'logs'}", f"--python={sys.executable}",
                        "--entry=this", *TRAIN])
    after = json.loads(state.read_text())
    assert code == 0 and after["creates"] == 1
    assert not [c for c in after["calls"] if c[3] == "create"]


@pytest.mark.parametrize("golden", sorted(CASES))
def test_dry_run_selects_the_pallas_kernel(golden):
    """The command each worker runs, parsed the way the worker parses it, gives a model
    config whose attention is Pallas splash, with the slice's generation for block sizes."""
    import shlex

    from lumos_jax.config import parse_gin, split_gin_args
    from lumos_jax.models.attention_tpu import splash_block_sizes
    from lumos_jax.models.config import model_config

    out = dry_run_output(tpu_vm.main, CASES[golden])
    start = next(line for line in out.splitlines() if "tpu_worker.sh start" in line)
    command = shlex.split(shlex.split(start)[-1].split("=", 1)[1])
    argv = command[command.index("train") + 1:]
    rest, bindings = split_gin_args(argv)
    parse_gin([a.split("=", 1)[1] for a in rest if a.startswith("--gin_file=")], bindings)
    assert model_config().attention_impl == "splash"
    gen = golden.split("_")[1]
    assert splash_block_sizes(8192).block_kv == {"v4": 512, "v5e": 1024, "v5p": 1024, "v6e": 1024}[gen]
