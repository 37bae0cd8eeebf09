"""`lumos-jax demo`: interim foundation demo on the bundled stories260K model.

Imports the bundled HF directory, converts it to a lumos-jax checkpoint and back,
and greedily continues a prompt. The full Lumos demo replaces this.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Sequence

ASSETS = Path(__file__).resolve().parent / "assets"


def main(argv: Sequence[str]) -> int:
    from lumos_jax.checkpoints.hf import load_hf_model, save_hf_model
    from lumos_jax.checkpoints.native import load_native, save_native
    from lumos_jax.config import parse_args
    from lumos_jax.generation import greedy_generate
    from lumos_jax.tokenization import Tokenizer

    parser = argparse.ArgumentParser(prog="lumos-jax demo")
    parser.add_argument("--prompt", default="Once upon a time")
    args = parse_args(parser, argv)
    hf_dir = ASSETS / "stories260k"
    tok = Tokenizer(hf_dir)
    model = load_hf_model(hf_dir)
    with tempfile.TemporaryDirectory() as tmp:
        save_native(model, Path(tmp) / "native")
        model = load_native(Path(tmp) / "native")
        save_hf_model(model, Path(tmp) / "hf")
    ids = tok.encode(args.prompt, add_bos=True)
    out = greedy_generate(model, [ids], 60, stop_ids=[tok.eos_id])[0]
    print(args.prompt + tok.decode(out))
    return 0
