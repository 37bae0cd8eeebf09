"""The Llama family in Flax NNX, computing what HF `LlamaForCausalLM` computes.

Parameter paths mirror HF with the layer index moved into the array: the decoder layers
are one module whose every leaf is stacked, `model.layers.mlp.up_proj.kernel` of shape
(num_layers, in, out) with a leading "layers" logical axis, and the forward pass is one
`jax.lax.scan` over that axis, so compile time does not grow with depth. Row i is HF's
`model.layers.{i}.mlp.up_proj.weight`, transposed (`checkpoints/hf.py` maps the two).
Every parameter carries `logical_axes` metadata; `lumos_jax.sharding` maps those to the
mesh via gin rules ("layers" to no mesh axis).

Masking is by (segment id, position): a query attends to keys of its own non-zero
segment whose position is <= its own. That one rule covers causal attention, left
or right padding (segment 0) and packed rows (positions restart per segment).
Decoding (KV cache) lives in `lumos_jax.inference`, on these same weights.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lumos_jax.models.attention_tpu import splash_attention
from lumos_jax.models.config import LlamaConfig, resolve_attention_impl
from lumos_jax.sharding import constrain

_NEG_INF = -1e30
LAYERS_AXIS = "layers"


def _param(rngs, shape, dtype, axes, std):
    init = jax.nn.initializers.normal(std) if std else jax.nn.initializers.ones
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


def rms_norm(x, weight, eps):
    """HF LlamaRMSNorm: normalise in fp32, cast back to x's dtype, then scale."""
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * h.astype(x.dtype)


class Linear(nnx.Module):
    """y = x @ kernel, no bias; kernel (in, out) kept in param dtype, cast to compute dtype."""

    def __init__(self, din, dout, axes, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.kernel = _param(rngs, (din, dout), config.jnp_param_dtype, axes,
                             config.initializer_range)
        self.dtype = config.jnp_dtype

    def __call__(self, x):
        return jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class RMSNorm(nnx.Module):
    def __init__(self, dim, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.weight = _param(rngs, (dim,), config.jnp_param_dtype, ("norm",), 0.0)
        self.eps = config.rms_norm_eps

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps)


def rope_inv_freq(config: LlamaConfig) -> jax.Array:
    """Inverse frequencies in HF's convention, with Llama-3 / linear scaling."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = jnp.where(medium, smoothed, scaled)
    elif kind != "default":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")
    return inv_freq


def apply_rope(x, positions, inv_freq):
    """Rotate halves (i, i + d/2) as HF does; x (B, T, H, D), positions (B, T)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, D/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention_mask(q_seg, q_pos, k_seg, k_pos):
    """(B, T, S) bool: same non-zero segment and key position <= query position."""
    same = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
    return same & (k_pos[:, None, :] <= q_pos[:, :, None])


def fused_attention(q, k, v, segment_ids, positions, config: LlamaConfig):
    """cuDNN flash attention (B, T, H, D) with exactly `attention_mask`'s rule (own
    non-zero segment, key position <= query position), passed to the kernel as a mask.
    Checked against the XLA path on an H100 (bench/train_throughput.py). cuDNN's packed
    "segment offsets" layout was tried too: its gradients did not match, so it is not used."""
    mask = attention_mask(segment_ids, positions, segment_ids, positions)
    # is_causal lets the kernel skip blocks above the diagonal; the mask is causal as well.
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None],
                                        scale=1.0 / math.sqrt(config.head_dim),
                                        is_causal=True, implementation="cudnn")


def xla_attention(q, k, v, mask, config: LlamaConfig):
    """Grouped-query attention as einsums; q (B, T, H, D), k/v (B, S, KV, D), mask (B, T, S)."""
    c = config
    b, t = q.shape[:2]
    groups = c.num_attention_heads // c.num_key_value_heads
    q = q.reshape(b, t, c.num_key_value_heads, groups, c.head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype)) / math.sqrt(c.head_dim)
    scores = jnp.where(mask[:, None, None], scores.astype(jnp.float32), _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(q.dtype))


class LlamaAttention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        self.q_proj = Linear(c.hidden_size, q_dim, ("embed", "q_heads"), c, rngs=rngs)
        self.k_proj = Linear(c.hidden_size, kv_dim, ("embed", "kv_heads"), c, rngs=rngs)
        self.v_proj = Linear(c.hidden_size, kv_dim, ("embed", "kv_heads"), c, rngs=rngs)
        self.o_proj = Linear(q_dim, c.hidden_size, ("q_heads", "embed"), c, rngs=rngs)

    def __call__(self, x, positions, segment_ids, inv_freq):
        c = self.config
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, c.num_attention_heads, c.head_dim)
        k = self.k_proj(x).reshape(b, t, c.num_key_value_heads, c.head_dim)
        v = self.v_proj(x).reshape(b, t, c.num_key_value_heads, c.head_dim)
        q = constrain(apply_rope(q, positions, inv_freq), ("batch", "length", "q_heads", "head_dim"))
        k = constrain(apply_rope(k, positions, inv_freq), ("batch", "length", "kv_heads", "head_dim"))
        impl = resolve_attention_impl(c.attention_impl)
        if impl == "cudnn":
            out = fused_attention(q, k, v, segment_ids, positions, c)
        elif impl == "splash":
            out = splash_attention(q, k, v, segment_ids)
        else:
            mask = attention_mask(segment_ids, positions, segment_ids, positions)
            out = xla_attention(q, k, v, mask, c)
        return self.o_proj(out.reshape(b, t, c.num_attention_heads * c.head_dim))


