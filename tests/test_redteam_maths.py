"""Red team for the maths tools: code-execution payloads through every entry point, and
denial-of-service formulas, as an attacker would send them (issue 12).

The payloads are live: `test_payloads_are_live` shows sympy's own `parse_expr` (what the
tools used before) running them. Each payload is then sent through every way text reaches
maths — tool arguments, `Output = ...`, `R1(R2)`, combined equations, a Define'd value, a
previous tool's output — under both protocols, and must leave the sentinel file uncreated
and give the agent an error observation (or, for Define, the inert text itself).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from lumos_jax.agent.execution import Executor
from lumos_jax.agent.parsing import parse_action
from lumos_jax.agent.tools.base import ToolContext, ToolRegistry
from lumos_jax.agent.tools.limits import ForkServer, Limits
from lumos_jax.agent.tools.maths import maths_tools

SENTINEL = "SENTINEL"  # replaced by a path in the test's tmp dir
PAYLOADS = [
    "().__class__.__base__.__subclasses__()[104].load_module('os').system('touch SENTINEL')",
    "[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'catch_warnings'][0]()"
    "._module.__builtins__['__import__']('os').system('touch SENTINEL')",
    "__import__('os').system('touch SENTINEL')",
    "__import__(\"subprocess\").call([\"touch\", \"SENTINEL\"])",
    "(lambda: __import__('os').system('touch SENTINEL'))()",
    "lambda x: open('SENTINEL', 'w')",
    "exec(\"import os; os.system('touch SENTINEL')\")",
    "eval(\"__import__('os').system('touch SENTINEL')\")",
    "compile(\"open('SENTINEL','w')\", 'a', 'exec')",
    "open('SENTINEL', 'w').write('x')",
    "f\"{__import__('os').system('touch SENTINEL')}\"",
    "os.system('touch SENTINEL')",
    "getattr(__builtins__, '__import__')('os').system('touch SENTINEL')",
    "globals()['__builtins__']['exec'](\"open('SENTINEL','w')\")",
    "x.__class__.__init__.__globals__['os'].system('touch SENTINEL')",
    "Symbol('x').__class__.__mro__[-1].__subclasses__()",
    "Integer(1).__class__.__subclasses__()",
    "sympify(\"__import__('os').system('touch SENTINEL')\")",
    "parse_expr(\"__import__('os').system('touch SENTINEL')\")",
    "Function('system')('touch SENTINEL')",
    "sqrt(__import__('os').system('touch SENTINEL'))",
    "max(1, __import__('os').system('touch SENTINEL'))",
    "2 + __builtins__.open('SENTINEL', 'w')",
    "x if __import__('os').system('touch SENTINEL') else y",
    "1; __import__('os').system('touch SENTINEL')",
    "import os; os.system('touch SENTINEL')",
    "\"{0.__class__}\".format(1)",
    "b'\\x41' + open('SENTINEL','w')",
    "[x for x in (open('SENTINEL', 'w'),)]",
    "{'a': open('SENTINEL', 'w')}",
    "＿＿import＿＿('os').system('touch SENTINEL')",  # fullwidth: Python folds it to __import__
    "exp(1).__class__.__init__.__globals__",
    "breakpoint()",
    "Mod(1, 2).func.__globals__['__builtins__']['exec'](\"open('SENTINEL','w')\")",
    "__builtins__.__dict__['__import__']('os').system('touch SENTINEL')",
    "x = __import__('os').system('touch SENTINEL')",
]


def _entry_points(p: str) -> list[tuple[str, list[str], dict]]:
    """(name, actions run in order, starting variables): every way text reaches maths."""
    return [
        ("Calculator", [f"R1 = Calculator({p})"], {}),
        ("SetEquation", [f"R1 = SetEquation(x = {p})"], {}),
        ("SolveEquation", [f"R1 = SolveEquation({p} = 2)"], {}),
        ("SolveInequality", [f"R1 = SolveInequality({p} > 2)"], {}),
        ("Count", [f"R1 = Count(2, 4, ..., {p})"], {}),
        ("Output = text", [f"Output = {p}"], {}),
        ("Output = variables", ["Output = R1 + 1"], {"R1": p}),
        ("R1(R2) formula", ["R3 = R1(R2)"], {"R1": p, "R2": "x = 1"}),
        ("R1(R2) argument", ["R3 = Calculator(R1(R2))"], {"R1": "x^2 + 1", "R2": f"x = {p}"}),
        ("combined equations", ["R3 = Calculator(R1 + R2)"], {"R1": "a = b", "R2": f"x = {p}"}),
        ("Define -> Calculator", [f"R1 = Define({p})", "R2 = Calculator(R1 * 2)"], {}),
        ("tool output in a formula", ["R2 = Calculator(R1 + 1)", "R3 = SolveEquation(x = R1)"],
         {"R1": f"The page says: {p}"}),
        ("tool output alone", ["R2 = Calculator(R1)", "R3 = SetEquation(2 * R1 = 4)"], {"R1": p}),
    ]


def test_there_are_enough_payloads_and_entry_points():
    assert len(PAYLOADS) >= 30 and len(_entry_points("1")) >= 10


def test_payloads_are_live(tmp_path):
    """What the tools did before: sympy's parser evaluates these payloads and runs the command."""
    live = [2, 4, 10, 21]
    sentinels = [tmp_path / f"pwned{k}" for k in live]
    code = "from sympy.parsing.sympy_parser import parse_expr\n" + "".join(
        f"try:\n    parse_expr({PAYLOADS[k].replace(SENTINEL, str(path))!r})\nexcept Exception:\n    pass\n"
        for k, path in zip(live, sentinels))
    subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, timeout=120)
    assert [p.exists() for p in sentinels] == [True] * len(live)


