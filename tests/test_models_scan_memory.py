"""What the scanned decoder keeps for the backward pass, and what that costs in memory.

A `lax.scan` stacks each residual autodiff names into one buffer over all layers; unrolled,
XLA fuses the elementwise ones away. Without a remat policy the scanned TinyLlama step kept
31 residuals a layer (the fp32 RMSNorm copies, SiLU's pieces, the bf16 casts of the weights)
and needed +20 GiB on an H200; `remat_policy='none'` now keeps only matmul and attention
outputs (llama.save_matmuls_and_attention). CPU, small widths, compiled ahead of time."""

import math

import jax
import jax.extend
import jax.numpy as jnp
import pytest
from flax import nnx

from lumos_jax.models import PRESETS
from lumos_jax.models.llama import create_model
from lumos_jax.sharding import make_mesh
from lumos_jax.training import state as state_lib
from lumos_jax.training import step as step_lib

# GQA and an MLP wider than the model, as TinyLlama; bf16 compute over fp32 weights.
WIDE = PRESETS["tiny"].replace(vocab_size=512, hidden_size=256, intermediate_size=704,
                               num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4,
                               param_dtype="float32", dtype="bfloat16", attention_impl="xla")
BATCH, SEQ = 2, 128


def _eqns(jaxpr):
    """Every equation of a jaxpr, those of nested jaxprs (scan bodies, checkpoints) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _eqns(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _eqns(sub)


def forward_residuals(config, batch=BATCH, seq=SEQ):
    """(dtype, per-layer shape) of each stacked output of the forward layer scan of the grad:
    the residuals the backward scan reads."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: create_model(config, 0)))
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

    def loss(p, ids):
        hidden = nnx.merge(graphdef, p)(ids, return_hidden=True)
        return jnp.sum(hidden.astype(jnp.float32))

    jaxpr = jax.make_jaxpr(jax.grad(loss))(params, ids)
    layer_scans = [e for e in _eqns(jaxpr.jaxpr)
                   if e.primitive.name == "scan" and e.params["length"] == config.num_hidden_layers]
    fwd = max(layer_scans, key=lambda e: len(e.outvars) - e.params["num_carry"])
    return [(v.aval.dtype, tuple(v.aval.shape[1:])) for v in fwd.outvars[fwd.params["num_carry"]:]]


def test_scanned_layers_keep_only_matmul_and_attention_outputs():
    c = WIDE
    res = forward_residuals(c)
    tokens = BATCH * SEQ
    weight_shapes = {(c.hidden_size, c.intermediate_size), (c.intermediate_size, c.hidden_size),
                     (c.hidden_size, c.hidden_size),
                     (c.hidden_size, c.num_key_value_heads * c.head_dim)}
    assert not [r for r in res if r[1] in weight_shapes], "a cast of the layer's weights is stacked"
    fp32_acts = [r for r in res if r[0] == jnp.float32 and math.prod(r[1]) >= tokens * c.hidden_size]
    assert not fp32_acts, f"fp32 activations stacked: {fp32_acts}"
    mlp = [r for r in res if math.prod(r[1]) == tokens * c.intermediate_size]
    assert len(mlp) == 2, f"MLP residuals {mlp}: want gate_proj's and up_proj's outputs only"
    # x, q, o_proj out; k, v; the bf16 scores and attention output (XLA attention); 2 MLP.
    per_layer = sum(math.prod(s) * jnp.dtype(d).itemsize for d, s in res)
    kv_dim, q_dim = c.num_key_value_heads * c.head_dim, c.num_attention_heads * c.head_dim
    scores = BATCH * c.num_attention_heads * SEQ * SEQ
    want = 2 * (tokens * (3 * c.hidden_size + 2 * kv_dim + q_dim + 2 * c.intermediate_size) + scores)
    assert per_layer <= want, (per_layer, want, res)


@pytest.mark.parametrize("remat", ["none", "dots"])
def test_cudnn_attention_forward_runs_once(monkeypatch, remat):
    """The policies 'none' and 'dots' keep cuDNN's forward outputs (by primitive name): had
    JAX renamed the primitive, the backward scan would run the attention forward again. Traced
    only (no GPU needed): cuDNN's version and capability checks are stubbed; skipped if they
    moved."""
    fa = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    if not (hasattr(fa, "check_cudnn_version") and hasattr(fa, "check_compute_capability")):
        pytest.skip("JAX's cuDNN attention checks moved")
    monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fa, "check_compute_capability", lambda capability: True)
    config = WIDE.replace(attention_impl="cudnn", remat_policy=remat)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: create_model(config, 0)))

    def loss(p, ids):
        return jnp.sum(nnx.merge(graphdef, p)(ids, return_hidden=True).astype(jnp.float32))

    jaxpr = jax.make_jaxpr(jax.grad(loss))(params, jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32))
    names = [eqn.primitive.name for eqn in _eqns(jaxpr.jaxpr)]
    forwards = [n for n in names if "dot_product_attention" in n and "fwd" in n]
    assert len(forwards) == 1, forwards


def _temp_bytes(config, layers):
    config = config.replace(num_hidden_layers=layers)
    mesh = make_mesh(1, -1, 1, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        setup = state_lib.build_setup(config, mesh, 10, state_lib.optimizer_settings())
        bsh = step_lib.batch_sharding(setup)
        batch = {k: jax.ShapeDtypeStruct((BATCH, SEQ), jnp.float32 if k == "loss_mask" else jnp.int32,
                                         sharding=bsh) for k in step_lib.BATCH_KEYS}
        compiled = step_lib.make_train_step(setup).lower(state_lib.restore_target(setup), batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="figures are for XLA:CPU")
def test_scanned_step_needs_no_more_temp_memory_per_layer_than_unrolled():
    """Per-layer growth of the compiled train step's temp buffers, 2 -> 4 layers. Seen on
    CPU at these widths: scanned 5.7 MiB/layer with the policy, 12.9 without (unrolled 8.2).
    At TinyLlama widths, seq 512 x batch 2: 310 vs 660 MiB/layer (unrolled 547)."""
    grow = {}
    for scan in (True, False):
        config = WIDE.replace(scan_layers=scan)
        grow[scan] = (_temp_bytes(config, 4) - _temp_bytes(config, 2)) / 2
    assert grow[True] <= grow[False], {k: v / 2**20 for k, v in grow.items()}


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_scan_unroll_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="scan_unroll"):
        WIDE.replace(scan_unroll=bad)
