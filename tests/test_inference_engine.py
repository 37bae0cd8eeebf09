"""Engine vs Hugging Face transformers: greedy decoding, extend, stops, bad input."""

import numpy as np
import pytest

from inference_helpers import STORIES, hf_greedy, random_hf_dir, random_prompts, run_until_done

from lumos_jax.checkpoints.hf import load_hf_model
from lumos_jax.inference import Engine, NoFreeSlotError, SamplingParams


@pytest.fixture(scope="module")
def stories():
    from transformers import LlamaForCausalLM

    return load_hf_model(STORIES), LlamaForCausalLM.from_pretrained(STORIES).eval()


@pytest.fixture(scope="module")
def stories_engine(stories):
    return Engine(stories[0], num_slots=4, max_len=128, steps_per_call=8)


def test_greedy_matches_hf_on_stories260k_mixed_lengths(stories, stories_engine):
    hf = stories[1]
    rng = np.random.default_rng(0)
    prompts = [[1], [1, 403, 407, 261, 378]] + random_prompts(rng, 4, 2, 40, 512)
    n = 24
    results = stories_engine.generate(prompts, SamplingParams(max_new_tokens=n))
    reduce_engine = stories_engine.resized(decode_attention="reduce")
    reduced = reduce_engine.generate(prompts, SamplingParams(max_new_tokens=n))
    for p, r, r2 in zip(prompts, results, reduced):
        assert r.tokens == hf_greedy(hf, p, n), f"prompt of {len(p)} tokens"
        assert r.finish_reason == "length" and r.prompt_tokens == len(p)
        assert r2.tokens == r.tokens


def test_greedy_generate_wrapper_matches_llama2c_reference(stories):
    import json

    from lumos_jax.generation import greedy_generate

    ref = json.loads((STORIES / "reference_greedy.json").read_text())["empty_prompt"]
    out = greedy_generate(stories[0], [ref["prompt_ids"]], 40, stop_ids=[2])[0]
    assert out == ref["generated_ids"][:40]


@pytest.mark.parametrize("cfg,max_len", [
    (dict(num_attention_heads=4, num_key_value_heads=2), 64),                 # GQA
    # MQA, odd head_dim, tied embeddings; a table wider than one attention chunk (512)
    (dict(num_attention_heads=4, num_key_value_heads=1, head_dim=24, tie_word_embeddings=True,
          rope_theta=500.0, max_position_embeddings=1024), 600),
], ids=["gqa", "mqa_tied_windowed"])
def test_greedy_matches_hf_on_random_configs(tmp_path, cfg, max_len):
    from transformers import LlamaForCausalLM

    hf_dir = random_hf_dir(tmp_path, seed=len(cfg), **cfg)
    hf = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    engine = Engine(load_hf_model(hf_dir), num_slots=4, max_len=max_len, steps_per_call=5)
    prompts = random_prompts(np.random.default_rng(1), 5, 1, 30, 300)
    results = engine.generate(prompts, SamplingParams(max_new_tokens=12))
    for p, r in zip(prompts, results):
        assert r.tokens == hf_greedy(hf, p, 12)


def test_extend_equals_recompute_and_counts_prefill(stories, stories_engine):
    eng = stories_engine
    a, b = [1, 403, 407, 261, 378], [266, 268, 388, 13, 300, 301]
    slot = eng.start(a, SamplingParams(max_new_tokens=7), request_id="ep")
    (r1,) = run_until_done(eng)
    assert r1.slot == slot and r1.request_id == "ep" and len(r1.tokens) == 7
    eng.extend(slot, b, SamplingParams(max_new_tokens=9))
    (r2,) = run_until_done(eng)
    assert eng.prefilled_tokens(slot) == len(a) + len(b)
    assert eng.sequence(slot) == a + r1.tokens + b + r2.tokens
    eng.release(slot)
    fresh = eng.generate([a + r1.tokens + b], SamplingParams(max_new_tokens=9))[0]
    assert r2.tokens == fresh.tokens == hf_greedy(stories[1], a + r1.tokens + b, 9)


def test_stop_ids_per_row_and_stop_strings_rewind(stories, stories_engine):
    from lumos_jax.tokenization import Tokenizer

    eng = stories_engine
    tok = Tokenizer(STORIES)
    eng.tokenizer = tok
    try:
        prompt = [1, 403, 407, 261, 378]
        full = hf_greedy(stories[1], prompt, 30)
        stop_at = full[5]
        by_id = eng.generate([prompt, prompt], SamplingParams(max_new_tokens=30, stop_ids=(stop_at,)))
        assert by_id[0].tokens == full[: full.index(stop_at) + 1] and by_id[0].stop == stop_at
        text = tok.decode(full)
        target = "girl"
        assert target in text
        slot = eng.start(prompt, SamplingParams(max_new_tokens=30, stop_strings=(target,)))
        (r,) = run_until_done(eng)
        assert r.finish_reason == "stop" and r.stop == target and target in r.text
        assert target not in tok.decode(r.tokens[:-1]) and r.tokens == full[: len(r.tokens)]
        # the cache was rewound to the cut: extending equals recomputing the truncated text
        eng.extend(slot, [13], SamplingParams(max_new_tokens=6))
        (r2,) = run_until_done(eng)
        eng.release(slot)
        assert r2.tokens == hf_greedy(stories[1], prompt + r.tokens + [13], 6)
    finally:
        eng.tokenizer = None


