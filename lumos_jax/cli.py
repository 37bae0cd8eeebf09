"""`lumos-jax` console script: one subcommand per job, each taking gin files/bindings.

Subcommands are imported lazily so `lumos-jax convert` does not pay for the agent's
imports. Each target is `module:function(argv) -> int`.
"""

from __future__ import annotations

import importlib
import os
import sys

SUBCOMMANDS = {
    "convert": ("lumos_jax.checkpoints.convert:main", "HF directory <-> lumos-jax checkpoint"),
    "generate": ("lumos_jax.generation:main", "generate text from prompts (file, stdin or --prompt)"),
    "demo": ("lumos_jax.demo:main", "the CPU demo on the bundled model and data"),
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
    from lumos_jax.config import ConfigError

    try:
        return int(getattr(module, func_name)(rest) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        # Bad user input (gin, files, shapes): one clear line, no traceback
        # (LUMOS_JAX_DEBUG=1 shows it).
        if os.environ.get("LUMOS_JAX_DEBUG"):
            raise
        # gin appends "In call to configurable ..." context lines: keep the first line.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"lumos-jax {name}: error: {first}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
