"""Train on a Cloud TPU VM slice (v4, v5e, v5p, v6e), restarting after preemption.

    python -m launch.tpu_vm --name=lumos-v4 --zone=us-central2-b --accelerator_type=v4-32 \
        --gin_file=experiments/x.gin --gin_file=mesh/tpu_v4_32.gin \
        --gin.<checkpoint dir binding>="'gs://bucket/run'"

Steps: reuse the TPU (or queued resource) if it is up, else create it; pack the
checkout (tracked + untracked, not ignored, files) and copy it to every worker;
install; start `lumos-jax train` on all workers at once (`ssh --worker=all`); poll
until every worker reports an exit code, then copy each worker's log to
`--log_dir/attempt_<k>/worker_<i>.log`. On preemption it recreates the slice and
starts again; training resumes from its last checkpoint, so keep checkpoints on GCS.
"""

from __future__ import annotations

import re
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from launch import cli_args
from launch.commands import LaunchError, Shell
from launch.topology import TpuSlice, parse_accelerator_type
from lumos_jax.config import GIN_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent
READY = {"READY", "ACTIVE"}
GONE = {"", "PREEMPTED", "TERMINATED", "FAILED", "SUSPENDED", "SUSPENDING", "DELETING"}
STATUS_RE = re.compile(r"lumos-jax-status host=(\S+) state=(\w+)(?: code=(-?\d+))?")


