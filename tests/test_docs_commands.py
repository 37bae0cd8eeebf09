"""Every fenced shell command in README.md and docs/*.md runs as written, on CPU, the way a new
user runs it: from an empty folder outside the repository, with a fresh HOME, no `../shared`
beside the code, and only what `pip install -e .` gives (the tracked files of the checkout);
the one addition is XLA:CPU compile settings that make the tiny programs compile faster.

The commands of one page run in order in that page's folder, so a later command may use what
an earlier one wrote. A comment line just above a command (or at its end) changes what is
expected of it:

    # needs: gpu (why)       not run here: needs hardware, weights or network this test lacks
                             (applies to the commands below it, up to a blank line)
    # expect: exit N         the next command's documented exit status is N (an error the page
                             explains)

Untagged blocks count too when they start with a command; usage synopses (`<name>`, `[--x]`)
are not commands. The whole file runs in about 2-3 minutes on 2 CPU cores (most of it is JAX
compiling the training smoke test and generation).

A plain `lumos-jax ARGS` command (no pipes, redirections or substitutions) runs in one long-lived
worker process with the same environment and folder, through the console script's own entry
point (`lumos_jax.cli:main`), so the ~30 commands pay Python's and JAX's start-up once; anything
with shell syntax runs in bash, the console script included.
"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import COMPILE_FLAGS, REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
COMMAND = re.compile(r"^(lumos-jax|python3?|pip|huggingface-cli|curl|printf|echo|cat|ls|[A-Z_]+=\S*\s)\b")
SYNOPSIS = re.compile(r"<[a-zA-Z_]+>|\[--|\(--\w+ .*\|")
MARK = re.compile(r"#\s*(needs|expect):\s*(.+)$")
PER_COMMAND_TIMEOUT_S = 300
SHELL_SYNTAX = re.compile(r"[|&;<>()$`*?~{}\[\]\\!#'\"]|\n")

# The worker: requests (argv, cwd) as JSON lines on stdin; each command's stdout and stderr go
# to files (fd level, so output of C code and child processes is caught); `lumos_jax.cli.main`
# as the console script calls it; exit status as `sys.exit(main())` gives it.
WORKER = r"""
import json, os, sys, tempfile, traceback
requests = os.fdopen(os.dup(0), "r")
replies = os.fdopen(os.dup(1), "w")
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
from lumos_jax.cli import main
for line in requests:
    req = json.loads(line)
    os.chdir(req["cwd"])
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    saved = os.dup(1), os.dup(2)
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    sys.argv = ["lumos-jax", *req["argv"]]
    try:
        rc = main(req["argv"])
    except SystemExit as e:
        rc = e.code
        if isinstance(rc, str):
            print(rc, file=sys.stderr)
            rc = 1
    except BaseException:
        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    for fd in saved:
        os.close(fd)
    texts = []
    for f in (out, err):
        f.seek(0)
        texts.append(f.read().decode("utf-8", "replace"))
        f.close()
    replies.write(json.dumps({"rc": 0 if rc is None else int(rc), "stdout": texts[0], "stderr": texts[1]}) + "\n")
    replies.flush()