@pytest.mark.parametrize("protocol", ["robust", "reference"])
def test_code_execution_payloads_are_inert_everywhere(tmp_path, protocol):
    executor = Executor(ToolRegistry(maths_tools(protocol)))
    sentinel = tmp_path / "pwned"
    seen = numbers = echoes = 0
    for k, raw in enumerate(PAYLOADS):
        p = raw.replace(SENTINEL, str(sentinel))
        for name, actions, variables in _entry_points(p):
            ctx = ToolContext(variables=dict(variables))
            records = [executor.run_one(parse_action(a), ctx) for a in actions]
            assert not sentinel.exists(), (k, name, protocol)
            where = (k, name, protocol, [r.observation for r in records])
            last = records[-1]
            if protocol == "robust" and (variables or name.startswith("Define")) and last.ok:
                # Robust mode reads the first number out of a prose value ("about 25 people");
                # from a payload that is all it takes: only that number is used.
                assert re.fullmatch(r"[-\d\s*=()]+", last.observation), where
                numbers += 1
                continue
            if protocol == "reference" and last.tool == "SetEquation" and last.ok:
                # The reference's SetEquation returns its text unread (math_tool.py:33-37): inert text.
                assert p.strip() in last.observation, where
                echoes += 1
                continue
            # The agent sees a one-line typed error, never a traceback or a computed payload.
            assert last.observation.startswith("Error (") and "Traceback" not in last.observation, where
            assert last.error_kind in ("bad_arguments", "parse_error", "undefined_variable", "unknown_tool",
                                       "tool_error"), where
            if name.startswith("Define"):  # Define stores the inert text itself; nothing reads it as code
                assert records[0].ok and records[0].observation == p.strip(), where
            seen += 1
    assert seen + numbers + echoes == len(PAYLOADS) * len(_entry_points("1"))
    assert seen >= 7 * len(PAYLOADS)  # the entry points without a variable always refuse


def test_error_observations_name_what_and_where():
    ctx = ToolContext(variables={})
    rec = Executor(ToolRegistry(maths_tools())).run_one(parse_action("R1 = Calculator(__import__('os'))"), ctx)
    assert rec.observation == ("Error (bad_arguments): unexpected character '_' at position 0 of "
                               "\"__import__('os')\"")
    rec = Executor(ToolRegistry(maths_tools())).run_one(parse_action("R1 = Calculator(x.real)"), ctx)
    assert rec.observation == "Error (bad_arguments): unexpected character '.' at position 1 of 'x.real'"