class TpuLauncher:
    """One training run on one slice; every gcloud call goes through `self.shell`."""

    def __init__(self, args, forwarded: Sequence[str], shell: Shell,
                 sleep: Callable[[float], None] = time.sleep):
        self.args, self.forwarded, self.shell, self.sleep = args, list(forwarded), shell, sleep
        self.slice: TpuSlice = parse_accelerator_type(args.accelerator_type)
        self.runtime = args.runtime_version or self.slice.generation.runtime_version
        log_dir = Path(args.log_dir) if shell.dry_run else Path(args.log_dir).absolute()
        self.archive = log_dir / "lumos-jax.tar.gz"
        self.attempt = 0

    # -- gcloud pieces ------------------------------------------------------------
    def _where(self) -> list[str]:
        flags = [f"--zone={self.args.zone}"]
        if self.args.project:
            flags.append(f"--project={self.args.project}")
        return flags

    def _gcloud(self, *words: str) -> list[str]:
        kind = ["queued-resources"] if self.args.queued and words[0] in ("create", "describe", "delete") else ["tpu-vm"]
        return [self.args.gcloud, "compute", "tpus", *kind, *words]

    def _ssh(self, command: str, worker: str = "all") -> list[str]:
        return [*self._gcloud("ssh", self.args.name), f"--worker={worker}", *self._where(),
                f"--command={command}"]

    def state(self, dry_state: str = "READY") -> str:
        """The slice's state, "" when it does not exist."""
        fmt = "value(state.state)" if self.args.queued else "value(state)"
        r = self.shell.run([*self._gcloud("describe", self.args.name), *self._where(),
                            f"--format={fmt}"], check=False, capture=True, dry_output=dry_state)
        return r.stdout.strip().upper() if r.returncode == 0 else ""

    def create(self) -> None:
        a = self.args
        if a.queued:
            cmd = [*self._gcloud("create", a.name), f"--node-id={a.name}", *self._where(),
                   f"--accelerator-type={a.accelerator_type}", f"--runtime-version={self.runtime}"]
        else:
            cmd = [*self._gcloud("create", a.name), *self._where(),
                   f"--accelerator-type={a.accelerator_type}", f"--version={self.runtime}"]
        if a.spot:
            cmd.append("--spot")
        self.shell.run(cmd)

    def delete(self) -> None:
        extra = ["--force"] if self.args.queued else []
        self.shell.run([*self._gcloud("delete", self.args.name), *self._where(), *extra, "--quiet"],
                       check=False)

    def ensure_slice(self, dry_state: str = "") -> None:
        """Reuse a READY/ACTIVE slice; delete a preempted one; create; wait until ready."""
        state = self.state(dry_state=dry_state)
        if state in READY:
            self.shell.note(f"{self.args.name} is {state}: reusing it")
            return
        if state and state in GONE:
            self.shell.note(f"{self.args.name} is {state}: deleting it")
            self.delete()
            state = ""
        if not state:
            self.shell.note(f"create {self.args.accelerator_type} ({self.slice.chips} chips, "
                            f"{self.slice.hosts} host(s)), runtime {self.runtime}")
            self.create()
        self.shell.note(f"wait until {'ACTIVE' if self.args.queued else 'READY'} "
                        f"(poll every {self.args.poll_seconds:g}s)")
        deadline = time.monotonic() + self.args.ready_timeout
        while True:
            state = self.state(dry_state="ACTIVE" if self.args.queued else "READY")
            if state in READY:
                return
            if state in {"FAILED", "SUSPENDED"}:
                raise LaunchError(f"{self.args.name} went {state} while starting")
            if time.monotonic() > deadline:
                raise LaunchError(f"{self.args.name} not ready after {self.args.ready_timeout:g}s "
                                  f"(state {state or 'missing'})")
            self.sleep(self.args.poll_seconds)

    # -- code, install, start -------------------------------------------------------
    def package(self) -> None:
        self.shell.note("pack the checkout: tracked and untracked files, not git-ignored ones")
        archive = shlex.quote(str(self.archive))
        self.shell.run(["mkdir", "-p", str(self.archive.parent)])
        self.shell.run(["bash", "-c", "git ls-files -z --cached --others --exclude-standard "
                        f"| xargs -0 ls -d 2>/dev/null | tar -czf {archive} -T -"], cwd=str(REPO_ROOT))

    def copy_and_install(self) -> None:
        d = self.args.remote_dir
        self.shell.note("copy to every worker and install (jax[tpu])")
        self.shell.run([*self._gcloud("scp", str(self.archive), f"{self.args.name}:lumos-jax.tar.gz"),
                        "--worker=all", *self._where()])
        install = (f"set -e; mkdir -p {d} && tar -xzf lumos-jax.tar.gz -C {d} && cd {d} && "
                   "(test -x .venv/bin/python || python3 -m venv .venv) && "
                   ".venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e '.[tpu]'")
        self.shell.run(self._ssh(install))

    def _remote_logs(self) -> str:
        """The workers' log dir as a shell word; relative means under $HOME, wherever we cd."""
        logs = self.args.remote_log_dir
        return shlex.quote(logs) if logs.startswith(("/", "~")) else f'"$HOME"/{shlex.quote(logs)}'

    def start(self) -> None:
        d, logs = self.args.remote_dir, self._remote_logs()
        train = [self.args.python, "-m", *shlex.split(self.args.entry), *self.forwarded]
        if self.args.entry == cli_args.DEFAULT_ENTRY:
            # TPU: JAX finds the coordinator and process ids itself (lumos_jax.training.distributed).
            train.append("--gin.initialize_distributed.auto=True")
            if not any(a.startswith("--gin.model_config.attention_impl") for a in self.forwarded):
                # Pallas splash attention (lumos_jax/models/attention_tpu.py); 'auto' picks it on
                # TPU as well, this makes the choice visible in the command and the operative config.
                train.append("--gin.model_config.attention_impl='splash'")
        self.shell.note(f"start on all {self.slice.hosts} worker(s) at once (attempt {self.attempt})")
        self.shell.run(self._ssh(f"cd {d} && bash launch/tpu_worker.sh start {logs} {shlex.join(train)}"))

    def worker_status(self, dry_output: str) -> tuple[int, list[tuple[str, str, int | None]]]:
        r = self.shell.run(self._ssh(f"bash {self.args.remote_dir}/launch/tpu_worker.sh status "
                                     f"{self._remote_logs()}"),
                           check=False, capture=True, dry_output=dry_output, timeout=300)
        found = [(m.group(1), m.group(2), None if m.group(3) is None else int(m.group(3)))
                 for m in STATUS_RE.finditer(r.stdout)]
        return r.returncode, found

    def collect_logs(self) -> None:
        out = Path(self.args.log_dir) / f"attempt_{self.attempt}"
        self.shell.note(f"collect per-worker logs into {out}/")
        self.shell.run(["mkdir", "-p", str(out)])
        for w in range(self.slice.hosts):
            self.shell.run([*self._gcloud("scp", f"{self.args.name}:{self.args.remote_log_dir}/train.log",
                                          str(out / f"worker_{w}.log")), f"--worker={w}", *self._where()],
                           check=False)

    def _next_attempt(self) -> None:
        self.attempt += 1
        if self.attempt > self.args.max_restarts:
            raise LaunchError(f"interrupted more than --max_restarts={self.args.max_restarts} times")

    def bring_up(self, after_preemption: bool) -> None:
        """Slice ready, code installed, training started; preemption midway starts over."""
        while True:
            if after_preemption:
                self._next_attempt()
            try:
                self.ensure_slice(dry_state="PREEMPTED" if after_preemption else "")
                self.copy_and_install()
                self.start()
                return
            except LaunchError:
                if self.shell.dry_run or self.state() in READY:
                    raise  # a real failure, not the slice going away under us
                self.shell.note(f"{self.args.name} went away while starting: trying again")
                after_preemption = True

    # -- the run --------------------------------------------------------------------
    def run(self) -> int:
        self.package()
        self.bring_up(after_preemption=False)
        hosts = self.slice.hosts
        done_output = "".join(f"lumos-jax-status host=w{w} state=exited code=0\n" for w in range(hosts))
        self.shell.note(f"every {self.args.poll_seconds:g}s: check the slice, then every worker's status")
        while True:
            if not self.shell.dry_run:
                self.sleep(self.args.poll_seconds)
            state = self.state()
            if state not in READY:
                if state in GONE:
                    self.shell.note(f"{self.args.name} is {state or 'gone'}: preempted, restarting")
                    self.bring_up(after_preemption=True)
                continue  # REPAIRING, RESTARTING...: wait
            rc, workers = self.worker_status(done_output)
            if rc != 0 and self.state() not in READY:
                self.shell.note(f"{self.args.name} went away: preempted, restarting")
                self.bring_up(after_preemption=True)
                continue
            if rc != 0 or len(workers) < hosts:
                continue  # ssh hiccup: ask again next time
            codes = [code for _, st, code in workers if st == "exited"]
            if any(st == "missing" for _, st, _ in workers):
                # A worker lost its job (VM restarted under us): start all again from the checkpoint.
                self.shell.note("a worker lost its training process (maintenance restart?): starting again")
                self.collect_logs()
                self._next_attempt()
                self.start()
                continue
            failed = [c for c in codes if c != 0]
            if failed or len(codes) == hosts:
                self.collect_logs()
                if self.args.delete_when_done:
                    self.delete()
                if failed:
                    print(f"launch.tpu_vm: training exited with {failed[0]} on "
                          f"{len(failed)} worker(s); logs in {self.args.log_dir}", file=sys.stderr)
                    return failed[0]
                if self.shell.dry_run:
                    self.shell.note("on preemption (the slice PREEMPTED / queued resource SUSPENDED), "
                                    "the launcher runs:")
                    self.bring_up(after_preemption=True)
                    return 0
                print(f"launch.tpu_vm: training finished on all {hosts} worker(s); logs in "
                      f"{self.args.log_dir}", file=sys.stderr)
                return 0


