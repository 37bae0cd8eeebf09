"""The two compiled programs of the engine: prefill (per length bucket) and the decode loop.

Both take the cache as a donated argument and return the updated one, so XLA updates it in
place. The decode loop runs up to `steps` tokens inside one `lax.while_loop` and stops early
once no row is generating; the host then sees every new token at once.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lumos_jax.inference.forward import PagedCache, decode_forward, prefill_forward
from lumos_jax.inference.params import ForwardSpec
from lumos_jax.inference.sampling import sample_tokens


class RowControls(NamedTuple):
    """Per-row generation settings, all shaped (B, ...)."""
    temperature: jax.Array    # (B,) float32
    top_k: jax.Array          # (B,) int32
    top_p: jax.Array          # (B,) float32
    keys: jax.Array           # (B, 2) uint32 raw PRNG key data
    stop_ids: jax.Array       # (B, n_stop) int32, -1 = unused
    max_new: jax.Array        # (B,) int32 tokens allowed this turn


class DecodeOut(NamedTuple):
    tokens: jax.Array         # (B, steps) int32, -1 where a row produced nothing
    last: jax.Array           # (B,) the last sampled token (not yet in the cache)
    lengths: jax.Array        # (B,) tokens in the cache
    generated: jax.Array      # (B,) tokens generated in the turn so far
    active: jax.Array         # (B,) still generating
    steps_run: jax.Array      # () loop iterations executed


@partial(jax.jit, static_argnames=("spec", "cache_sharding"), donate_argnames=("cache",))
def prefill_step(params, cache: PagedCache, table, tokens, starts, valid, controls: RowControls,
                 *, spec: ForwardSpec, cache_sharding=None):
    """Prefill N rows (block tables `table` (N, nb)) and sample each row's first new token.
    Returns (first (N,), cache)."""
    logits, cache = prefill_forward(params, cache, spec, table, tokens, starts, valid, cache_sharding)
    first = sample_tokens(logits, controls.temperature, controls.top_k, controls.top_p,
                          controls.keys, starts + valid)
    return first, cache


@partial(jax.jit, static_argnames=("spec", "steps", "cache_sharding", "attention"),
         donate_argnames=("cache",))
def decode_loop(params, cache: PagedCache, table, last, lengths, generated, active, capacity,
                controls: RowControls, *, spec: ForwardSpec, steps: int, cache_sharding=None,
                attention: str = "dot"):
    """Up to `steps` decode steps for rows with block tables `table` (B, nb). `last` (B,) is
    each row's newest token, not yet in the cache; it is written at index `lengths`. A row
    stops after sampling one of its stop ids, reaching its max_new tokens, or filling the
    `capacity` (B,) positions its blocks hold (the host then grows or finishes it)."""
    b = last.shape[0]
    out0 = jnp.full((b, steps), -1, jnp.int32)

    def cond(carry):
        i, _, _, _, act, _, _ = carry
        return (i < steps) & jnp.any(act)

    def body(carry):
        i, tok, length, gen, act, out, c = carry
        logits, c = decode_forward(params, c, spec, table, tok, length, act, cache_sharding, attention)
        nxt = sample_tokens(logits, controls.temperature, controls.top_k, controls.top_p,
                            controls.keys, length + 1)
        out = jax.lax.dynamic_update_slice_in_dim(out, jnp.where(act, nxt, -1)[:, None], i, axis=1)
        length = length + act
        gen = gen + act
        stop = (jnp.any(nxt[:, None] == controls.stop_ids, axis=-1) | (gen >= controls.max_new)
                | (length >= capacity))
        tok = jnp.where(act, nxt, tok)
        return i + 1, tok, length, gen, act & ~stop, out, c

    carry = (jnp.int32(0), last, lengths, generated, active & (lengths < capacity), out0, cache)
    i, tok, length, gen, act, out, cache = jax.lax.while_loop(cond, body, carry)
    return DecodeOut(out, tok, length, gen, act, i), cache