# ------------------------------------------------------------------ denial of service

LIMITS = Limits(cpu_s=1.0, wall_s=2.0, memory_mb=512)
_CHAIN = {"R1": "+".join(["x"] * 180)}
DOS = [
    ("R1 = Calculator(99999999!)", {}, "factorial argument too large"),
    ("R1 = Calculator(factorial(10^8))", {}, "factorial argument too large"),
    ("R1 = Calculator((x+y+z)**(99*99))", {}, "would expand to more than"),
    ("R1 = Calculator(10**10**10)", {}, "exponent 10000000000 too large"),
    ("R1 = Calculator(9^9^9)", {}, "too large"),
    ("R1 = Calculator(2000!^10000)", {}, "digits"),
    ("R1 = Calculator(binomial(10^9, 10^8))", {}, "binomial arguments too large"),
    ("R1 = SolveEquation((x+1)^9000 = 2)", {}, "would expand"),
    ("R1 = Calculator(" + "(" * 500 + "1" + ")" * 500 + ")", {}, "nested deeper"),
    ("R1 = Calculator(" + "-" * 1500 + "1)", {}, "nested deeper"),
    ("R1 = Calculator(" + "2^" * 300 + "2)", {}, "nested deeper"),
    ("R1 = Calculator(2^2^2^2^2^2)", {}, "too large"),
    ("R1 = Calculator(" + "9" * 1000 + ")", {}, "digits"),
    ("R2 = Define(" + "*".join(["R1"] * 200) + ")", _CHAIN, "characters"),
    ("R2 = Calculator(" + "*".join(["R1"] * 200) + ")", _CHAIN, "characters"),
    ("R1 = Calculator(" + "x+" * 1500 + "x)", {}, "longer than"),
    # passes every size check; sympy's Groebner basis would run for minutes: killed at the limit
    ("R1 = SolveEquation(x^5 + y^5 + z^5 = 1, x^3 y + z^2 = 2, x y z + x^2 = 3)", {}, "limit"),
]


def _define_chain(executor, ctx) -> list:
    """A Define chain where each value repeats the previous one (issue 12: 1.1e9 characters)."""
    records = [executor.run_one(parse_action("R1 = Define(" + "+".join(["x"] * 60) + ")"), ctx)]
    for n in range(2, 8):
        records.append(executor.run_one(parse_action(f"R{n} = Define(" + "*".join([f"R{n - 1}"] * 6) + ")"), ctx))
    return records


def _watch_other_threads(stop: threading.Event, gaps: dict) -> list[threading.Thread]:
    """A pure-Python loop and a trivial maths call in two threads; the longest stall of each."""
    calc = maths_tools(limits=LIMITS)[0]

    def python_loop():
        last = time.perf_counter()
        while not stop.is_set():
            sum(range(200))
            now = time.perf_counter()
            gaps["python"] = max(gaps.get("python", 0.0), now - last)
            last = now
            time.sleep(0.005)

    def maths_loop():
        while not stop.is_set():
            t = time.perf_counter()
            assert calc("1 + 1", ToolContext(variables={})) == "2"
            gaps["maths"] = max(gaps.get("maths", 0.0), time.perf_counter() - t)
            time.sleep(0.02)

    threads = [threading.Thread(target=python_loop), threading.Thread(target=maths_loop)]
    for t in threads:
        t.start()
    return threads