def test_bad_input_is_rejected_with_clear_errors(stories_engine):
    eng = stories_engine
    with pytest.raises(ValueError, match="at least one token"):
        eng.start([])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.start([1, 99999])
    with pytest.raises(ValueError, match="max_len=128"):
        eng.submit([1] * 200)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="tokenizer"):
        eng.start([1], SamplingParams(stop_strings=("\n",)))
    slot = eng.start([1, 2, 3])
    with pytest.raises(ValueError, match="still prefill"):
        eng.extend(slot, [5])
    with pytest.raises(ValueError, match="not in use"):
        eng.extend(eng.num_slots + 3, [5])
    others = [eng.start([1]) for _ in range(eng.free_slots)]
    with pytest.raises(NoFreeSlotError):
        eng.start([1])
    for s in [slot] + others:
        eng.release(s)
    assert eng.free_slots == eng.num_slots


def test_decode_returns_to_host_after_k_steps_or_at_a_stop(stories, stories_engine):
    eng = stories_engine
    prompt = [1, 403, 407, 261, 378]
    calls = eng.stats["decode_calls"]
    slot = eng.start(prompt, SamplingParams(max_new_tokens=30))
    rounds = 0
    while eng.is_generating(slot):
        eng.step()
        rounds += 1
        # each call yields at most steps_per_call tokens (+1 sampled by the prefill)
        assert len(eng.sequence(slot)) - len(prompt) <= 1 + rounds * eng.steps_per_call
    assert eng.stats["decode_calls"] - calls == -(-29 // eng.steps_per_call)
    full = eng.sequence(slot)[len(prompt):]
    eng.release(slot)
    stop = full[3]  # the 4th token: the loop must stop right there, not after 8 steps
    slot = eng.start(prompt, SamplingParams(max_new_tokens=30, stop_ids=(stop,)))
    (r,) = run_until_done(eng)
    assert r.tokens == full[: full.index(stop) + 1] and eng.sequence(slot) == prompt + r.tokens
    eng.release(slot)


def test_cancel_frees_queued_and_running_requests(stories_engine):
    eng = stories_engine
    params = SamplingParams(max_new_tokens=40)
    ids = [eng.submit([1, 403 + i], params) for i in range(eng.num_slots + 2)]
    eng.step()                                    # num_slots running, 2 queued
    assert eng.cancel(ids[0]) and eng.cancel(ids[-1]) and not eng.cancel("nope")
    done = []
    while eng.busy:
        done += eng.step()
    assert sorted(r.request_id for r in done) == ids[1:-1]
    assert all(len(r.tokens) == 40 for r in done) and eng.free_slots == eng.num_slots


def test_random_decode_params_have_the_models_layout_and_scale():
    import jax

    from lumos_jax.inference.params import decode_params, padded_vocab, random_decode_params
    from lumos_jax.models import PRESETS
    from lumos_jax.models.llama import create_model

    config = PRESETS["tiny"].replace(vocab_size=300)
    params, spec = random_decode_params(config, jax.random.PRNGKey(0), "bfloat16")
    ref, ref_spec = decode_params(create_model(config, 0))
    assert spec == ref_spec._replace(dtype=spec.dtype)
    assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, ref)
    assert params["layers"]["wqkv"].dtype == jax.numpy.bfloat16
    w = np.asarray(params["layers"]["w_gate_up"], np.float32)
    assert abs(w.std() - config.initializer_range) < 0.1 * config.initializer_range
    assert not np.array_equal(w[0], w[1])                         # each layer its own draw
    assert (np.asarray(params["layers"]["attn_norm"], np.float32) == 1).all()
    assert padded_vocab(300) > 300 and not np.asarray(params["embed"], np.float32)[300:].any()
    np.testing.assert_array_equal(params["inv_freq"], ref["inv_freq"])
    engine = Engine.from_params(config, params, spec, num_slots=2, max_len=64, steps_per_call=4)
    (r,) = engine.generate([[1, 5, 9]], SamplingParams(max_new_tokens=3))
    assert len(r.tokens) == 3


def test_shape_buckets_stay_few():
    """Calls of any size map to few compiled shapes: prefill rows x length, decode rows."""
    from lumos_jax.inference.paged_slots import length_bucket, row_count

    prefill = {(row_count(n, length_bucket(t, 4096), 512), length_bucket(t, 4096))
               for n in range(1, 65) for t in range(1, 1025)}
    decode = {row_count(n, 1, 512) for n in range(1, 65)}
    # lengths: powers of two and their midpoints (9 up to 1024), rows: powers of four
    assert len(prefill) <= 34 and decode == {16, 32, 64}
    for n, t in ((1, 1), (3, 70), (64, 1000)):
        rows, length = row_count(n, length_bucket(t, 4096), 512), length_bucket(t, 4096)
        assert rows >= n and length >= t and (rows <= 4 * n or rows * length <= 256)
    assert row_count(5, 1, 1) == 1 and row_count(1, 64, 2) == 2       # never past the slots
