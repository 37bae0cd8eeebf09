"""`lumos-jax convert SRC DST`: HF directory <-> lumos-jax checkpoint, or a GGUF file -> either.

The direction follows SRC: an HF directory becomes a lumos-jax (orbax) checkpoint,
a lumos-jax checkpoint becomes an HF directory (`--to` forces either). A llama.cpp
`.gguf` file becomes an HF directory by default (weights dequantized to float32 unless
`--dtype`), with the tokenizer rebuilt from its vocabulary written beside the weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from lumos_jax.checkpoints.gguf import GGUFFile, is_gguf, load_gguf_model, write_hf_sidecar
from lumos_jax.checkpoints.hf import save_hf_model
from lumos_jax.checkpoints.native import is_native_checkpoint, load_model, save_native
from lumos_jax.config import parse_args


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="lumos-jax convert", description=__doc__)
    parser.add_argument("src", help="HF directory, lumos-jax checkpoint or .gguf file")
    parser.add_argument("dst", help="output directory")
    parser.add_argument("--to", choices=["native", "hf"], help="output format (default: the other one)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the HF safetensors (default: the params' dtype)")
    parser.add_argument("--param_dtype", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the imported params (default float32)")
    parser.add_argument("--vocab_multiple", type=int, help="pad the embedding rows to this multiple")
    parser.add_argument("--tokenizer", help="copy tokenizer files from this directory (default: SRC's own)")
    args = parse_args(parser, argv)
    from_gguf = is_gguf(args.src)
    to = args.to or ("hf" if is_native_checkpoint(args.src) or from_gguf else "native")
    overrides = {k: v for k, v in dict(param_dtype=args.param_dtype,
                                       vocab_multiple=args.vocab_multiple).items() if v is not None}
    gguf_file = GGUFFile(args.src) if from_gguf else None  # read once: weights and tokenizer
    model = load_gguf_model(gguf_file, **overrides) if from_gguf else load_model(args.src, **overrides)
    if to == "native":
        out = save_native(model, args.dst, tokenizer_dir=args.tokenizer or (None if from_gguf else args.src))
        if from_gguf:
            write_hf_sidecar(gguf_file, out)
    elif from_gguf and not args.tokenizer:
        out = save_hf_model(model, args.dst, dtype=args.dtype)
        write_hf_sidecar(gguf_file, out)
    else:
        tokenizer = args.tokenizer or (args.src if (Path(args.src) / "tokenizer_config.json").exists() else None)
        out = save_hf_model(model, args.dst, dtype=args.dtype, tokenizer_dir=tokenizer)
    print(f"wrote {to} checkpoint to {out} ({model.config.num_params():,} parameters)")
    return 0
