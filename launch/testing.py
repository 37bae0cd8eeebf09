"""Golden-file support for the launchers' dry-run tests (tests/test_launch_*.py).

`LUMOS_UPDATE_GOLDENS=1 pytest tests/test_launch_*.py` rewrites the goldens; review
the diff like code: it is exactly what users' clusters would be asked to run.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import os
from pathlib import Path
from typing import Callable, Sequence

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "tests" / "golden" / "launch"


def dry_run_output(main: Callable[[Sequence[str]], int], argv: Sequence[str]) -> str:
    """stdout of `main([... , --dry_run])`; the exit status must be 0."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([*argv, "--dry_run"])
    assert code == 0, f"dry run exited {code}: {out.getvalue()[-2000:]}"
    return out.getvalue()


def assert_matches_golden(text: str, name: str) -> None:
    path = GOLDEN_DIR / name
    if os.environ.get("LUMOS_UPDATE_GOLDENS"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"missing golden {path}; create it with LUMOS_UPDATE_GOLDENS=1"
    expected = path.read_text()
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                            f"golden/{name}", "dry run"))
        raise AssertionError(f"dry-run output differs from {path}:\n{diff[:4000]}")
