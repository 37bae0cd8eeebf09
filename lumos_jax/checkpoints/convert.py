"""`lumos-jax convert SRC DST`: HF directory <-> lumos-jax checkpoint.

The direction follows SRC: an HF directory becomes a lumos-jax (orbax) checkpoint,
a lumos-jax checkpoint becomes an HF directory (`--to` forces either).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence


def main(argv: Sequence[str]) -> int:
    from lumos_jax.checkpoints.hf import save_hf_model
    from lumos_jax.checkpoints.native import is_native_checkpoint, load_model, save_native
    from lumos_jax.config import parse_args

    parser = argparse.ArgumentParser(prog="lumos-jax convert", description=__doc__)
    parser.add_argument("src", help="HF directory or lumos-jax checkpoint")
    parser.add_argument("dst", help="output directory")
    parser.add_argument("--to", choices=["native", "hf"], help="output format (default: the other one)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the HF safetensors (default: the params' dtype)")
    parser.add_argument("--param_dtype", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the imported params (default float32)")
    parser.add_argument("--vocab_multiple", type=int, help="pad the embedding rows to this multiple")
    parser.add_argument("--tokenizer", help="copy tokenizer files from this directory (HF export)")
    args = parse_args(parser, argv)
    to = args.to or ("hf" if is_native_checkpoint(args.src) else "native")
    overrides = {k: v for k, v in dict(param_dtype=args.param_dtype,
                                       vocab_multiple=args.vocab_multiple).items() if v is not None}
    model = load_model(args.src, **overrides)
    if to == "native":
        out = save_native(model, args.dst)
    else:
        tokenizer = args.tokenizer or (args.src if (Path(args.src) / "tokenizer_config.json").exists() else None)
        out = save_hf_model(model, args.dst, dtype=args.dtype, tokenizer_dir=tokenizer)
    print(f"wrote {to} checkpoint to {out} ({model.config.num_params():,} parameters)")
    return 0
