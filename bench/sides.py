"""Shared by the GPU benchmarks: each side in its own subprocess, figures streamed back.

A worker prints one `RESULT {json}` line per figure as soon as it is measured; the driver
echoes the worker's output, hands each result to `on_result`, and records a crash or a
timeout of that side only (an OOM loses one side, not the run)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Callable

RESULT = "RESULT "


def emit(**kw) -> None:
    print(RESULT + json.dumps(kw), flush=True)


def write_json(path: str | None, record: dict) -> None:
    """Rewrite the results file (temp file + rename) so a killed run leaves a whole file."""
    if not path:
        return
    tmp = Path(path + ".partial")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def run_side(cmd: list[str], cwd: Path, timeout: float, on_result: Callable[[dict], None]) -> dict | None:
    """Run one side; None if it ended well, else an error record (rc or timeout, output tail)."""
    print(f"== {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(cwd)})
    start, tail = time.time(), []
    try:
        for line in proc.stdout:
            print(line, end="", flush=True)
            tail = (tail + [line.rstrip()])[-15:]
            if line.startswith(RESULT):
                on_result(json.loads(line[len(RESULT):]))
            if time.time() - start > timeout:
                raise subprocess.TimeoutExpired(cmd, timeout)
        rc = proc.wait(timeout=max(1, timeout - (time.time() - start)))
        return {"rc": rc, "tail": tail} if rc else None
    except subprocess.TimeoutExpired:
        proc.kill()
        return {"error": f"timed out after {timeout}s", "tail": tail}
