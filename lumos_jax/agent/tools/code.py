"""Code: run Python (or the reference's pseudo-code) in a separate, walled-off process.

The walls are built by `sandbox.py` outside the child's interpreter: bubblewrap namespaces
(user, mount, PID, network, IPC, UTS), a read-only root with a private size-capped scratch,
seccomp, rlimits and an unprivileged uid; where the host has no bubblewrap or user
namespaces, an `rlimits-only` fallback that every answer names. The child's audit hook
(`sandbox_child.py`) is a second line of defence. This is not a boundary against kernel
exploits: docs/security.md says how to run tools under gVisor or in a VM.

Accepted argument forms: a Python expression (`141 % 1 == 0`), a program whose last line is
an expression or that sets `result`/`answer` or prints, and the reference's pseudo-code
`If cond, a, b` (-> `a if cond else b`).
"""

from __future__ import annotations

import json
import signal

from lumos_jax.agent.tools import sandbox
from lumos_jax.agent.tools.base import BadArguments, Tool, ToolContext, ToolError, ToolTimeout

_OPEN, _CLOSE = "([{", ")]}"


def _split_top_level(text: str, limit: int) -> list[str]:
    """Split on commas outside brackets, at most `limit` times; one linear pass."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0 and len(parts) < limit:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def translate_pseudo_code(code: str) -> str:
    """The reference's pseudo-code `If cond, a, b` to Python (the only form seen in its data);
    anything else is returned unchanged. Linear time in the input length."""
    text = code.strip()
    if "\n" in text or len(text) < 4 or not text.startswith("If") or not text[2].isspace():
        return code
    parts = [p.strip() for p in _split_top_level(text[3:], 2)]
    if len(parts) != 3 or not all(parts):
        return code
    cond, a, b = parts
    return f"({a}) if ({cond}) else ({b})"


class SandboxError(ToolError):
    kind = "sandbox_error"


def run_sandboxed(code: str, cpu_seconds: float = 2.0, wall_seconds: float = 5.0,
                  memory_bytes: int = 512 * 2**20, output_bytes: int = 64 * 1024,
                  isolation: str | None = None, audit_hook: bool = True) -> dict:
    """Run `code` in the sandbox; returns the child's answer dict (`ok`, `stdout`, `value`,
    `error`) plus `isolation`, `seccomp` and `landlock`. `audit_hook=False` leaves only the kernel walls (for
    tests that check them alone). Raises ToolTimeout / SandboxError (naming the
    isolation) when the child is killed (time, memory, output) or dies."""
    limits = sandbox.Limits(cpu_seconds=cpu_seconds, wall_seconds=wall_seconds, memory_bytes=memory_bytes,
                            output_bytes=output_bytes)
    try:
        done = sandbox.run({"code": code, "audit_hook": audit_hook}, limits, isolation)
    except sandbox.SandboxUnavailable as e:
        raise SandboxError(f"Code: {e}") from None
    where = f"[isolation: {done.isolation}]"
    if done.timed_out:
        raise ToolTimeout(f"Code: wall-clock limit of {wall_seconds:g}s exceeded {where}")
    rc = done.returncode
    sig = -rc if rc is not None and rc < 0 else rc - 128 if done.isolation == sandbox.BUBBLEWRAP and rc and rc > 128 \
        else None
    if sig:
        reason = {signal.SIGXCPU: f"CPU-time limit of {cpu_seconds:g}s exceeded",
                  signal.SIGKILL: f"killed (CPU-time limit of {cpu_seconds:g}s or memory)",
                  signal.SIGXFSZ: f"output limit of {output_bytes} bytes exceeded",
                  signal.SIGSEGV: "crashed (segmentation fault; memory limit?)",
                  signal.SIGSYS: "stopped by the seccomp filter"}.get(sig, f"killed by signal {sig}")
        raise (ToolTimeout if sig in (signal.SIGXCPU, signal.SIGKILL) else SandboxError)(f"Code: {reason} {where}")
    if len(done.stdout) >= limits.stdout_cap:  # Python ignores SIGXFSZ: writes fail with EFBIG instead
        raise SandboxError(f"Code: output limit of {output_bytes} bytes exceeded {where}")
    text = done.stdout.decode("utf-8", "replace")
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    if not lines:
        raise SandboxError(f"Code: the child exited with status {rc} and no answer {where}")
    try:
        answer = json.loads(lines[-1])
    except json.JSONDecodeError:
        raise SandboxError(f"Code: unreadable answer from the child {where}") from None
    if not isinstance(answer, dict):
        raise SandboxError(f"Code: unreadable answer from the child {where}")
    answer.update(isolation=done.isolation, seccomp=done.seccomp, landlock=done.landlock)
    return answer


class Code(Tool):
    name = "Code"
    description = "Generate a Python function that corresponds to the pseudo code"
    timeout_s = 0  # the sandbox enforces its own limits

    def __init__(self, cpu_seconds: float = 2.0, wall_seconds: float = 5.0, memory_mb: int = 512,
                 output_kb: int = 64, isolation: str | None = None):
        self.cpu_seconds, self.wall_seconds = cpu_seconds, wall_seconds
        self.memory_bytes, self.output_bytes = memory_mb * 2**20, output_kb * 1024
        self.isolation = isolation  # None: the best the host offers (sandbox.isolation())

    def __call__(self, args: str, ctx: ToolContext) -> str:
        code = ctx.substitute(args, wrap=lambda v: v.strip().rstrip("."))
        if not code.strip():
            raise BadArguments("Code needs a program or pseudo-code")
        answer = run_sandboxed(translate_pseudo_code(code), self.cpu_seconds, self.wall_seconds,
                               self.memory_bytes, self.output_bytes, self.isolation)
        if not answer.get("ok"):
            raise ToolError(f"Code: {answer.get('error')} [isolation: {answer['isolation']}]")
        value = answer.get("value")
        out = (answer.get("stdout") or "").strip()
        if value is not None:
            return str(value)
        if out:
            return out
        raise ToolError("Code: the program produced no value (end with an expression, print, or set `result`)")
