"""Shared by the GPU benchmarks: each side in its own subprocess, figures streamed back.

A worker prints one `RESULT {json}` line per figure as soon as it is measured; the driver
echoes the worker's output, hands each result to `on_result`, and records a crash or a
timeout of that side only (an OOM loses one side, not the run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

from lumos_jax.atomic import write_atomic

RESULT = "RESULT "


def emit(**kw) -> None:
    print(RESULT + json.dumps(kw), flush=True)


def write_json(path: str | None, record: dict) -> None:
    """Rewrite the results file (temp file + rename) so a killed run leaves a whole file."""
    if path:
        write_atomic(path, json.dumps(record, indent=2))


def run_side(cmd: list[str], cwd: Path, timeout: float, on_result: Callable[[dict], None]) -> dict | None:
    """Run one side; None if it ended well, else an error record (rc or timeout, output tail)."""
    print(f"== {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(cwd)})
    tail: list[str] = []
    watchdog = threading.Timer(timeout, proc.kill)  # fires even while the side prints nothing
    watchdog.start()
    try:
        for line in proc.stdout:
            print(line, end="", flush=True)
            tail = (tail + [line.rstrip()])[-15:]
            if line.startswith(RESULT):
                on_result(json.loads(line[len(RESULT):]))
        rc = proc.wait()
    finally:
        fired = not watchdog.is_alive() and proc.returncode is not None and proc.returncode < 0
        watchdog.cancel()
    if fired:
        return {"error": f"timed out after {timeout}s", "tail": tail}
    return {"rc": rc, "tail": tail} if rc else None


def run_sides(script: str, args, argv: list[str], cwd: Path, record: dict,
              on_result: Callable[[dict], None]) -> int:
    """Each of `args.sides` (comma-separated) as `script --worker SIDE argv` with its timeout
    (`args.timeout_ours` for ours, `args.timeout_hf` otherwise); errors go to
    record["errors"], the file is rewritten after each side. Exit status: 1 if any failed."""
    for side in args.sides.split(","):
        timeout = args.timeout_ours if side == "ours" else args.timeout_hf
        err = run_side([sys.executable, script, "--worker", side] + argv, cwd, timeout, on_result)
        if err:
            record["errors"].append({"side": side, **err})
        write_json(args.out, record)
    return 1 if record["errors"] else 0


class CompileClock:
    """Counts XLA compilations and their seconds in this process (JAX's monitoring events),
    so a figure can say how much of its time was first-call compilation."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        import jax

        self.count, self.seconds = 0, 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_) -> None:
        if event == self.EVENT:
            self.count += 1
            self.seconds += duration

    def read(self) -> dict:
        return {"compiles": self.count, "compile_s": round(self.seconds, 1)}


def layer_layouts(scan_layers, scan_unroll) -> list[tuple[bool, int]]:
    """(scanned, unroll) of each run asked for by `--scan_layers 1,0 --scan_unroll 1,2,4`:
    every unroll for scanned, one unrolled run; in order, without repeats."""
    out = []
    for scan in (bool(int(v)) for v in scan_layers):
        for unroll in ((int(u) for u in scan_unroll) if scan else [1]):
            if (scan, unroll) not in out:
                out.append((scan, unroll))
    return out
