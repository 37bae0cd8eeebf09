"""Params land on the mesh by their logical axes, and sharded forward == one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import FIXTURES
from lumos_jax.checkpoints.hf import load_hf_model
from lumos_jax.models import PRESETS, create_model
from lumos_jax.sharding import axis_rules, logical_to_spec, make_mesh

STORIES = FIXTURES / "stories260k"


def forward(model, ids):
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, ids):
        return nnx.merge(graphdef, state)(ids)

    return np.asarray(f(state, ids))


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1), (2, 1, 4), (1, 2, 4)])
def test_sharded_import_and_forward_match_single_device(shape):
    assert len(jax.devices()) == 8
    mesh = make_mesh(*shape)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 512, (8, 12)), jnp.int32)
    expected = forward(load_hf_model(STORIES), ids)
    model = load_hf_model(STORIES, mesh=mesh)
    q = model.model.layers.self_attn.q_proj.kernel[...]
    assert q.sharding.spec == logical_to_spec(("layers", "embed", "q_heads"), q.shape, mesh)
    assert q.sharding.spec[0] is None  # the stacked layers axis is never split
    with jax.set_mesh(mesh), axis_rules():
        got = forward(model, jax.device_put(ids, jax.NamedSharding(mesh, P(("data", "fsdp")))))
    # Logits reach ~17; split reductions differ by ~1e-6 relative.
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_rules_shard_weights_as_named():
    mesh = make_mesh(2, 2, 2)
    assert logical_to_spec(("embed", "mlp"), (64, 172), mesh) == P("fsdp", "tensor")
    # 32,001 rows don't divide over tensor=2: replicated, not an error.
    assert logical_to_spec(("vocab", "embed"), (32001, 64), mesh) == P(None, "fsdp")
    assert logical_to_spec(("batch", "length"), (8, 16), mesh) == P(("data", "fsdp"), None)


def test_bad_mesh_is_one_clear_error():
    with pytest.raises(ValueError, match="data=3 fsdp=-1 tensor=1 does not divide the 8"):
        make_mesh(3, -1, 1)


def test_remat_gives_same_loss_and_grads():
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 512, (2, 10)), jnp.int32)

    def loss(model):
        logits = model(ids)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    results = []
    for policy in ("none", "full", "dots"):  # jitted, as training runs it (remat is a compiled-program choice)
        model = create_model(PRESETS["tiny"].replace(remat_policy=policy), seed=0)
        value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
        results.append((value, grads))
    for value, grads in results[1:]:
        np.testing.assert_allclose(value, results[0][0], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(results[0][1])):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_bf16_compute_with_fp32_params_is_close():
    model = load_hf_model(STORIES)
    bf16 = load_hf_model(STORIES, dtype="bfloat16")
    assert bf16.model.layers.mlp.up_proj.kernel[...].dtype == jnp.float32
    ids = jnp.asarray([[1, 403, 407, 261, 378]], jnp.int32)
    a, b = model(ids), bf16(ids)
    assert b.dtype == jnp.bfloat16
    assert np.abs(np.asarray(a) - np.asarray(b, np.float32)).max() < 0.25
    assert (np.asarray(a).argmax(-1) == np.asarray(b, np.float32).argmax(-1)).mean() >= 0.8


def test_import_reads_only_each_devices_shard(monkeypatch):
    """A 7B import must not need the model twice in host memory: with fsdp=8 every device's
    callback materialises 1/8 of a weight matrix, never the whole tensor."""
    import lumos_jax.checkpoints.hf as hf_lib

    real = jax.make_array_from_callback
    read = {}

    def recording(shape, sharding, callback):
        def cb(index):
            out = callback(index)
            read.setdefault(shape, []).append(out.size)
            return out
        return real(shape, sharding, cb)

    monkeypatch.setattr(hf_lib.jax, "make_array_from_callback", recording)
    model = load_hf_model(STORIES, mesh=make_mesh(1, 8, 1))
    # stacked layer matrices (5, in, out) and the (512, 64) embedding; not the norms (5, 64)
    matrices = {s: sizes for s, sizes in read.items() if len(s) == 3 or 512 in s}
    assert matrices and len(matrices) >= 4
    for shape, sizes in matrices.items():
        # one call per device per leaf, each 1/8 of the (stacked) matrix
        assert len(sizes) % 8 == 0 and max(sizes) * 8 == np.prod(shape), (shape, sizes)
    ref = load_hf_model(STORIES)
    ids = jnp.asarray([[1, 403, 407, 261]], jnp.int32)
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(ref(ids)), atol=1e-4)
