"""`lumos-jax train --gin_file=experiments/X.gin --workdir=DIR [--gin.K=V ...] [--profile]`."""

from __future__ import annotations

import argparse
import json
from typing import Sequence

import jax

from lumos_jax.config import ConfigError, parse_args
from lumos_jax.training.loop import train


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="lumos-jax train", description=__doc__)
    parser.add_argument("--workdir", help="checkpoints, logs and profile go here "
                        "(default: gin train.workdir)")
    parser.add_argument("--profile", action="store_true",
                        help="write a JAX profiler trace of a few steps to WORKDIR/profile")
    parser.add_argument("--max_steps", type=int, help="stop after this many steps (overrides gin)")
    args = parse_args(parser, argv)

    kwargs = {}
    if args.workdir:
        kwargs["workdir"] = args.workdir
    if args.profile:
        kwargs["profile"] = True
    if args.max_steps is not None:
        kwargs["max_steps"] = args.max_steps
    try:
        result = train(**kwargs)
    except (ValueError, FileNotFoundError) as e:
        # gin appends "In call to configurable ..." lines; the first line is the message.
        raise ConfigError(str(e).strip().splitlines()[0]) from None

    if jax.process_index() == 0:
        last = max(result["losses"]) if result["losses"] else None
        print(json.dumps({"step": result["step"], "processes": jax.process_count(),
                          "devices": jax.device_count(),
                          "final_loss": result["losses"].get(last) if last else None,
                          "eval": result["eval"].get(max(result["eval"])) if result["eval"] else None}))
    return 0
