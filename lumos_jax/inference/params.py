"""Decode-friendly parameters: the model's weights regrouped for few, large matmuls.

A decode step reads every weight once per token, so it is bound by memory bandwidth and
kernel launches. Regrouping q/k/v into one (embed, kv_heads, groups + 2, head_dim) matrix and
gate/up into one (embed, 2, mlp) matrix halves the matmuls per layer; keeping kv_heads (and
mlp) as explicit axes lets tensor parallelism shard them without splitting a head's q/k/v.
The vocabulary is padded to a multiple of 256 so the logits matmul shards and tiles evenly.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from lumos_jax.models.llama import LlamaForCausalLM, rope_inv_freq
from lumos_jax.sharding import logical_to_spec

VOCAB_PAD = 256


class ForwardSpec(NamedTuple):
    """The static (hashable) facts a compiled forward needs."""
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    vocab_size: int
    dtype: str
    int8_matmul: str = "xla"   # how int8 weights multiply (engine_settings.int8_matmul; quant.qeinsum)

    @property
    def groups(self) -> int:
        return self.num_heads // self.num_kv_heads


# Logical axes of each leaf (mapped to the mesh by lumos_jax.sharding's gin rules). Layer
# leaves are stacked: a leading "layers" axis (mapped to no mesh axis) that the forward scans.
LAYER_AXES = {
    "attn_norm": ("layers", "norm"),
    "wqkv": ("layers", "embed", "kv_heads", None, "head_dim"),
    "wo": ("layers", "kv_heads", None, "head_dim", "embed"),
    "mlp_norm": ("layers", "norm"),
    "w_gate_up": ("layers", "embed", None, "mlp"),
    "w_down": ("layers", "mlp", "embed"),
}
TOP_AXES = {"embed": ("vocab", "embed"), "norm": ("norm",), "lm_head": ("embed", "vocab"),
            "inv_freq": (None,)}


def forward_spec(config) -> ForwardSpec:
    return ForwardSpec(config.num_hidden_layers, config.num_attention_heads,
                       config.num_key_value_heads, config.head_dim, float(config.rms_norm_eps),
                       config.vocab_size, config.dtype)


def padded_vocab(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_PAD) * VOCAB_PAD


def _fuse(raw: dict, spec: ForwardSpec, dtype) -> dict:
    """Raw model arrays, layer leaves stacked (L, ...) -> decode params (pure jnp, jitted
    by `decode_params`)."""
    lyr = raw["layers"]
    n, e = lyr["q"].shape[:2]
    kv, g, d = spec.num_kv_heads, spec.groups, spec.head_dim
    vp = padded_vocab(spec.vocab_size)
    cast = lambda a: a.astype(dtype)  # noqa: E731
    q = lyr["q"].reshape(n, e, kv, g, d)
    k = lyr["k"].reshape(n, e, kv, 1, d)
    v = lyr["v"].reshape(n, e, kv, 1, d)
    layers = {
        "attn_norm": cast(lyr["attn_norm"]),
        "wqkv": cast(jnp.concatenate([q, k, v], axis=3)),
        "wo": cast(lyr["o"].reshape(n, kv, g, d, e)),
        "mlp_norm": cast(lyr["mlp_norm"]),
        "w_gate_up": cast(jnp.stack([lyr["gate"], lyr["up"]], axis=2)),
        "w_down": cast(lyr["down"]),
    }
    embed = raw["embed"][: spec.vocab_size]
    head = raw["lm_head"][:, : spec.vocab_size]
    return {
        "embed": cast(jnp.pad(embed, ((0, vp - spec.vocab_size), (0, 0)))),
        "layers": layers,
        "norm": cast(raw["norm"]),
        "lm_head": cast(jnp.pad(head, ((0, 0), (0, vp - spec.vocab_size)))),
        "inv_freq": raw["inv_freq"],
    }


def param_shardings(params: dict, mesh: Mesh, rules=None) -> dict:
    """NamedShardings for a decode-params tree (arrays or shape structs) from its logical axes;
    layers stacked (a dict of (L, ...) leaves) or unrolled (a tuple of per-layer dicts)."""
    def one(axes, leaf):
        if hasattr(leaf, "scale"):  # an int8 quant.QTensor: its scales take the same axes (size 1: replicated)
            return type(leaf)(one(axes, leaf.q), one(axes, leaf.scale))
        return NamedSharding(mesh, logical_to_spec(axes, leaf.shape, mesh, rules))

    layers = params["layers"]
    if isinstance(layers, (tuple, list)):
        out_layers = tuple({k: one(LAYER_AXES[k][1:], lyr[k]) for k in LAYER_AXES} for lyr in layers)
    else:
        out_layers = {k: one(LAYER_AXES[k], layers[k]) for k in LAYER_AXES}
    return {**{k: one(TOP_AXES[k], params[k]) for k in TOP_AXES}, "layers": out_layers}


# 'auto' unrolls on GPU only layers at least this large: the scanned copy of a layer's weights
# costs ~0.5 ms per GB read (Llama-2-7B, below), which a 135M model (7 MB a layer: ~0.1 ms a
# step) never recovers from the compile time unrolling adds (30 layers: 18 engine programs took
# 167 s to compile in the H200 SVAMP eval of bench/reproduce_small.py, 2026-12-01).
UNROLL_MIN_LAYER_BYTES = 32 * 2**20


def layer_weight_bytes(params: dict) -> int:
    """Bytes of one decoder layer's weights, stacked or per-layer params alike."""
    layers = params["layers"]
    if isinstance(layers, (tuple, list)):
        return sum(x.nbytes for x in jax.tree.leaves(layers[0])) if layers else 0
    leaves = jax.tree.leaves(layers)
    return sum(x.nbytes // x.shape[0] for x in leaves) if leaves else 0


def resolve_scan_layers(value, layer_bytes: int | None = None) -> bool:
    """`engine_settings.scan_layers`: True scans the stacked layers (one compiled layer body:
    compile time independent of depth), False unrolls them over per-layer buffers. 'auto':
    on GPU unrolled when a layer's weights are at least UNROLL_MIN_LAYER_BYTES (or unknown),
    since XLA copies each scanned layer's dynamic slice of the stacked weights before its
    matmuls (Llama-2-7B bf16 decode on one H200, 2026-12-01: scanned 11.0 ms/step at batch 1
    vs 4.5 ms unrolled; --xla_gpu_enable_dynamic_slice_fusion did not help); scanned for
    smaller models and on other backends."""
    if value == "auto":
        if jax.default_backend() != "gpu":
            return True
        return layer_bytes is not None and layer_bytes < UNROLL_MIN_LAYER_BYTES
    if isinstance(value, bool):
        return value
    raise ValueError(f"engine_settings.scan_layers={value!r}; expected 'auto', True or False")


def layer_layout(params: dict, scan: bool) -> dict:
    """The same params with stacked (scan) or per-layer (unrolled) layer leaves. Unstacking
    goes leaf by leaf and drops each stacked leaf as soon as it is split, so the extra memory
    is one leaf (when the caller keeps no other reference to the stacked tree)."""
    layers = params["layers"]
    stacked = not isinstance(layers, (tuple, list))
    if stacked == scan:
        return params
    if scan:
        per_leaf = {k: jax.tree.map(lambda *xs: jnp.stack(xs), *[lyr[k] for lyr in layers])
                    for k in layers[0]}
        return {**params, "layers": per_leaf}
    pending = dict(layers)
    n = jax.tree.leaves(next(iter(pending.values())))[0].shape[0]
    rows = [{} for _ in range(n)]
    for k in list(pending):
        leaf = pending.pop(k)
        for i in range(n):
            rows[i][k] = jax.tree.map(lambda a, i=i: a[i], leaf)
        del leaf
    return {**params, "layers": tuple(rows)}


def _raw_layers(m) -> dict:
    """The decoder layers' weights as stacked (L, ...) arrays, kernels (in, out): the
    model keeps its layers as one module whose leaves are already stacked."""
    layer = m.layers
    a, p = layer.self_attn, layer.mlp
    return {"attn_norm": layer.input_layernorm.weight[...], "q": a.q_proj.kernel[...],
            "k": a.k_proj.kernel[...], "v": a.v_proj.kernel[...], "o": a.o_proj.kernel[...],
            "mlp_norm": layer.post_attention_layernorm.weight[...], "gate": p.gate_proj.kernel[...],
            "up": p.up_proj.kernel[...], "down": p.down_proj.kernel[...]}


def _fuse_jit(spec: ForwardSpec, dtype, mesh: Mesh | None, rules, raw) -> dict:
    """Run `_fuse` under one jit, straight into the mesh shardings when a mesh is given."""
    def fuse(r):
        r = {**r, "layers": {k: jnp.stack(v) if isinstance(v, (list, tuple)) else v
                             for k, v in r["layers"].items()}}
        return _fuse(r, spec, dtype)

    shardings = None
    if mesh is not None:
        shardings = param_shardings(jax.eval_shape(fuse, raw), mesh, rules)
    return jax.jit(fuse, out_shardings=shardings)(raw)


def decode_params(model: LlamaForCausalLM, mesh: Mesh | None = None, rules=None) -> tuple[dict, ForwardSpec]:
    """(params, spec) for the engine, placed on `mesh` (tensor-parallel) when given."""
    c = model.config
    spec = forward_spec(c)
    m = model.model
    embed = m.embed_tokens.weight[...]
    raw = {"embed": embed, "layers": _raw_layers(m), "norm": m.norm.weight[...],
           "lm_head": embed.T if c.tie_word_embeddings else model.lm_head.kernel[...],
           "inv_freq": rope_inv_freq(c)}
    return _fuse_jit(spec, c.jnp_dtype, mesh, rules, raw), spec


def random_decode_params(config, key: jax.Array, dtype=None, mesh: Mesh | None = None,
                         rules=None) -> tuple[dict, ForwardSpec]:
    """(params, spec) with random weights (normal * config.initializer_range, norms 1) made
    straight in their decode layout and shardings by one jitted call: for benchmarks, where
    building a random model and regrouping it takes minutes at 7B. `dtype` defaults to the
    config's compute dtype; stacked leaves are drawn a layer at a time (small temporaries)."""
    spec = forward_spec(config)
    dtype = jnp.dtype(dtype or config.dtype)
    e, i, n = config.hidden_size, config.intermediate_size, spec.num_layers
    h, kvd = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    shapes = {"embed": (config.vocab_size, e), "norm": (e,), "lm_head": (e, config.vocab_size),
              "layers": {"attn_norm": (n, e), "q": (n, e, h), "k": (n, e, kvd), "v": (n, e, kvd),
                         "o": (n, h, e), "mlp_norm": (n, e), "gate": (n, e, i), "up": (n, e, i),
                         "down": (n, i, e)}}
    raw_struct = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), shapes,
                              is_leaf=lambda s: isinstance(s, tuple))
    raw_struct["inv_freq"] = jax.ShapeDtypeStruct((spec.head_dim // 2,), jnp.float32)
    fused = jax.eval_shape(lambda r: _fuse(r, spec, dtype), raw_struct)
    std = config.initializer_range

    def draw(k, path, leaf):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        if "layers" in name:
            keys = jax.random.split(k, leaf.shape[0])
            return jax.lax.map(lambda kk: (std * jax.random.normal(kk, leaf.shape[1:], jnp.float32)
                                           ).astype(leaf.dtype), keys)
        return (std * jax.random.normal(k, leaf.shape, jnp.float32)).astype(leaf.dtype)

    def make(k, inv_freq):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(fused)
        keys = jax.random.split(k, len(leaves))
        out = [draw(kk, path, leaf) for kk, (path, leaf) in zip(keys, leaves)]
        params = jax.tree_util.tree_unflatten(treedef, out)
        vocab_ok = jnp.arange(params["embed"].shape[0]) < spec.vocab_size   # padding rows zero
        params["embed"] = jnp.where(vocab_ok[:, None], params["embed"], 0).astype(dtype)
        params["lm_head"] = jnp.where(vocab_ok[None, :], params["lm_head"], 0).astype(dtype)
        params["inv_freq"] = inv_freq
        return params

    shardings = param_shardings(fused, mesh, rules) if mesh is not None else None
    return jax.jit(make, out_shardings=shardings)(key, rope_inv_freq(config)), spec