def test_dos_formulas_fail_fast_and_never_stall_other_threads():
    executor = Executor(ToolRegistry(maths_tools(limits=LIMITS)))
    assert executor.run_one(parse_action("R1 = Calculator(1 + 1)"), ToolContext(variables={})).ok  # warm
    stop, gaps = threading.Event(), {}
    threads = _watch_other_threads(stop, gaps)
    try:
        for action, variables, message in DOS:
            ctx = ToolContext(variables=dict(variables))
            start = time.perf_counter()
            rec = executor.run_one(parse_action(action), ctx)
            elapsed = time.perf_counter() - start
            assert not rec.ok and message in rec.observation, (action[:60], rec.observation)
            assert elapsed < LIMITS.wall_s + 2, (action[:60], elapsed)
            assert "R1" not in ctx.variables or action.startswith("R2")
        ctx = ToolContext(variables={})
        start = time.perf_counter()
        chain = _define_chain(executor, ctx)
        assert time.perf_counter() - start < LIMITS.wall_s + 2
        first_refused = next(r for r in chain if not r.ok)
        assert chain[0].ok and chain[1].ok and "characters (limit" in first_refused.observation, first_refused
        assert all(len(str(v)) <= 5000 for v in ctx.variables.values())
    finally:
        stop.set()
        for t in threads:
            t.join()
    print("longest stall of the other threads (s):", gaps)
    assert gaps["python"] < 1.0 and gaps["maths"] < 1.0, gaps


def test_limits_runner_kills_at_cpu_wall_memory_and_output_limits():
    """The runner itself, on stdlib functions that burn CPU, sleep, allocate and flood."""
    server = ForkServer(("math", "time", "posix", "textwrap"), max_children=3)
    try:
        cases = [("math:factorial", [10**8], Limits(cpu_s=1, wall_s=30), "timeout", "CPU-time limit of 1s"),
                 ("time:sleep", [60], Limits(cpu_s=5, wall_s=1), "timeout", "wall-clock limit of 1s"),
                 ("posix:urandom", [2**31], Limits(memory_mb=256), "resource_limit", "memory limit of 256 MiB"),
                 ("textwrap:indent", ["a\n" * 10**6, "xx"], Limits(), "resource_limit", "exceeds 1048576"),
                 ("builtins:eval", ["1"], Limits(), "tool_error", "unknown function"),
                 ("math:_private", [], Limits(), "tool_error", "unknown function")]
        server.call("math:gcd", [1, 1])  # started and warm
        outcomes = {}

        def run(case):
            fn, args, limits, _, _ = case
            start = time.perf_counter()
            try:
                outcomes[fn] = (server.call(fn, args, limits), time.perf_counter() - start)
            except Exception as e:  # noqa: BLE001 - recorded for the assertions
                outcomes[fn] = (e, time.perf_counter() - start)
        threads = [threading.Thread(target=run, args=(case,)) for case in cases]  # concurrently
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for fn, _, limits, kind, message in cases:
            error, elapsed = outcomes[fn]
            assert getattr(error, "kind", None) == kind and message in str(error), (fn, error)
            assert elapsed < limits.wall_s + 2, (fn, elapsed)
        assert server.call("math:gcd", [12, 18]) == 6  # the pool is still serving after the kills
        assert server.call("textwrap:dedent", ["  a"]) == "a"
    finally:
        server.close()


def test_killed_worker_and_dead_server_are_errors_then_replaced():
    server = ForkServer(("math", "time"), max_children=2)
    try:
        assert server.call("math:gcd", [4, 6]) == 2
        box = {}

        def waiting_call():
            try:
                server.call("time:sleep", [30], Limits(wall_s=20))
            except Exception as e:  # noqa: BLE001 - recorded for the assertion
                box["error"] = e
        t = threading.Thread(target=waiting_call)
        t.start()
        time.sleep(0.5)
        first = server._proc.pid
        start = time.perf_counter()
        with open(f"/proc/{first}/task/{first}/children") as f:  # the OOM killer takes the workers
            for pid in f.read().split():
                os.kill(int(pid), signal.SIGKILL)
        t.join(10)
        assert not t.is_alive() and time.perf_counter() - start < 3
        assert box["error"].kind == "resource_limit" and "killed by signal 9" in str(box["error"]), box
        server._proc.kill()  # ... and then the server itself
        server._proc.wait()
        with server._lock:
            for w in server._idle:
                w.close()
            server._idle.clear()
        assert server.call("math:gcd", [9, 6]) == 3 and server._proc.pid != first
    finally:
        server.close()
