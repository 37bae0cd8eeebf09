"""`lumos-jax quantize SRC DST`: an int8-weight checkpoint for decoding, made once.

SRC is an HF directory, a lumos-jax checkpoint or a `.gguf` file. Every matmul weight
(q/k/v, o, gate/up, down, logits) becomes symmetric int8 with fp32 scales per output channel
(or per `--group_size` inputs), computed from the decode weights in `--dtype` exactly as
`engine_settings.weight_dtype='int8'` computes them at load time; norms and the embedding
table stay. DST gets `config.json`, `params_int8/` and the tokenizer, and every command that
loads a model (generate, serve, agent, eval) then reads it as int8 with no bf16 copy, so a
7B model needs 7 GB on the card instead of 13.5 GB at load.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from lumos_jax.checkpoints.gguf import GGUFFile, is_gguf, load_gguf_model, write_hf_sidecar
from lumos_jax.checkpoints.native import load_model
from lumos_jax.config import parse_args
from lumos_jax.inference.params import decode_params
from lumos_jax.inference.quant import convert_weights, save_int8


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="lumos-jax quantize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="HF directory, lumos-jax checkpoint or .gguf file")
    parser.add_argument("dst", help="output directory (an int8 lumos-jax checkpoint)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="dtype of the weights the scales are computed from, and the compute dtype "
                             "recorded for decoding (default bfloat16, as the engine)")
    parser.add_argument("--group_size", type=int,
                        help="one scale per this many input features (default: one per output channel)")
    parser.add_argument("--tokenizer", help="copy tokenizer files from this directory (default: SRC's own)")
    args = parse_args(parser, argv)
    if args.group_size is not None and args.group_size <= 0:
        parser.error(f"--group_size={args.group_size}: expected a positive number of input features")
    from_gguf = is_gguf(args.src)
    gguf_file = GGUFFile(args.src) if from_gguf else None
    # the weights are read in --dtype as well: the decode view is cast to it anyway, and a 7B
    # model then needs 13.5 GB rather than 27 GB while it is converted
    dtypes = dict(param_dtype=args.dtype, dtype=args.dtype)
    model = load_gguf_model(gguf_file, **dtypes) if from_gguf else load_model(args.src, **dtypes)
    params, _ = decode_params(model)
    params = convert_weights(params, "int8", group_size=args.group_size)
    out = save_int8(params, model.config, args.dst,
                    tokenizer_dir=args.tokenizer or (None if from_gguf else args.src))
    if from_gguf and not args.tokenizer:
        write_hf_sidecar(gguf_file, out)
    print(f"wrote an int8 checkpoint to {out} ({model.config.num_params():,} parameters; "
          f"scales per {'output channel' if args.group_size is None else f'{args.group_size} inputs'})")
    return 0
