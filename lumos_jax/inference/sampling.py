"""Per-row token choice: greedy, temperature, top-k and top-p, with explicit PRNG keys.

Each row carries its own raw key; the token that will sit at position p is drawn with
`fold_in(key, p)`, so a row's samples depend only on its seed, its prompt and its
parameters, never on the batch around it or on how many steps one device call runs.
Rows with temperature 0 are greedy; a batch with no sampling row skips the sort entirely.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 128
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        object.__setattr__(self, "stop_strings", tuple(str(s) for s in self.stop_strings))
        problems = []
        if not self.temperature >= 0:
            problems.append(f"temperature={self.temperature} must be >= 0")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be an integer >= 0")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if int(self.max_new_tokens) != self.max_new_tokens or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be an integer >= 1")
        if any(not s for s in self.stop_strings):
            problems.append("stop_strings may not contain an empty string")
        if problems:
            raise ValueError("SamplingParams: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def row_keys(seeds) -> np.ndarray:
    """Raw uint32 key data (B, 2) for 32-bit seeds: `key_data(PRNGKey(seed))` of the
    default threefry implementation, built on the host (no device round trip per call)."""
    seeds = np.asarray(seeds, np.uint64) & 0xFFFFFFFF
    return np.stack([np.zeros_like(seeds), seeds], axis=-1).astype(np.uint32)


def filtered_logits(logits, temperature, top_k, top_p):
    """fp32 logits (B, V) scaled by temperature, with tokens outside top-k / top-p at -inf.
    Ties at the cut-off value are all kept."""
    v = logits.shape[-1]
    t = jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)
    scaled = logits.astype(jnp.float32) / t[:, None]
    ordered = -jnp.sort(-scaled, axis=-1)                                   # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    rank = jnp.arange(v)[None, :]
    in_k = rank < k[:, None]
    probs = jax.nn.softmax(jnp.where(in_k, ordered, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs                             # mass ranked above
    keep = in_k & ((before < top_p[:, None]) | (rank == 0))
    n_keep = keep.sum(axis=-1)
    cutoff = jnp.take_along_axis(ordered, (n_keep - 1)[:, None], axis=-1)
    return jnp.where(scaled >= cutoff, scaled, -jnp.inf)


def sample_tokens(logits, temperature, top_k, top_p, keys, positions):
    """Next token per row (B,) int32. keys: raw (B, 2) uint32; positions: (B,) the index the
    new token will occupy (the fold-in counter)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw():
        masked = filtered_logits(logits, temperature, top_k, top_p)

        def one(key, pos, row):
            key = jax.random.fold_in(jax.random.wrap_key_data(key), pos)
            return jax.random.categorical(key, row)

        sampled = jax.vmap(one)(keys, positions, masked).astype(jnp.int32)
        return jnp.where(temperature > 0, sampled, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda: greedy)
