"""Random-weight init of the train state (`state.random_state`, one jitted program straight
into the shardings): the same state as the two-call path, the same on any mesh, a function
of the seed alone, the intended distribution per matrix (HF Llama's `_init_weights`:
normal(0, initializer_range) for every projection and the embedding, ones for the norms),
and a program whose random draws do not multiply with depth."""

import math
import re

import numpy as np

import jax
import jax.numpy as jnp

from lumos_jax.models import PRESETS
from lumos_jax.sharding import make_mesh
from lumos_jax.training import state as state_lib

# GQA (4 q / 2 kv heads) so that a tensor axis of 2 splits both.
CONFIG = PRESETS["tiny"].replace(hidden_size=128, intermediate_size=256, num_hidden_layers=3, head_dim=None)


def make_state(mesh_shape, seed, config=CONFIG, two_calls=False):
    mesh = make_mesh(*mesh_shape, devices=jax.devices()[: math.prod(mesh_shape)])
    with jax.set_mesh(mesh):
        setup = state_lib.build_setup(config, mesh, 10, state_lib.optimizer_settings())
        if two_calls:
            state = state_lib.init_state(setup, state_lib.random_params(setup, seed), seed)
        else:
            timings = {}
            state = state_lib.random_state(setup, seed, timings=timings)
            assert set(timings) == {"compile_s", "run_s"}
    return setup, state


def leaves(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_one_program_gives_the_two_call_state_on_eight_devices():
    """Every leaf of the one-program state has the two-call path's shape, dtype, sharding
    (build_setup's, over data x fsdp x tensor) and values."""
    setup, one = make_state((2, 2, 2), 5)
    _, two = make_state((2, 2, 2), 5, two_calls=True)
    want_sh, want_abs, got, ref = (leaves(t) for t in (setup.shardings, setup.abstract_state, one, two))
    assert got.keys() == ref.keys() == want_sh.keys()
    sharded = 0
    for k, a in got.items():
        b = ref[k]
        assert (a.shape, a.dtype) == (b.shape, b.dtype) == (want_abs[k].shape, want_abs[k].dtype), k
        assert a.sharding == b.sharding == want_sh[k], k
        sharded += not a.sharding.is_fully_replicated
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=k)
    assert sharded >= 3 * 9  # params, mu and nu of every projection and the embedding


def test_state_is_a_function_of_the_seed_alone():
    """Same seed: bitwise the same params on one device and on an 8-device fsdp x tensor
    mesh (what lets any number of hosts start alike); another seed: other draws."""
    _, single = make_state((1, 1, 1), 3)
    _, again = make_state((1, 1, 1), 3)
    _, sharded = make_state((1, 4, 2), 3)
    _, other = make_state((1, 1, 1), 4)
    a, b, c, d = (leaves(jax.device_get(s["params"])) for s in (single, again, sharded, other))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        np.testing.assert_array_equal(a[k], c[k], err_msg=k)
        if "norm" in k:
            assert (a[k] == d[k]).all(), k
        else:
            assert np.mean(a[k] == d[k]) < 1e-3, k
    np.testing.assert_array_equal(np.asarray(single["rng"]), np.asarray(jax.random.key_data(jax.random.key(3))))
    assert not np.array_equal(np.asarray(single["rng"]), np.asarray(other["rng"]))


def normal_tail(z: float) -> float:
    """P(|X| > z) for a standard normal."""
    return math.erfc(z / math.sqrt(2))


def test_every_matrix_is_drawn_from_normal_0_initializer_range():
    """Per matrix (each layer's slice on its own): std within 5 standard errors of 0.02, mean
    about 0, and the tails of a normal (|w| > 2 and 3 sigma: a truncated normal or a uniform
    has none beyond 2 sigma); norms exactly 1; layers independent draws."""
    _, state = make_state((1, 1, 1), 11)
    params = leaves(jax.device_get(state["params"]))
    sigma = CONFIG.initializer_range
    checked = 0
    for name, value in params.items():
        value = np.asarray(value, np.float64)
        if "norm" in name:
            assert (value == 1).all(), name
            continue
        mats = value if "layers" in name else value[None]
        assert len(mats) == (CONFIG.num_hidden_layers if "layers" in name else 1), name
        for i, w in enumerate(mats):
            n, where = w.size, f"{name}[{i}]"
            assert abs(w.std() / sigma - 1) < 5 / math.sqrt(2 * n), (where, w.std())
            assert abs(w.mean()) < 5 * sigma / math.sqrt(n), (where, w.mean())
            for z in (2.0, 3.0):
                p = normal_tail(z)
                got = np.mean(np.abs(w) > z * sigma)
                assert abs(got - p) < 5 * math.sqrt(p * (1 - p) / n) + 1 / n, (where, z, got, p)
            checked += 1
        if "layers" in name:
            r = np.corrcoef(mats[0].ravel(), mats[1].ravel())[0, 1]
            assert abs(r) < 5 / math.sqrt(mats[0].size), (name, r)
    assert checked == 2 + 7 * CONFIG.num_hidden_layers  # embed, lm_head, 7 projections per layer


def test_init_program_has_one_draw_per_parameter_name_at_any_depth():
    """The lowered init program at 2 and 16 layers: the same number of threefry calls (one
    per random parameter name, not per layer) and the same size within 2%. Unrolled
    per-layer draws (the model before stacking) took ~80 s to create a 1.1B state on a GPU."""
    def lowered(n):
        config = PRESETS["tiny"].replace(num_hidden_layers=n)
        mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
        with jax.set_mesh(mesh):
            setup = state_lib.build_setup(config, mesh, 10, state_lib.optimizer_settings())
            text = jax.jit(lambda s: state_lib._draw_params(config, s)).lower(jnp.uint32(0)).as_text()
        return len(re.findall(r"call @threefry2x32", text)), len(text), setup
    (draws2, size2, setup), (draws_n, size_n, _) = lowered(2), lowered(16)
    random_names = [k for k in leaves(setup.abstract_state["params"]) if "norm" not in k]
    assert draws2 == draws_n <= len(random_names), (draws2, draws_n)
    assert abs(size_n - size2) <= 0.02 * size2, (size2, size_n)
