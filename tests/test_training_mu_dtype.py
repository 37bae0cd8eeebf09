"""optimizer_settings.mu_dtype='bfloat16': Adam's first moment is stored in bf16 (the 7B
one-card option), the second stays fp32, and training follows the fp32 optimizer closely;
compared with torch.optim.AdamW on the same gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lumos_jax.training import state as state_lib


def _moments(opt_state):
    found = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        names = [getattr(p, "name", getattr(p, "key", "")) for p in path]
        for n in ("mu", "nu"):
            if n in names:
                found.setdefault(n, set()).add(jnp.asarray(leaf).dtype)
    return found


def test_bf16_first_moment_is_stored_in_bf16_and_steps_like_torch_adamw():
    import torch

    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((8, 16)).astype(np.float32)
    grads = [rng.standard_normal((8, 16)).astype(np.float32) for _ in range(5)]
    lr = 1e-2
    s = state_lib.optimizer_settings(learning_rate=lr, warmup_steps=0, schedule="constant", max_grad_norm=None,
                                     weight_decay=0.0, mu_dtype="bfloat16")
    tx, _ = state_lib.make_optimizer(10, s)
    params = {"proj": {"w": jnp.asarray(w0)}}
    opt = tx.init(params)
    assert _moments(opt) == {"mu": {jnp.dtype(jnp.bfloat16)}, "nu": {jnp.dtype(jnp.float32)}}
    fp32_tx, _ = state_lib.make_optimizer(10, dict(s, mu_dtype=None))
    fp32_opt, fp32_params = fp32_tx.init(params), params
    assert _moments(fp32_opt) == {"mu": {jnp.dtype(jnp.float32)}, "nu": {jnp.dtype(jnp.float32)}}
    w = torch.nn.Parameter(torch.tensor(w0))
    ref = torch.optim.AdamW([w], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for g in grads:
        upd, opt = tx.update({"proj": {"w": jnp.asarray(g)}}, opt, params)
        params = jax.tree.map(lambda p, u: p + u, params, upd)
        upd, fp32_opt = fp32_tx.update({"proj": {"w": jnp.asarray(g)}}, fp32_opt, fp32_params)
        fp32_params = jax.tree.map(lambda p, u: p + u, fp32_params, upd)
        w.grad = torch.tensor(g)
        ref.step()
    want = w.detach().numpy()
    np.testing.assert_allclose(np.asarray(fp32_params["proj"]["w"]), want, atol=1e-5)
    bf16_err = np.abs(np.asarray(params["proj"]["w"]) - want).max()
    # close to AdamW (measured 1.7e-4 against 5 steps of ~lr each), but not identical: bf16 is in use
    assert 0 < bf16_err < 2e-3


def test_bad_mu_dtype_is_one_line():
    with pytest.raises(ValueError, match="optimizer_settings.mu_dtype='int8'"):
        state_lib.optimizer_settings(mu_dtype="int8")
