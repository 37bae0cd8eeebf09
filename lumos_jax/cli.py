"""`lumos-jax` console script: one subcommand per job, each taking gin files/bindings.

Subcommands are imported lazily so `lumos-jax convert` does not pay for the agent's
imports. Each target is `module:function(argv) -> int`.
"""

from __future__ import annotations

import importlib
import os
import re
import sys

SUBCOMMANDS = {
    "convert": ("lumos_jax.checkpoints.convert:main", "HF directory <-> lumos-jax checkpoint"),
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
    lines = ["usage: lumos-jax <command> [--gin_file=F ...] [--gin.X=Y ...] [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
    from lumos_jax.assets import expand_arg
    from lumos_jax.config import ConfigError

    rest = [expand_arg(a) for a in rest]
    try:
        return int(getattr(module, func_name)(rest) or 0)
    except KeyboardInterrupt:
        if os.environ.get("LUMOS_JAX_DEBUG"):
            raise
        print(f"lumos-jax {name}: interrupted (ctrl-C)", file=sys.stderr)
        return 130
    except (ConfigError, FileNotFoundError, ValueError) as e:
        # Bad user input (gin, files, shapes): one clear line, no traceback
        # (LUMOS_JAX_DEBUG=1 shows it).
        if os.environ.get("LUMOS_JAX_DEBUG"):
            raise
        print(f"lumos-jax {name}: error: {error_line(e, rest)}", file=sys.stderr)
        return 2


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
        import gin

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
    try:
        import gin

        for (scope, selector), params in gin.config._CONFIG.items():  # noqa: SLF001 - no public reader
            for param, value in params.items():
                name = selector.rsplit(".", 1)[-1]  # gin keys configurables by module path
                key = scope if selector == "gin.macro" else f"{scope + '/' if scope else ''}{name}.{param}"
                consider(value, f"gin {key}")
    except ImportError:
        pass
    return max(found)[1] if found else None

if __name__ == "__main__":
    sys.exit(main())
