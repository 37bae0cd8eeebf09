"""`lumos-jax` console script: one subcommand per job, each taking gin files/bindings.

Subcommands are imported lazily so `lumos-jax convert` does not pay for the agent's
imports. Each target is `module:function(argv) -> int`.

Errors: bad user input (a `UserError`, a missing file, a ValueError raised by our own code)
is one line on stderr, exit 2; anything else (a JAX error, a bug) keeps its traceback.
`--debug` (anywhere on the line) or `LUMOS_DEBUG=1` always shows the full traceback and
logs at DEBUG. Logs of the `lumos_jax`, `data_pipeline` and `launch` loggers go to stderr,
configured here once per command; a command's own output stays on stdout.
`kill -USR1 <pid>` prints every thread's Python stack to stderr (a long eval that seems stuck).
"""

from __future__ import annotations

import faulthandler
import importlib
import logging
import os
import re
import signal
import sys
from pathlib import Path

import gin

from lumos_jax.assets import expand_arg
from lumos_jax.config import gin_bindings
from lumos_jax.errors import UserError

# our packages: a ValueError raised in one of them is a message for the user
OWN_CODE = tuple(str(Path(__file__).resolve().parent.parent / pkg) + os.sep
                 for pkg in ("lumos_jax", "data_pipeline", "launch"))
LOGGERS = ("lumos_jax", "data_pipeline", "launch")
DEBUG_ENV = ("LUMOS_DEBUG", "LUMOS_JAX_DEBUG")  # the second: the old name

SUBCOMMANDS = {
    "convert": ("lumos_jax.checkpoints.convert:main", "HF directory <-> lumos-jax checkpoint"),
    "quantize": ("lumos_jax.inference.quantize_cli:main", "an int8-weight checkpoint for decoding"),
    "generate": ("lumos_jax.generation:main", "generate text from prompts (file, stdin or --prompt)"),
    "demo": ("lumos_jax.demo:main", "the CPU demo on the bundled model and data"),
    "assets": ("lumos_jax.assets:main", "list the bundled model and data (`bundled:NAME` paths)"),
    "data": ("data_pipeline.cli:main", "convert / build / inspect training data"),
    "train": ("lumos_jax.training.cli:main", "train a planning or grounding module"),
    "serve": ("lumos_jax.inference.server:main", "OpenAI-compatible HTTP server"),
    "agent": ("lumos_jax.agent.cli:main", "run Lumos-I / Lumos-O episodes"),
    "eval": ("lumos_jax.evaluation.cli:main", "evaluate an agent on a dataset"),
}


def usage() -> str:
    lines = ["usage: lumos-jax <command> [--gin_file=F ...] [--gin.X=Y ...] [--debug] [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "--debug (or LUMOS_DEBUG=1): full tracebacks and DEBUG logs"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or any(os.environ.get(v, "") not in ("", "0") for v in DEBUG_ENV)
    argv = [a for a in argv if a != "--debug"]
    if hasattr(signal, "SIGUSR1"):
        try:
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        except (AttributeError, ValueError, OSError):  # stderr without a file descriptor (captured)
            pass
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"lumos-jax: error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    target = SUBCOMMANDS[name][0]
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            print(f"lumos-jax: error: command {name!r} is not available in this build", file=sys.stderr)
            return 2
        raise
    rest = [expand_arg(a) for a in rest]
    saved = configure_logging(debug)
    try:
        return int(getattr(module, func_name)(rest) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"lumos-jax {name}: interrupted (ctrl-C)", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError) as e:
        if debug or not is_user_error(e):
            raise  # a JAX error or a bug: the traceback is what helps
        print(f"lumos-jax {name}: error: {error_line(e, rest)}", file=sys.stderr)
        return 2
    finally:
        restore_logging(saved)


def is_user_error(e: BaseException) -> bool:
    """A UserError, a missing file, or a ValueError raised by our own code (its innermost
    frame is in one of our packages); a ValueError from JAX, numpy, ... is not."""
    if isinstance(e, (UserError, FileNotFoundError)):
        return True
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(OWN_CODE)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted (a redirect, a test's capture)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure_logging(debug: bool = False) -> list[tuple]:
    """Our loggers to stderr, INFO (DEBUG with --debug), bare messages; returns what
    `restore_logging` puts back (main runs inside other programs too: tests, notebooks)."""
    saved = []
    for name in LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.level, logger.propagate))
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.handlers[:] = [handler]
        logger.setLevel(logging.DEBUG if debug else logging.INFO)
        logger.propagate = False  # the root logger (absl's, tf's) would print it again
    return saved


def restore_logging(saved: list[tuple]) -> None:
    for logger, handlers, level, propagate in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def error_line(e: Exception, argv: list[str]) -> str:
    """The error's first line (gin appends "In call to configurable ..." context); a missing
    file also names the flag or gin binding its path came from."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, FileNotFoundError):
        bare = re.match(r"\[Errno 2\] No such file or directory: '(.*)'$", first)
        filename = e.filename if e.filename is not None else (bare.group(1) if bare else None)
        if bare or (filename is not None and first.startswith("[Errno")):
            first = f"{filename}: not found"
        origin = path_origin(first if filename is None else str(filename), argv)
        model_flag = origin is not None and (origin.endswith("--model") or origin.endswith("_model"))
        if model_flag and first.startswith("tokenizer:"):
            # the tokenizer is read first, from the model folder: blame what is really missing
            path = _origin_value(origin, argv)
            if path and not os.path.exists(path):
                return f"{path}: no such model folder (from {origin})"
            first += f"; give the tokenizer's folder ({'agent_models.tokenizer' if origin.startswith('gin ') else '--tokenizer'})"
        if origin and origin not in first:
            first = f"{first} (from {origin})"
    return first


def _origin_value(origin: str, argv: list[str]) -> str | None:
    """The path a `--flag` or `gin configurable.param` origin holds."""
    if origin.startswith("gin "):
        try:
            value = gin.query_parameter(origin[4:])
        except ValueError:
            return None
        return value if isinstance(value, str) else None
    for i, a in enumerate(argv):
        if a.startswith(origin + "="):
            return a.partition("=")[2]
        if a == origin and i + 1 < len(argv):
            return argv[i + 1]
    return None


def path_origin(text: str, argv: list[str]) -> str | None:
    """Which command-line flag or gin binding holds the path that `text` mentions (longest match)."""
    found: list[tuple[int, str]] = []

    def consider(value, origin):
        if isinstance(value, (list, tuple)):
            for v in value:
                consider(v, origin)
        elif isinstance(value, str) and value.strip() and value not in (".", "/"):
            forms = {value, os.path.abspath(os.path.expanduser(value))}
            hits = [len(f) for f in forms if f in text]
            if hits:
                found.append((max(hits), origin))

    for i, a in enumerate(argv):
        if a.startswith("--gin."):
            continue
        if a.startswith("--") and "=" in a:
            consider(a.partition("=")[2], a.partition("=")[0])
        elif a.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            consider(argv[i + 1], a)
        elif not a.startswith("-") and not (i and argv[i - 1].startswith("--") and "=" not in argv[i - 1]):
            consider(a, f"argument {a!r}")
    for key, _, _, value in gin_bindings():
        consider(value, f"gin {key}")
    return max(found)[1] if found else None

if __name__ == "__main__":
    sys.exit(main())