class LlamaMLP(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, ("embed", "mlp"), c, rngs=rngs)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, ("embed", "mlp"), c, rngs=rngs)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, ("mlp", "embed"), c, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(constrain(h, ("batch", "length", "mlp")))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config, rngs=rngs)
        self.self_attn = LlamaAttention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config, rngs=rngs)
        self.mlp = LlamaMLP(config, rngs=rngs)

    def __call__(self, x, positions, segment_ids, inv_freq):
        x = x + self.self_attn(self.input_layernorm(x), positions, segment_ids, inv_freq)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "length", "act_embed"))


def stacked_layers(config: LlamaConfig, rngs: nnx.Rngs) -> LlamaDecoderLayer:
    """num_hidden_layers decoder layers as one module with stacked leaves (each layer its
    own random draw); "layers" is prepended to every leaf's logical axes."""
    n = config.num_hidden_layers

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=n,
              transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS, "logical_axes": LAYERS_AXIS})
    def make(layer_rngs):
        return LlamaDecoderLayer(config, rngs=layer_rngs)

    return make(rngs)


class Embedding(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.weight = _param(rngs, (config.padded_vocab_size, config.hidden_size),
                             config.jnp_param_dtype, ("vocab", "embed"), config.initializer_range)

    def __call__(self, ids, dtype):
        return jnp.take(self.weight[...], ids, axis=0).astype(dtype)


class LlamaModel(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.embed_tokens = Embedding(config, rngs=rngs)
        self.layers = stacked_layers(config, rngs)
        self.norm = RMSNorm(config.hidden_size, config, rngs=rngs)


# Primitives whose outputs remat_policy 'none' keeps for the backward pass: every matmul
# and the attention kernels (cuDNN's forward; Pallas splash on TPU).
_ATTENTION_KERNELS = frozenset({"dot_product_attention_fwd_wrapper", "pallas_call"})
_SAVED_UNDER_NONE = frozenset({"dot_general"}) | _ATTENTION_KERNELS


def save_matmuls_and_attention(prim, *_, **__) -> bool:
    """remat_policy 'none' inside the layer scan: keep what is costly to remake (matmul and
    attention-kernel outputs), remake the elementwise rest (RMSNorm's fp32 copies, RoPE,
    SiLU's pieces, the bf16 casts of the weights) in the backward pass. Without a policy a
    scan stacks every residual autodiff names, one buffer per name over all layers, where an
    unrolled program lets XLA fuse them away: at TinyLlama, seq 2048 x batch 8, cuDNN, 31
    stacked residuals, 1,862 MiB a layer (41 GiB over 22 layers), against 9 and 626 MiB a
    layer with this policy (CPU jaxpr analysis, docs/training.md)."""
    return prim.name in _SAVED_UNDER_NONE


def save_dots_and_attention(prim, *args, **params) -> bool:
    """remat_policy 'dots': JAX's `checkpoint_dots_with_no_batch_dims` (the projections'
    outputs), plus the attention kernels' outputs, which that policy would drop and the backward
    pass would recompute (a second cuDNN forward per layer) for about one (tokens, q heads x
    head_dim) tensor a layer."""
    return (prim.name in _ATTENTION_KERNELS
            or jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims(prim, *args, **params))


_REMAT_POLICIES = {
    "none": save_matmuls_and_attention,
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": save_dots_and_attention,
}


class LlamaForCausalLM(nnx.Module):
    """logits = model(input_ids, positions=None, segment_ids=None)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = LlamaModel(config, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.padded_vocab_size, ("embed", "vocab"),
                                  config, rngs=rngs)

    def __call__(self, input_ids, positions=None, segment_ids=None, return_hidden=False):
        """input_ids (B, T) -> logits (B, T, vocab_size), or the final-norm hidden states
        (B, T, hidden) with `return_hidden` (the chunked loss makes logits itself).
        segment_ids: 0 marks padding (default all 1); positions default to 0..T-1."""
        c = self.config
        b, t = input_ids.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        inv_freq = rope_inv_freq(c)
        x = constrain(self.model.embed_tokens(input_ids, c.jnp_dtype), ("batch", "length", "act_embed"))
        graphdef, layer_state = nnx.split(self.model.layers)

        def body(h, one_layer):
            return nnx.merge(graphdef, one_layer)(h, positions, segment_ids, inv_freq), None

        if c.remat_policy != "none" or c.scan_layers:
            # Inside a scan, CSE cannot undo the recomputation, so prevent_cse is not needed;
            # unrolled, it is (else XLA may merge the backward's recomputation with the
            # forward and keep the activations remat was to drop). Unrolled, 'none' stays
            # unwrapped: XLA fuses the elementwise residuals itself.
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[c.remat_policy],
                                  prevent_cse=not c.scan_layers)
        if c.scan_layers:
            x, _ = jax.lax.scan(body, x, layer_state, unroll=c.scan_unroll)
        else:
            for i in range(c.num_hidden_layers):
                x, _ = body(x, jax.tree.map(lambda a, i=i: a[i], layer_state))
        x = self.model.norm(x)
        return x if return_hidden else self.logits(x)

    def logits(self, hidden):
        """(..., hidden) -> (..., vocab_size) logits in the compute dtype."""
        c = self.config
        if c.tie_word_embeddings:
            w = self.model.embed_tokens.weight[...].astype(c.jnp_dtype)
            logits = jnp.einsum("bte,ve->btv", hidden, w)
        else:
            logits = self.lm_head(hidden)
        logits = constrain(logits, ("batch", "length", "vocab"))
        return logits[..., : c.vocab_size] if c.padded_vocab_size != c.vocab_size else logits


def create_model(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    return LlamaForCausalLM(config, rngs=nnx.Rngs(seed))


def abstract_model(config: LlamaConfig) -> LlamaForCausalLM:
    """Shapes only, no memory: the skeleton that checkpoints are loaded into."""
    return nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
