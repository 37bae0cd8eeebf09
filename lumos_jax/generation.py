"""A plain greedy generator over the model's KV cache, and `lumos-jax generate`.

Prefill one right-padded batch, then decode one token per step with a jitted step.
It is simple on purpose (the fast engine lives in `lumos_jax.inference`); it also
serves as an `Engine`-shaped fallback for agent code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lumos_jax.models.llama import KVCache, LlamaForCausalLM


def _bucket(n: int, minimum: int = 16) -> int:
    """Round lengths up to a power of two so jit compiles few shapes."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@jax.jit
def _prefill(graphdef, state, ids, segment_ids, cache):
    model = nnx.merge(graphdef, state)
    b = ids.shape[0]
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    logits, cache = model(ids, positions, segment_ids, cache, jnp.zeros((b,), jnp.int32))
    lengths = segment_ids.sum(axis=1)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return jnp.argmax(last, axis=-1).astype(jnp.int32), cache


@jax.jit
def _decode_step(graphdef, state, tokens, lengths, cache):
    model = nnx.merge(graphdef, state)
    logits, cache = model(tokens[:, None], lengths[:, None], jnp.ones_like(tokens)[:, None],
                          cache, lengths)
    return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache


def greedy_generate(model: LlamaForCausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    stop_ids: Sequence[int] = ()) -> list[list[int]]:
    """Greedy continuations of token-id prompts (each row stops at its first stop id,
    which is included in its output)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate: every prompt needs at least one token")
    b = len(prompts)
    t = _bucket(max(len(p) for p in prompts))
    ids = np.zeros((b, t), np.int32)
    seg = np.zeros((b, t), np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
        seg[i, : len(p)] = 1
    cache = KVCache.init(model.config, b, _bucket(t + max_new_tokens))
    graphdef, state = nnx.split(model)
    token, cache = _prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(seg), cache)
    lengths = jnp.asarray(seg.sum(1), jnp.int32)
    out = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    stop = set(int(s) for s in stop_ids)
    for step in range(max_new_tokens):
        host = np.asarray(token)
        for i in range(b):
            if not done[i]:
                out[i].append(int(host[i]))
                done[i] = int(host[i]) in stop
        if done.all() or step == max_new_tokens - 1:
            break
        token, cache = _decode_step(graphdef, state, token, lengths, cache)
        lengths = lengths + 1
    return out


@gin.configurable
def generation_settings(max_new_tokens: int = 128, stop_at_eos: bool = True,
                        add_bos: bool = True) -> dict:
    return dict(max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos, add_bos=add_bos)


def main(argv: Sequence[str]) -> int:
    from lumos_jax.checkpoints.native import load_model
    from lumos_jax.config import parse_args
    from lumos_jax.tokenization import Tokenizer

    parser = argparse.ArgumentParser(prog="lumos-jax generate", description=__doc__)
    parser.add_argument("--model", required=True, help="HF directory or lumos-jax checkpoint")
    parser.add_argument("--tokenizer", help="tokenizer directory or tokenizer.model (default: --model)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts_file", help="text file, one prompt per line, or JSONL with 'prompt'")
    parser.add_argument("--output", help="JSONL output (default stdout)")
    parser.add_argument("--batch_size", type=int, default=8)
    args = parse_args(parser, argv)
    settings = generation_settings()
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += _read_prompts(args.prompts_file)
    if not prompts:
        prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    model = load_model(args.model)
    tok = Tokenizer(args.tokenizer or args.model)
    stop = [tok.eos_id] if settings["stop_at_eos"] else []
    out = open(args.output, "w") if args.output else sys.stdout
    try:
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start: start + args.batch_size]
            ids = [tok.encode(p, add_bos=settings["add_bos"]) for p in batch]
            gens = greedy_generate(model, ids, settings["max_new_tokens"], stop)
            for prompt, gen in zip(batch, gens):
                out.write(json.dumps({"prompt": prompt, "completion": tok.decode(gen),
                                      "completion_ids": gen}) + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def _read_prompts(path: str) -> list[str]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.endswith(".jsonl"):
            try:
                prompts.append(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{n}: expected a JSON object with a 'prompt' field") from None
        else:
            prompts.append(line)
    return prompts
