"""Start N worker processes on this machine, log each to a file, stop all if one fails.

Shared by the local CPU launcher and the single-node multi-GPU launcher. A
multi-controller job is all-or-nothing: when one process dies the others would
wait forever in a collective, so the first failure terminates the rest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from launch.commands import Shell, format_command

STOP_GRACE_SECONDS = 10.0


@dataclass
class Worker:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment
    log_path: str = ""


def print_plan(shell: Shell, workers: Sequence[Worker]) -> None:
    """The dry run: one backgrounded shell line per worker, then `wait`."""
    log_dirs = sorted({str(Path(w.log_path).parent) for w in workers})
    shell.show(format_command(["mkdir", "-p", *log_dirs]))
    for w in workers:
        shell.show(f"{format_command(w.argv, w.env)} > {w.log_path} 2>&1 &")
    shell.show("wait")


def _pump(stream, log_file, echo_prefix: str | None) -> None:
    for line in stream:
        log_file.write(line)
        log_file.flush()
        if echo_prefix is not None:
            sys.stdout.write(echo_prefix + line)
            sys.stdout.flush()


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every live worker's process group (training checkpoints on it), then SIGKILL."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for p in live:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def run_workers(shell: Shell, workers: Sequence[Worker], cwd: str | None = None,
                echo: str = "lead", timeout: float | None = None) -> int:
    """Run all workers; 0 when every one exits 0, else the first failure's exit code.

    `echo`: "lead" copies process 0's output to stdout, "all" every process's
    (prefixed `[i]`), "none" nothing; every process always logs to its file.
    """
    if shell.dry_run:
        print_plan(shell, workers)
        return 0
    procs, threads, files = [], [], []
    try:
        for i, w in enumerate(workers):
            Path(w.log_path).parent.mkdir(parents=True, exist_ok=True)
            log = open(w.log_path, "w")
            files.append(log)
            p = subprocess.Popen(w.argv, cwd=cwd, env={**os.environ, **w.env}, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            procs.append(p)
            prefix = None
            if echo == "all":
                prefix = f"[{i}] "
            elif echo == "lead" and i == 0:
                prefix = ""
            t = threading.Thread(target=_pump, args=(p.stdout, log, prefix), daemon=True)
            t.start()
            threads.append(t)
        start = time.monotonic()
        failed = None
        while True:
            codes = [p.poll() for p in procs]
            bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failed = bad[0]
                break
            if all(c == 0 for c in codes):
                break
            if timeout is not None and time.monotonic() - start > timeout:
                failed = (-1, 124)
                break
            time.sleep(0.2)
        if failed is not None:
            _stop(procs)
            i, code = failed
            who = f"process {i} exited with {code}" if i >= 0 else f"timed out after {timeout:g}s"
            print(f"launch: {who}; stopped the other processes. Logs: "
                  f"{', '.join(w.log_path for w in workers)}", file=sys.stderr)
            return code
        return 0
    except KeyboardInterrupt:
        _stop(procs)
        return 130
    finally:
        for t in threads:
            t.join(timeout=5)
        for f in files:
            f.close()
