"""Code sandbox: escape attempts are contained with a clear error (few, quick processes)."""

import os
import time
import uuid

import pytest

from lumos_jax.agent.tools import sandbox
from lumos_jax.agent.tools.base import ToolContext, ToolError, ToolTimeout
from lumos_jax.agent.tools.code import Code, run_sandboxed, translate_pseudo_code

FAST = dict(cpu_seconds=1, wall_seconds=4)


def _ask(code: str) -> dict:
    return run_sandboxed(code, **FAST)


def test_reference_pseudo_code_and_python_run():
    assert translate_pseudo_code("If 141 % 1 == 0, 1, 0") == "(1) if (141 % 1 == 0) else (0)"
    tool = Code(**FAST)
    assert tool("If 141 % 1 == 0, 1, 0", ToolContext(variables={})) == "1"
    assert tool("import math\nresult = math.comb(R1, 2)", ToolContext(variables={"R1": "10"})) == "45"


def test_escape_attempts_are_contained():
    outside = f"/tmp/lumos-sandbox-escape-{uuid.uuid4().hex}"
    attempts = {
        "write outside": f"open({outside!r}, 'w').write('x')",
        "socket": "import socket; socket.create_connection(('93.184.216.34', 80), timeout=1)",
        "raw socket module": "__import__('_socket').socket()",
        "fork bomb": "import os\nwhile True: os.fork()",
        "subprocess": "__import__('os').system('touch " + outside + "')",
        "parent environment": "open('/proc/%d/environ' % __import__('os').getppid()).read()",
        "10 GB allocation": "x = bytearray(10 * 1024 ** 3)",
    }
    for name, code in attempts.items():
        answer = _ask(code)
        assert not answer["ok"], name
        assert answer["error"] and ("sandbox" in answer["error"] or "MemoryError" in answer["error"]), (name, answer)
    assert not os.path.exists(outside)
    # Its own environment is empty: nothing of ours leaks (no PATH, HOME, keys).
    env = _ask("import os; sorted(os.environ)")
    assert env["ok"] and "PATH" not in env["value"] and "HOME" not in env["value"]
    # The scratch directory is writable.
    assert _ask("open('f.txt', 'w').write('hi'); open('f.txt').read()")["value"] == "hi"
    listing = _ask("import os, pathlib; pathlib.Path('g.txt').write_text('x'); (sorted(os.listdir()), os.getcwd())")
    assert listing["ok"] and listing["value"].startswith("(['g.txt'], "), listing


def test_infinite_loop_and_flood_are_stopped():
    with pytest.raises(ToolTimeout, match="CPU-time limit"):
        _ask("while True: pass")
    flood = _ask("print('x' * 10**7)")
    assert not flood["ok"] and "output limit" in flood["error"]


def test_code_tool_reports_errors_as_tool_errors():
    with pytest.raises(ToolError, match="ZeroDivisionError"):
        Code(**FAST)("1/0", ToolContext(variables={}))


def test_pseudo_code_translation_is_linear_time():
    """The old lazy three-group regex was quadratic: 0.22 s for `If` + 5,000 spaces here, so
    about 6 minutes for the 200,000 below; the translation must stay linear."""
    adversarial = ["If " + " ," * 100_000 + "x", "If " + "a, " * 100_000, "If " + "(" * 200_000 + ", 1, 0",
                   "If " + "x" * 200_000 + "\n, 1, 0", "If  " + "\t" * 200_000, "If " + " " * 200_000]
    start = time.perf_counter()
    for text in adversarial:
        translate_pseudo_code(text)
    assert time.perf_counter() - start < 1.0
    # Commas inside calls stay with their argument (the reference's form, with a call in it).
    assert translate_pseudo_code("If max(3, 4) > 3, 1, 0") == "(1) if (max(3, 4) > 3) else (0)"
    assert translate_pseudo_code("print(1)") == "print(1)"


def test_answers_name_their_isolation():
    answer = _ask("1 + 1")
    assert answer["value"] == "2" and answer["isolation"] in ("bubblewrap", "rlimits-only")
    with pytest.raises(ToolError, match=r"\[isolation: (bubblewrap|rlimits-only)\]"):
        Code(**FAST)("1/0", ToolContext(variables={}))


def test_host_without_bubblewrap_falls_back_and_says_so(monkeypatch, caplog):
    """The probe finds no bwrap on PATH: rlimits-only, logged, and named in the answer."""
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    sandbox._bwrap_works.cache_clear()
    sandbox._warn_once.cache_clear()
    try:
        with caplog.at_level("WARNING", logger=sandbox.__name__):
            assert sandbox.isolation() == sandbox.RLIMITS_ONLY
            answer = _ask("6 * 7")
        assert answer["value"] == "42" and answer["isolation"] == "rlimits-only"
        assert "no bwrap on PATH" in caplog.text and "rlimits-only" in caplog.text
    finally:
        sandbox._bwrap_works.cache_clear()
