"""`lumos-jax eval --gin_file=experiments/eval/<name>.gin [--output_dir D] [--limit N]`.

Runs the experiment (or resumes it, when the output folder's predictions were made with the
same settings: settings_digest.py), prints the score table beside the paper's number and the
paths of the outputs (predictions.jsonl, summary.json, results.md, plot.png, settings.json,
operative_config.gin). Exit status 1 when every episode failed (summary.json `failures`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence


from lumos_jax.config import ConfigError, parse_args
from lumos_jax.evaluation.experiment import eval_experiment, run_experiment
from lumos_jax.evaluation.report import markdown_table
from lumos_jax.evaluation.settings_digest import check_output_dir, current_settings


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="lumos-jax eval", description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=None, help="overrides eval_experiment.output_dir")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true",
                       help="delete the output folder's predictions and start over")
    again.add_argument("--resume_anyway", action="store_true",
                       help="keep predictions made with other settings (see settings.json)")
    args = parse_args(parser, argv)
    if not args.gin_file:
        raise ConfigError("lumos-jax eval needs --gin_file=experiments/eval/<name>.gin")
    try:
        cfg = eval_experiment()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"eval_experiment: {e}") from None
    out = Path(args.output_dir or cfg.output_dir)
    check_output_dir(out, current_settings(), overwrite=args.overwrite, resume_anyway=args.resume_anyway)
    summary = run_experiment(cfg, output_dir=str(out), limit=args.limit, progress=not args.quiet)
    print(markdown_table([summary]), end="")
    print(f"outputs: {out}/predictions.jsonl, summary.json, results.md, plot.png, operative_config.gin")
    failed = summary["failures"]["count"]
    if failed and failed == summary["n"]:
        print(f"lumos-jax eval: error: every episode failed ({failed}); first: "
              f"{summary['failures']['first_error']}", file=sys.stderr)
        return 1
    return 0
