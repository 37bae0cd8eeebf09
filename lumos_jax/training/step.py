"""The jitted train and eval steps: masked next-token cross-entropy, gradient
accumulation over microbatches, clipping and AdamW, one `jax.jit` over the mesh.

Loss = sum(loss_mask * xent) / sum(loss_mask) over the *global* batch: microbatches
add up summed losses and gradients and divide once by the global target count, so
accumulation gives the same update as one big batch.

The cross-entropy is chunked along the sequence (`train_loss.chunk` tokens per row at a
time): a scan makes each chunk's fp32 logits, takes logsumexp minus the target's logit and
drops them, recomputing them in the backward pass, so the (batch, length, vocab) fp32
logits never exist whole (at vocab 32k they are the largest activation of a 1B model).
"""

from __future__ import annotations

import math
from typing import Callable

import gin
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lumos_jax.data.packing import BATCH_KEYS
from lumos_jax.sharding import constrain, logical_to_spec
from lumos_jax.training.state import TrainSetup



def batch_sharding(setup: TrainSetup) -> NamedSharding:
    """Rows over the mesh axes the "batch" logical rule names (data x fsdp by default)."""
    return NamedSharding(setup.mesh, logical_to_spec(("batch", "length"), mesh=setup.mesh))


def batch_shards(setup: TrainSetup) -> int:
    spec = batch_sharding(setup).spec[0]
    axes = spec if isinstance(spec, tuple) else ((spec,) if spec else ())
    return math.prod(setup.mesh.shape[a] for a in axes)


def check_batch(setup: TrainSetup, global_batch: int, grad_accum: int) -> None:
    """Bad shapes fail here, in one line, before anything compiles."""
    shards = batch_shards(setup)
    if grad_accum < 1 or global_batch % grad_accum:
        raise ValueError(f"train: global_batch={global_batch} is not divisible by "
                         f"grad_accum_steps={grad_accum}")
    micro = global_batch // grad_accum
    if micro % shards:
        raise ValueError(f"train: microbatch {micro} rows (global_batch={global_batch} / "
                         f"grad_accum_steps={grad_accum}) is not divisible by the {shards} batch "
                         f"shards of mesh {dict(setup.mesh.shape)}")
    if global_batch % jax.process_count():
        raise ValueError(f"train: global_batch={global_batch} is not divisible by the "
                         f"{jax.process_count()} processes")


@gin.configurable
def train_loss(chunk: int = 512) -> int:
    """Tokens per row whose logits the loss holds at once; 0 = all (plain cross-entropy)."""
    if chunk < 0:
        raise ValueError(f"train_loss.chunk={chunk}; expected 0 (off) or a positive token count")
    return chunk


def summed_loss(graphdef, params, batch, chunk: int = 0):
    """(sum of masked token losses, number of target tokens) for one (micro)batch."""
    model = nnx.merge(graphdef, params)
    mask = batch["loss_mask"].astype(jnp.float32)
    if chunk and chunk < batch["input_ids"].shape[1]:
        hidden = model(batch["input_ids"], batch["positions"], batch["segment_ids"], return_hidden=True)
        return chunked_xent(model.logits, hidden, batch["targets"], mask, chunk), jnp.sum(mask)
    logits = model(batch["input_ids"], batch["positions"], batch["segment_ids"])
    xent = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           batch["targets"])
    return jnp.sum(xent * mask), jnp.sum(mask)


def chunked_xent(logits_fn, hidden, targets, mask, chunk: int):
    """sum(mask * cross-entropy) with `logits_fn` applied to `chunk` positions at a time.
    hidden (B, T, E); a T that is not a multiple of `chunk` is padded with masked tokens."""
    b, t, e = hidden.shape
    pad = -t % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets, mask = (jnp.pad(a, ((0, 0), (0, pad))) for a in (targets, mask))
    n = (t + pad) // chunk
    to_chunks = lambda a: jnp.moveaxis(a.reshape(b, n, chunk, *a.shape[2:]), 1, 0)  # noqa: E731
    xs = (to_chunks(hidden), to_chunks(targets), to_chunks(mask))

    @jax.checkpoint  # save nothing: the backward pass remakes one chunk's logits at a time
    def body(total, x):
        h, y, m = x
        logits = logits_fn(constrain(h, ("batch", "length", "act_embed"))).astype(jnp.float32)
        picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        return total + jnp.sum((jax.nn.logsumexp(logits, axis=-1) - picked) * m), None

    total, _ = jax.lax.scan(body, jnp.float32(0), xs)
    return total


def _microbatches(batch, accum: int, spec):
    """(B, T) -> (accum, B/accum, T), microbatch a = rows a, a+accum, ...: each device
    keeps its own rows, so the split needs no communication."""
    def split(x):
        b, t = x.shape
        x = x.reshape(b // accum, accum, t).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, PartitionSpec(None, *spec))
    return jax.tree.map(split, batch)


def make_train_step(setup: TrainSetup, grad_accum: int = 1, loss_chunk: int | None = None) -> Callable:
    """jit(step)(state, batch) -> (state, metrics); the state is donated. Call it
    under `jax.set_mesh(setup.mesh)` so activation constraints see the mesh.
    `loss_chunk` defaults to gin's `train_loss.chunk`."""
    graphdef, tx, schedule = setup.graphdef, setup.tx, setup.schedule
    spec = batch_sharding(setup).spec
    chunk = train_loss() if loss_chunk is None else loss_chunk
    grad_fn = jax.value_and_grad(lambda p, b: summed_loss(graphdef, p, b, chunk), has_aux=True)

    def step(state, batch):
        params = state["params"]
        if grad_accum == 1:
            (loss_sum, count), grads = grad_fn(params, batch)
        else:
            def body(carry, micro):
                g_acc, l_acc, c_acc = carry
                (l, c), g = grad_fn(params, micro)
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, c_acc + c), None
            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, loss_sum, count), _ = jax.lax.scan(
                body, (zeros, jnp.float32(0), jnp.float32(0)), _microbatches(batch, grad_accum, spec))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = dict(step=state["step"] + 1, params=optax.apply_updates(params, updates),
                         opt_state=opt_state, rng=state["rng"])
        metrics = dict(loss=loss_sum / denom, grad_norm=grad_norm,
                       learning_rate=schedule(state["step"]), target_tokens=count)
        return new_state, metrics

    bsh = batch_sharding(setup)
    return jax.jit(step,
                   in_shardings=(setup.shardings, {k: bsh for k in BATCH_KEYS}),
                   out_shardings=(setup.shardings, setup.replicated),
                   donate_argnums=0)


def make_eval_step(setup: TrainSetup, loss_chunk: int | None = None) -> Callable:
    """(sum of token losses, target count) of a batch, for held-out loss / perplexity."""
    graphdef = setup.graphdef
    bsh = batch_sharding(setup)
    chunk = train_loss() if loss_chunk is None else loss_chunk
    return jax.jit(lambda params, batch: summed_loss(graphdef, params, batch, chunk),
                   in_shardings=(setup.shardings["params"], {k: bsh for k in BATCH_KEYS}),
                   out_shardings=setup.replicated)

