"""Sampling: reproducible keys, top-k=1 == greedy, and the drawn frequencies match softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from lumos_jax.inference import Engine, SamplingParams
from lumos_jax.inference.sampling import row_keys, sample_tokens
from lumos_jax.models import PRESETS, create_model


@pytest.fixture(scope="module")
def engine():
    model = create_model(PRESETS["tiny"].replace(initializer_range=0.1), seed=3)
    return Engine(model, num_slots=4, max_len=64, steps_per_call=6)


PROMPTS = [[1, 5, 9, 33], [1, 200, 17], [1, 40, 41, 42, 43, 44, 45]]


def test_same_seed_same_output_whatever_the_batch(engine):
    p = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=15, seed=7)
    batch = engine.generate(PROMPTS, p)
    alone = [engine.generate([q], p)[0] for q in PROMPTS]
    assert [r.tokens for r in batch] == [r.tokens for r in alone]
    other_k = engine.resized(steps_per_call=4).generate(PROMPTS, p)
    assert [r.tokens for r in other_k] == [r.tokens for r in batch]
    other = engine.generate(PROMPTS, SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=15,
                                                    seed=8))
    assert [r.tokens for r in other] != [r.tokens for r in batch]
    greedy = engine.generate(PROMPTS, SamplingParams(max_new_tokens=15))
    assert [r.tokens for r in greedy] != [r.tokens for r in batch]


def test_top_k_1_equals_greedy(engine):
    greedy = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12))
    top1 = engine.generate(PROMPTS, SamplingParams(temperature=1.5, top_k=1, max_new_tokens=12,
                                                   seed=3))
    assert [r.tokens for r in top1] == [r.tokens for r in greedy]


def test_row_keys_are_jax_threefry_keys():
    seeds = [0, 7, 2**31 + 5]
    want = np.stack([np.asarray(jax.random.key_data(jax.random.PRNGKey(s))) for s in seeds])
    np.testing.assert_array_equal(row_keys(seeds), want)


def _draw(logits, n, temperature=1.0, top_k=0, top_p=1.0, seed=0):
    """n draws from one row of logits, each with its own fold-in position."""
    v = logits.shape[0]
    rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, v))
    keys = jnp.broadcast_to(row_keys([seed])[0], (n, 2))
    full = lambda x: jnp.full((n,), x)  # noqa: E731
    out = jax.jit(sample_tokens)(rows, full(temperature).astype(jnp.float32),
                                 full(top_k).astype(jnp.int32), full(top_p).astype(jnp.float32),
                                 keys, jnp.arange(n, dtype=jnp.int32))
    return np.bincount(np.asarray(out), minlength=v)


LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2], np.float32)


def softmax(x):
    e = np.exp(np.asarray(x, np.float64) - np.max(x))
    return e / e.sum()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_temperature_sampling_matches_softmax_chi_square(temperature):
    n = 20000
    counts = _draw(LOGITS, n, temperature=temperature, seed=11)
    expected = n * softmax(LOGITS / temperature)
    chi2, p = stats.chisquare(counts, expected)
    assert p > 1e-3, (chi2, counts, expected)
    # and the test has power: a wrong temperature is rejected
    wrong = n * softmax(LOGITS / (temperature * 1.3))
    assert stats.chisquare(counts, wrong)[1] < 1e-6


def test_top_k_and_top_p_renormalise_over_the_kept_set():
    n = 20000
    probs = softmax(LOGITS)
    order = np.argsort(-probs)
    counts = _draw(LOGITS, n, top_k=3, seed=5)
    keep = order[:3]
    assert counts[order[3:]].sum() == 0
    assert stats.chisquare(counts[keep], n * probs[keep] / probs[keep].sum())[1] > 1e-3
    # top_p=0.6: smallest prefix of the sorted probs whose mass reaches 0.6
    cum = np.cumsum(probs[order])
    kept = order[: int(np.searchsorted(cum, 0.6) + 1)]
    counts = _draw(LOGITS, n, top_p=0.6, seed=6)
    assert set(np.flatnonzero(counts)) == set(kept.tolist())
    assert stats.chisquare(counts[kept], n * probs[kept] / probs[kept].sum())[1] > 1e-3
