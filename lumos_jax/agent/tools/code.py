"""Code: run Python (or the reference's pseudo-code) in a separate, limited process.

The child (`sandbox_child.py`) gets an empty environment, a fresh scratch directory as its
only writable place, no network, CPU-time / memory / output / process limits, and an audit
hook; the parent adds a wall-clock timeout and kills the child's whole process group.
This contains model mistakes and the usual escapes (see tests/test_agent_sandbox.py); it is
not a boundary against a determined attacker with kernel exploits — use a VM for that.

Accepted argument forms: a Python expression (`141 % 1 == 0`), a program whose last line is
an expression or that sets `result`/`answer` or prints, and the reference's pseudo-code
`If cond, a, b` (-> `a if cond else b`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lumos_jax.agent.tools.base import BadArguments, Tool, ToolContext, ToolError, ToolTimeout

CHILD = Path(__file__).with_name("sandbox_child.py")
_IF_PSEUDO = re.compile(r"^\s*If\s+(.+?),\s*(.+?),\s*(.+?)\s*$", re.S)


def translate_pseudo_code(code: str) -> str:
    """The reference's pseudo-code to Python (only the forms seen in its data)."""
    m = _IF_PSEUDO.match(code)
    if m and "\n" not in code:
        return f"({m.group(2)}) if ({m.group(1)}) else ({m.group(3)})"
    return code


class SandboxError(ToolError):
    kind = "sandbox_error"


def run_sandboxed(code: str, cpu_seconds: float = 2.0, wall_seconds: float = 5.0,
                  memory_bytes: int = 512 * 2**20, output_bytes: int = 64 * 1024) -> dict:
    """Run `code` in a child process; returns the child's answer dict
    (`ok`, `stdout`, `value`, `error`). Raises ToolTimeout / SandboxError when the child
    is killed (time, memory, output) or dies."""
    base = Path(tempfile.mkdtemp(prefix="lumos-sandbox-"))
    scratch = base / "scratch"
    scratch.mkdir()
    out_path = base / "stdout"
    request = json.dumps({"code": code, "scratch": str(scratch), "cpu_seconds": cpu_seconds,
                          "memory_bytes": memory_bytes, "output_bytes": output_bytes})
    try:
        with open(out_path, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-I", str(CHILD)], stdin=subprocess.PIPE, stdout=out,
                                    stderr=subprocess.DEVNULL, env={}, cwd=str(scratch),
                                    start_new_session=True, close_fds=True)
            start = time.monotonic()
            try:
                proc.communicate(request.encode(), timeout=wall_seconds)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise ToolTimeout(f"Code: wall-clock limit of {wall_seconds:g}s exceeded") from None
            finally:
                _kill_group(proc)  # anything it left behind in its session
        elapsed = time.monotonic() - start
        text = out_path.read_bytes()[: output_bytes + 4096].decode("utf-8", "replace")
        rc = proc.returncode
        if rc is not None and rc < 0:
            sig = -rc
            reason = {signal.SIGXCPU: f"CPU-time limit of {cpu_seconds:g}s exceeded",
                      signal.SIGKILL: f"killed (CPU-time limit of {cpu_seconds:g}s or memory)",
                      signal.SIGXFSZ: f"output limit of {output_bytes} bytes exceeded",
                      signal.SIGSEGV: "crashed (segmentation fault; memory limit?)"}.get(sig, f"killed by signal {sig}")
            raise (ToolTimeout if sig in (signal.SIGXCPU, signal.SIGKILL) else SandboxError)(f"Code: {reason}")
        lines = [ln for ln in text.splitlines() if ln.startswith("{")]
        if not lines:
            raise SandboxError(f"Code: the child exited with status {rc} and no answer after {elapsed:.1f}s")
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            raise SandboxError("Code: unreadable answer from the child") from None
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pass


class Code(Tool):
    name = "Code"
    description = "Generate a Python function that corresponds to the pseudo code"
    timeout_s = 0  # the sandbox enforces its own limits

    def __init__(self, cpu_seconds: float = 2.0, wall_seconds: float = 5.0, memory_mb: int = 512,
                 output_kb: int = 64):
        self.cpu_seconds, self.wall_seconds = cpu_seconds, wall_seconds
        self.memory_bytes, self.output_bytes = memory_mb * 2**20, output_kb * 1024

    def __call__(self, args: str, ctx: ToolContext) -> str:
        code = ctx.substitute(args, wrap=lambda v: v.strip().rstrip("."))
        if not code.strip():
            raise BadArguments("Code needs a program or pseudo-code")
        answer = run_sandboxed(translate_pseudo_code(code), self.cpu_seconds, self.wall_seconds,
                               self.memory_bytes, self.output_bytes)
        if not answer.get("ok"):
            raise ToolError(f"Code: {answer.get('error')}")
        value = answer.get("value")
        out = (answer.get("stdout") or "").strip()
        if value is not None:
            return str(value)
        if out:
            return out
        raise ToolError("Code: the program produced no value (end with an expression, print, or set `result`)")