"""


@dataclass
class Command:
    doc: str
    line: int
    text: str
    needs: str | None = None
    expect: int = 0


def extract(path: Path) -> tuple[list[Command], int]:
    """The shell commands of one Markdown file, and how many synopsis lines were passed over."""
    commands, synopses = [], 0
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^\s*```(\S*)", lines[i])
        if not fence:
            i += 1
            continue
        lang, body, start = fence.group(1).lower(), [], i + 1
        i += 1
        while i < len(lines) and not lines[i].lstrip().startswith("```"):
            body.append((i + 1, lines[i]))
            i += 1
        i += 1
        first = next((t.strip() for _, t in body if t.strip() and not t.strip().startswith("#")), "")
        if not (lang in SHELL or (lang == "" and COMMAND.match(first))):
            continue
        marks: dict[str, str] = {}
        pending: list[tuple[int, str]] = []
        for n, text in body + [(start + len(body), "")]:
            stripped = text.strip()
            if pending:
                pending.append((n, text))
                if not stripped.endswith("\\"):
                    commands.append(_command(path, pending, marks))
                    pending, marks = [], _block_marks(marks)
                continue
            if not stripped:
                marks = {}
                continue
            if stripped.startswith("#"):
                m = MARK.search(stripped)
                if m:
                    marks[m.group(1)] = m.group(2).strip()
                continue
            if lang == "" and SYNOPSIS.search(stripped):
                synopses += 1
                continue
            pending = [(n, text)]
            if not stripped.endswith("\\"):
                commands.append(_command(path, pending, marks))
                pending, marks = [], _block_marks(marks)
    return commands, synopses


def _block_marks(marks: dict[str, str]) -> dict[str, str]:
    """`needs` holds for the following commands too (up to a blank line); `expect` for one."""
    return {k: v for k, v in marks.items() if k == "needs"}


def _command(path: Path, lines: list[tuple[int, str]], marks: dict[str, str]) -> Command:
    text = "\n".join(t for _, t in lines)
    for m in MARK.finditer(text):  # a mark at the end of the command itself
        marks = {**marks, m.group(1): m.group(2).strip()}
    expect = re.search(r"exit (\d+)", marks.get("expect", ""))
    return Command(path.name, lines[0][0], text, marks.get("needs"), int(expect.group(1)) if expect else 0)


def user_install(root: Path) -> Path:
    """What a user has after `git clone` + `pip install -e .`: the tracked files, elsewhere."""
    clone = root / "lumos-jax"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        src = REPO / name
        if src.is_file() and not name.startswith(("tests/", ".ci/")):
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, clone / name)
    return clone


def user_env(root: Path, clone: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LUMOS_", "XLA_", "PYTEST", "JAX_")) and k not in ("PYTHONPATH", "NO_COLOR")}
    bin_dir = str(Path(sys.executable).parent)  # the virtualenv's lumos-jax and python
    env.update(HOME=str(root / "home"), TMPDIR=str(root / "tmp"), PYTHONPATH=str(clone),
               PATH=f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}", JAX_PLATFORMS="cpu",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               # compiled programs are shared between the commands, and compiled with the test
               # session's faster XLA:CPU settings (speed only; conftest.COMPILE_FLAGS)
               JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               XLA_FLAGS=COMPILE_FLAGS)
    for d in ("home", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    return env


def plain_argv(text: str) -> list[str] | None:
    """The arguments of a `lumos-jax ARGS` command without shell syntax (line continuations
    joined), else None."""
    joined = re.sub(r"\\\n\s*", " ", text).strip()
    unquoted = re.sub(r"\"[^\"$`\\]*\"|'[^']*'", "", joined)
    if not joined.startswith("lumos-jax ") or SHELL_SYNTAX.search(unquoted):
        return None
    return shlex.split(joined)[1:]


class Worker:
    """One `python` process that runs plain `lumos-jax` commands in turn (see WORKER)."""

    def __init__(self, env: dict):
        self.env, self.proc = env, None

    def run(self, argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, "-c", WORKER], env=self.env, cwd=cwd, text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.proc.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd)}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:  # timed out or died: the next command gets a fresh worker
            self.close()
            raise subprocess.TimeoutExpired(["lumos-jax", *argv], timeout) if not ready else RuntimeError(
                f"docs worker died running lumos-jax {' '.join(argv)}")
        reply = json.loads(line)
        return subprocess.CompletedProcess(["lumos-jax", *argv], reply["rc"], reply["stdout"], reply["stderr"])

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def test_plain_argv_only_for_commands_without_shell_syntax():
    assert plain_argv("lumos-jax agent --gin_file=a.gin \\\n    --task 'Peter goes (to) the store'") == [
        "agent", "--gin_file=a.gin", "--task", "Peter goes (to) the store"]
    assert plain_argv("lumos-jax eval --gin.scripted_agent.kind=\"'wrong'\" --quiet") == [
        "eval", "--gin.scripted_agent.kind='wrong'", "--quiet"]
    for text in ("lumos-jax agent --list > tasks.txt", "lumos-jax assets | head", "cmp a \"$(lumos-jax assets)\"",
                 "python -c 'print(1)'", "lumos-jax assets $HOME", "lumos-jax a && ls"):
        assert plain_argv(text) is None, text


def test_every_documented_command_runs_as_written(tmp_path_factory):
    root = tmp_path_factory.mktemp("new_user")
    clone = user_install(root)
    env = user_env(root, clone)
    worker = Worker(env)
    executed, skipped, synopses, failures = [], [], 0, []
    start = time.perf_counter()
    for doc in DOCS:
        commands, n_synopses = extract(doc)
        synopses += n_synopses
        folder = root / "work" / doc.stem
        folder.mkdir(parents=True)
        for c in commands:
            if c.needs:
                skipped.append(c)
                continue
            assert not (folder.parent / "shared").exists() and not (clone.parent / "shared").exists()
            t0 = time.perf_counter()
            argv = plain_argv(c.text)
            if argv is not None:
                p = worker.run(argv, folder, PER_COMMAND_TIMEOUT_S)
            else:
                p = subprocess.run(["bash", "-o", "pipefail", "-c", c.text], cwd=folder, env=env,
                                   capture_output=True, text=True, timeout=PER_COMMAND_TIMEOUT_S)
            executed.append((c, time.perf_counter() - t0))
            if p.returncode != c.expect:
                tail = (p.stdout[-1500:] + "\n" + p.stderr[-1500:]).strip()
                failures.append(f"{c.doc}:{c.line}: exit {p.returncode} (documented: {c.expect})\n"
                                f"  $ {c.text}\n{tail}")
    worker.close()
    print(f"\ndocs commands: {len(executed)} executed, {len(skipped)} not run, {synopses} synopses passed over, "
          f"{time.perf_counter() - start:.0f}s")
    for c, seconds in sorted(executed, key=lambda x: -x[1])[:5]:
        print(f"  slowest: {seconds:5.1f}s {c.doc}:{c.line}")
    for c in skipped:
        print(f"  not run: {c.doc}:{c.line} (needs: {c.needs})")
    assert not failures, "\n\n".join(failures)
    assert len(executed) >= 30, f"only {len(executed)} documented commands ran"
    assert all(REPO not in (root / "work" / c.doc).parents for c, _ in executed)


def test_extract_reads_marks_continuations_and_synopses(tmp_path):
    """The extractor itself: what counts as a command, and how marks attach."""
    page = tmp_path / "page.md"
    page.write_text("\n".join([
        "```bash", "# a plain comment", "lumos-jax assets", "# needs: gpu (an H100)",
        "lumos-jax train \\", "  --workdir=w", "lumos-jax convert a b", "",
        "lumos-jax agent --task x  # expect: exit 1", "lumos-jax assets", "```",
        "```", "lumos-jax eval --gin_file=<name>.gin [--limit N]", "```",
        "```python", "print('not shell')", "```", "```", "just text", "```"]))
    commands, synopses = extract(page)
    assert [(c.line, c.needs, c.expect) for c in commands] == [
        (3, None, 0), (5, "gpu (an H100)", 0), (7, "gpu (an H100)", 0), (9, None, 1), (10, None, 0)]
    assert commands[1].text == "lumos-jax train \\\n  --workdir=w" and synopses == 1