def check_gin_files_inside_repo(forwarded: Sequence[str]) -> None:
    """Only the checkout is copied: a gin file outside it would be missing on the workers."""
    for i, a in enumerate(forwarded):
        name = a.split("=", 1)[1] if a.startswith("--gin_file=") else (
            forwarded[i + 1] if a == "--gin_file" and i + 1 < len(forwarded) else None)
        if not name:
            continue
        candidates = [Path(name)] if Path(name).is_absolute() else [Path.cwd() / name, GIN_DIR / name]
        for p in candidates:
            if p.exists():
                if REPO_ROOT not in p.resolve().parents:
                    raise LaunchError(f"gin file {name} is outside the repository, so it would not reach "
                                      "the TPU workers; put it under gin/ (untracked files are copied too)")
                if Path(name).is_absolute():
                    raise LaunchError(f"gin file {name}: give it relative to the repository "
                                      "(the workers' checkout lives elsewhere)")
                break


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli_args.make_parser("python -m launch.tpu_vm", __doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--accelerator_type", required=True, help="v4-32, v5litepod-16, v5p-8, v6e-64, ...")
    parser.add_argument("--project")
    parser.add_argument("--queued", action="store_true", help="request through a queued resource")
    parser.add_argument("--spot", action="store_true", help="Spot TPUs (preemptible)")
    parser.add_argument("--runtime_version", help="default: the generation's (launch/topology.py)")
    parser.add_argument("--remote_dir", default="lumos-jax", help="checkout dir on the workers ($HOME-relative)")
    parser.add_argument("--remote_log_dir", default="lumos-jax-logs")
    parser.add_argument("--log_dir", help="local dir for the archive and logs (default runs/tpu/<name>)")
    parser.add_argument("--max_restarts", type=int, default=5)
    parser.add_argument("--poll_seconds", type=float, default=60)
    parser.add_argument("--ready_timeout", type=float, default=24 * 3600)
    parser.add_argument("--delete_when_done", action="store_true")
    parser.add_argument("--gcloud", default="gcloud", help="gcloud executable")
    parser.add_argument("--python", default=".venv/bin/python", help="Python on the workers")
    parser.add_argument("--entry", default=cli_args.DEFAULT_ENTRY)
    args, forwarded = cli_args.parse(parser, argv)
    args.log_dir = args.log_dir or f"runs/tpu/{args.name}"
    try:
        parse_accelerator_type(args.accelerator_type)
    except ValueError as e:
        parser.error(str(e))
    try:
        check_gin_files_inside_repo(forwarded)
        launcher = TpuLauncher(args, forwarded, Shell(dry_run=args.dry_run))
        return launcher.run()
    except LaunchError as e:
        print(f"launch.tpu_vm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"launch.tpu_vm: interrupted; the TPU {args.name} keeps running "
              "(rerun to reattach, or delete it)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
