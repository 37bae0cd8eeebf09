"""Argument handling shared by the launchers.

A launcher's own flags come first; everything it does not know (`--gin_file=...`,
`--gin.X=Y`, or anything after `--`) is forwarded to `lumos-jax train` unchanged.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Sequence

DEFAULT_ENTRY = "lumos_jax.cli train"


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, allow_abbrev=False,
        epilog="Unknown arguments (and all after `--`) go to the training command, "
               "e.g. --gin_file=experiments/x.gin --gin.train.num_steps=10.")
    parser.add_argument("--dry_run", action="store_true",
                        help="print every command it would run, run nothing")
    return parser


def add_entry_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--python", default=sys.executable,
                        help="the Python that runs the workers (default: this one)")
    parser.add_argument("--entry", default=DEFAULT_ENTRY,
                        help=f"`python -m` target and its first arguments (default: {DEFAULT_ENTRY!r})")


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """(launcher options, arguments forwarded to the training command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    forwarded: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, forwarded = argv[:cut], argv[cut + 1:]
    args, unknown = parser.parse_known_args(argv)
    stray = [a for a in unknown if not a.startswith("--")]
    if stray and not forwarded:
        # A bare word is almost always a typo of one of our flags' values.
        parser.error(f"unexpected argument {stray[0]!r} (training arguments start with --, "
                     "or put them after --)")
    return args, [*unknown, *forwarded]


def worker_argv(args: argparse.Namespace, forwarded: Sequence[str]) -> list[str]:
    return [args.python, "-m", *shlex.split(args.entry), *forwarded]
