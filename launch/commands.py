"""Run or print shell commands: one object, so every launcher gets `--dry_run` for free.

A launcher never calls subprocess directly; it asks a `Shell`. In dry-run mode the
shell prints each command (shell-quoted, runnable by hand) and answers with the
canned output the caller supplies, so the launcher walks its normal path.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence, TextIO


class LaunchError(RuntimeError):
    """A launch step failed; the message is one line naming the step and command."""


@dataclass
class Result:
    returncode: int
    stdout: str = ""
    stderr: str = ""


def format_command(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """`A=1 B=2 cmd arg ...`, quoted so it can be pasted into bash."""
    prefix = [f"{k}={shlex.quote(str(v))}" for k, v in (env or {}).items()]
    return " ".join(prefix + [shlex.quote(str(a)) for a in argv])


class Shell:
    """Runs commands, or prints them when `dry_run`; `note` lines explain the steps."""

    def __init__(self, dry_run: bool = False, out: TextIO | None = None):
        self.dry_run = dry_run
        self.out = out or sys.stdout

    def note(self, text: str) -> None:
        """A comment line (`# ...`) saying what the next commands are for."""
        for line in text.splitlines() or [""]:
            print(f"# {line}".rstrip(), file=self.out, flush=True)

    def show(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def run(self, argv: Sequence[str], *, check: bool = True, capture: bool = False,
            dry_output: str = "", dry_returncode: int = 0, cwd: str | None = None,
            timeout: float | None = None) -> Result:
        """Run `argv`; with `check`, a non-zero exit raises LaunchError.

        `dry_output` / `dry_returncode` are what a dry run pretends the command gave.
        """
        argv = [str(a) for a in argv]
        if self.dry_run:
            self.show(format_command(argv))
            return Result(dry_returncode, dry_output, "")
        if not capture:
            self.show(f"+ {format_command(argv)}")
        try:
            proc = subprocess.run(argv, cwd=cwd, text=True, timeout=timeout,
                                  stdout=subprocess.PIPE if capture else None,
                                  stderr=subprocess.PIPE if capture else None)
        except FileNotFoundError:
            raise LaunchError(f"command not found: {argv[0]} (needed for: {format_command(argv)[:200]})") from None
        except subprocess.TimeoutExpired:
            if check:
                raise LaunchError(f"timed out after {timeout}s: {format_command(argv)[:200]}") from None
            return Result(124, "", "timeout")
        result = Result(proc.returncode, proc.stdout or "", proc.stderr or "")
        if check and proc.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            tail = f": {detail[-1]}" if detail else ""
            raise LaunchError(f"exit {proc.returncode} from {format_command(argv)[:200]}{tail}")
        return result
