"""Paged KV cache vs Hugging Face transformers: logits through scattered blocks, greedy
tokens under eviction, preemption and prefix sharing, and the block pool's bookkeeping."""

import jax
import numpy as np
import pytest

from inference_helpers import compile_as_deployed, hf_greedy, random_hf_dir, random_prompts, run_until_done

from lumos_jax.checkpoints.hf import load_hf_model
from lumos_jax.inference import Engine, SamplingParams
from lumos_jax.inference.blocks import BlockPool, block_key
from lumos_jax.inference.forward import PagedCache, decode_forward, prefill_forward
from lumos_jax.inference.params import decode_params, layer_layout

VOCAB = 300
# One shape family for every engine here, so they share compiled programs.
SMALL = dict(num_slots=4, max_len=64, steps_per_call=4, block_size=4, num_blocks=12)  # 48 tokens


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import LlamaForCausalLM

    hf_dir = random_hf_dir(tmp_path_factory.mktemp("paged"), seed=11)
    return load_hf_model(hf_dir), LlamaForCausalLM.from_pretrained(hf_dir).eval()


def _hf_logits(hf, seq):
    import torch

    with torch.no_grad():
        return hf(torch.tensor([seq])).logits[0].numpy()


def _scattered_run(params, cache, spec, seq, table):
    """Prefill 9, extend by 9 (crosses blocks), then decode one token at a time; the
    logits at each position computed, and the final cache."""
    prefill = jax.jit(prefill_forward, static_argnums=2)
    decode = jax.jit(decode_forward, static_argnums=2)
    got = {}
    a, b = 9, 18
    for lo, hi in ((0, a), (a, b)):
        toks = np.zeros((1, 16), np.int32)
        toks[0, : hi - lo] = seq[lo:hi]
        lg, cache = prefill(params, cache, spec, table, toks, np.array([lo], np.int32),
                            np.array([hi - lo], np.int32))
        got[hi - 1] = np.asarray(lg[0, :VOCAB])
    for pos in range(b, len(seq)):
        lg, cache = decode(params, cache, spec, table, np.array([seq[pos]], np.int32),
                           np.array([pos], np.int32), np.array([True]))
        got[pos] = np.asarray(lg[0, :VOCAB])
    return got, cache


def test_logits_through_scattered_blocks_equal_hf_full_forward(models):
    """Both pool layouts: stacked (scanned layers) and one array per layer (unrolled)."""
    ours, hf = models
    params, spec = decode_params(ours)
    bs = 4
    seq = random_prompts(np.random.default_rng(3), 1, 24, 25, VOCAB)[0]   # 25 tokens
    row_blocks = [13, 2, 9, 0, 7, 15, 4, 11]                               # out of order
    table = np.array([row_blocks], np.int32)
    want = _hf_logits(hf, seq)
    stacked = PagedCache.init(spec, num_blocks=16, block_size=bs, dtype=np.float32)
    per_layer = PagedCache.init(spec, num_blocks=16, block_size=bs, dtype=np.float32, per_layer=True)
    assert per_layer.per_layer and (per_layer.num_layers, per_layer.num_blocks) == (spec.num_layers, 16)
    got, cache = _scattered_run(params, stacked, spec, seq, table)
    got_pl, cache_pl = _scattered_run(layer_layout(params, scan=False), per_layer, spec, seq, table)
    for pos, lg in got.items():
        np.testing.assert_allclose(lg, want[pos], atol=2e-4, rtol=1e-4, err_msg=f"position {pos}")
        np.testing.assert_allclose(got_pl[pos], lg, atol=1e-5, rtol=1e-5, err_msg=f"per layer {pos}")
    # the same entries in both layouts; blocks the row does not use were never written
    k = np.asarray(cache.k)
    np.testing.assert_allclose(np.stack([np.asarray(a) for a in cache_pl.k], axis=1), k, atol=1e-5)
    unused = sorted(set(range(16)) - set(row_blocks[: -(-len(seq) // bs)]))
    assert not k[:, :, unused].any()
    with pytest.raises(ValueError, match="per-layer KV cache needs per-layer weights"):
        prefill_forward(params, per_layer, spec, table, np.zeros((1, 4), np.int32),
                        np.zeros(1, np.int32), np.ones(1, np.int32))


def _drive_sessions(engine, hf, prompts, turns, new_tokens, extend_len, rng, tool_steps=2):
    """Agent-style: each session runs `turns` turns, waiting `tool_steps` engine steps
    (a tool call) between them; every turn's tokens are checked against HF greedy on the
    whole sequence so far (a full recompute)."""
    turn = {engine.start(p, SamplingParams(max_new_tokens=new_tokens)): 1 for p in prompts}
    tools: dict[int, int] = {}
    checked = 0
    while turn:
        for slot in [s for s, left in tools.items() if left == 0]:
            del tools[slot]
            turn[slot] += 1
            engine.extend(slot, rng.integers(3, VOCAB, size=extend_len).tolist())
        tools = {s: left - 1 for s, left in tools.items()}
        for r in engine.step():
            seq = engine.sequence(r.slot)
            prompt = seq[: len(seq) - len(r.tokens)]
            assert r.tokens == hf_greedy(hf, prompt, new_tokens), f"slot {r.slot} turn {turn[r.slot]}"
            checked += 1
            if turn[r.slot] == turns:
                engine.release(r.slot)
                del turn[r.slot]
            else:
                tools[r.slot] = tool_steps
    return checked


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
def test_pool_smaller_than_all_sessions_evicts_and_recomputes_exactly(models, scan_layers):
    ours, hf = models
    rng = np.random.default_rng(5)
    prompts = random_prompts(rng, 4, 8, 12, VOCAB)
    # 4 sessions end at ~35 tokens each (~140 in all); the pool holds 48 tokens
    engine = Engine(ours, **SMALL, scan_layers=scan_layers)
    assert engine.cache.per_layer is not scan_layers
    assert _drive_sessions(engine, hf, prompts, turns=3, new_tokens=6, extend_len=4, rng=rng) == 12
    s = engine.stats
    assert s["evictions"] > 0 and s["preemptions"] > 0, s
    assert s["prefill_tokens"] > s["prefilled_tokens"]        # recomputed after eviction
    assert s["blocks_used"] == 0 and engine.free_slots == 4


def test_many_requests_through_a_small_pool_none_fails(models):
    ours, hf = models
    prompts = random_prompts(np.random.default_rng(6), 8, 5, 14, VOCAB)
    engine = Engine(ours, **SMALL)
    results = engine.generate(prompts, SamplingParams(max_new_tokens=12))
    for p, r in zip(prompts, results):
        assert r.tokens == hf_greedy(hf, p, 12) and r.finish_reason == "length"
    assert engine.stats["preemptions"] > 0


def test_one_request_larger_than_the_pool(models):
    ours, hf = models
    engine = Engine(ours, **SMALL)
    with pytest.raises(ValueError, match="whole KV pool"):
        engine.start([1] * 49)
    prompt = random_prompts(np.random.default_rng(7), 1, 39, 40, VOCAB)[0]     # 40 tokens
    (r,) = engine.generate([prompt], SamplingParams(max_new_tokens=20))
    # 48 cache entries: the prompt, 8 generated tokens written, the 9th sampled from them
    assert r.finish_reason == "length" and r.tokens == hf_greedy(hf, prompt, 9)


def test_shared_prefixes_are_computed_once_and_equal_hf(models):
    ours, hf = models
    rng = np.random.default_rng(8)
    shared = random_prompts(rng, 1, 20, 21, VOCAB)[0]                           # 21 tokens
    prompts = [shared + rng.integers(3, VOCAB, size=2).tolist() for _ in range(4)]
    engine = Engine(ours, **SMALL)
    params = SamplingParams(max_new_tokens=5)
    results = [engine.generate([p], params)[0] for p in prompts]   # one at a time: no preemption
    for p, r in zip(prompts, results):
        assert r.tokens == hf_greedy(hf, p, 5)
    assert engine.stats["preemptions"] == engine.stats["evictions"] == 0
    # started together: the first computes the common blocks, the others wait a round for them
    together = Engine(ours, **SMALL)
    assert [r.tokens for r in together.generate(prompts[:3], params)] == [r.tokens for r in results[:3]]
    assert together.stats["prefix_saved_tokens"] == 2 * 20
    assert together.stats["preemptions"] == 0
    assert engine.stats["prefix_saved_tokens"] == 3 * 20          # 5 full blocks of the prefix
    # reference style: the whole conversation re-tokenized and started afresh each turn
    slot = engine.start(prompts[0], params)
    (r1,) = run_until_done(engine)
    seq = engine.sequence(slot)
    engine.release(slot)
    saved = engine.stats["prefix_saved_tokens"]
    computed = engine.stats["prefill_tokens"]
    turn2 = seq + [17, 18, 19]
    slot = engine.start(turn2, params)
    (r2,) = run_until_done(engine)
    assert r2.tokens == hf_greedy(hf, turn2, 5)
    full_cached = (len(seq) - 1) // 4 * 4            # the previous turn's full blocks
    assert engine.stats["prefix_saved_tokens"] - saved == full_cached
    assert engine.stats["prefill_tokens"] - computed == len(turn2) - full_cached
    assert engine.stats["prompt_tokens"] >= engine.stats["prefill_tokens"]


def test_stop_string_rewind_then_extend_leaves_a_twin_sessions_blocks_intact(models):
    ours, hf = models

    class Tok:  # each token id decodes to one character; 'z' is the stop string
        def decode(self, ids):
            return "".join("z" if i == stop else "a" for i in ids)

    prompt = random_prompts(np.random.default_rng(9), 1, 6, 7, VOCAB)[0]        # 7 tokens
    full = hf_greedy(hf, prompt, 12)
    stop = full[9]
    cut = full.index(stop) + 1
    engine = Engine(ours, **SMALL, tokenizer=Tok())
    # a twin sequence shares the prompt's first block; the stopped row is rewound after it
    twin = engine.start(prompt, SamplingParams(max_new_tokens=12))
    run_until_done(engine)
    slot = engine.start(prompt, SamplingParams(max_new_tokens=12, stop_strings=("z",)))
    (r,) = run_until_done(engine)
    assert r.tokens == full[:cut]
    engine.extend(slot, [5, 6], SamplingParams(max_new_tokens=6))
    (r2,) = run_until_done(engine)
    assert r2.tokens == hf_greedy(hf, prompt + full[:cut] + [5, 6], 6)
    engine.extend(twin, [7], SamplingParams(max_new_tokens=4))
    (r3,) = run_until_done(engine)
    assert r3.tokens == hf_greedy(hf, prompt + full + [7], 4)


def test_block_pool_refcounts_lru_and_hash_chain():
    pool = BlockPool(3)
    a, b, c = pool.alloc(), pool.alloc(), pool.alloc()
    assert pool.alloc() is None and pool.available == 0
    ka = block_key(b"", [1, 2])
    assert block_key(ka, [3, 4]) != block_key(block_key(b"", [9, 9]), [3, 4])   # parent matters
    assert pool.register(a, ka) and not pool.register(b, ka)
    pool.register(b, block_key(ka, [3, 4]))
    pool.decref(a), pool.decref(b), pool.decref(c)
    assert pool.available == 3 and pool.cached == 2
    assert pool.alloc() == c                      # free blocks before cached ones
    pool.incref(pool.lookup(ka))                  # a shared prefix comes back from the cache
    assert pool.cached == 1 and pool.alloc() == b and pool.lookup(block_key(ka, [3, 4])) is None
    with pytest.raises(RuntimeError, match="released more often"):
        pool.decref(c), pool.decref(c)


def test_loader_defaults_bf16_tensor_parallel_and_one_budget_for_all_engines(tmp_path):
    import shutil

    from inference_helpers import STORIES

    from lumos_jax.inference.settings import load_engines

    twin = shutil.copytree(STORIES, tmp_path / "twin")
    gb = 0.001
    engines = load_engines([str(STORIES), str(twin), str(STORIES)], kv_memory_gb=gb,
                           num_slots=4, max_len=128)
    assert list(engines) == [str(STORIES), str(twin)]              # one engine per distinct path
    for e in engines.values():
        assert dict(e.mesh.shape) == {"data": 1, "fsdp": 1, "tensor": len(jax.devices())}
        assert e.params["layers"]["wqkv"].dtype == e.cache.k.dtype == jax.numpy.bfloat16
        c = e.config         # K and V, every layer, 16 positions, bf16; 4 kv heads do not split 8 ways
        per_block = 2 * c.num_hidden_layers * c.num_key_value_heads * 16 * c.head_dim * 2
        assert e.num_blocks == int(gb / 2 * 2**30 // per_block)    # the budget split in two


def test_reference_style_episodes_compute_under_half_the_prompt_tokens():
    """Reference prompt style (the whole conversation re-tokenized every turn, the slot
    restarted): prefix blocks of earlier turns and of other episodes' identical instruction
    are reused, so far fewer prefill tokens are computed than the prompts hold."""
    import json

    from conftest import DATA, FIXTURES

    from lumos_jax.agent.backends import EngineBackend
    from lumos_jax.agent.execution import Executor
    from lumos_jax.agent.generators import ChatModelGenerator
    from lumos_jax.agent.loops import EpisodeConfig
    from lumos_jax.agent.runner import EpisodeRunner
    from lumos_jax.agent.tools.registry import build_registry
    from lumos_jax.models import PRESETS
    from lumos_jax.models.llama import create_model
    from lumos_jax.tokenization import Tokenizer

    tok = Tokenizer(FIXTURES / "stories260k")
    tasks = [json.loads(x)["question"] for x in (DATA / "eval/gsm8k_test.jsonl").read_text().splitlines()[:6]]
    cfg = EpisodeConfig(domain="maths", max_rounds=3, style="reference")
    engines = {m: Engine(create_model(PRESETS["tiny"], seed), num_slots=4, max_len=1024, steps_per_call=8)
               for seed, m in enumerate(("plan", "ground"))}
    gens = {m: ChatModelGenerator(EngineBackend(e), tok, style="reference", max_new_tokens=4)
            for m, e in engines.items()}
    results = EpisodeRunner(gens, lambda i: (Executor(build_registry("maths")), None), cfg).run(tasks)
    assert all(r.trace.complete for r in results)
    for m, e in engines.items():
        s = e.stats
        assert s["prefix_saved_tokens"] > 0 and s["prefill_tokens"] <= 0.5 * s["prompt_tokens"], (m, s)


def test_decode_program_updates_the_pool_in_place_and_does_not_grow_with_depth():
    """Layers are scanned: the compiled decode loop is the same size at 2 and 6 layers,
    and the donated pool is aliased to the output with no pool-sized temporary (no copy)."""
    from lumos_jax.inference.paged_slots import row_controls
    from lumos_jax.inference.steps import decode_loop
    from lumos_jax.models.config import LlamaConfig
    from lumos_jax.models.llama import create_model

    sizes = {}
    for layers in (2, 6):
        cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        e = Engine(create_model(cfg, 0), num_slots=2, max_len=64, block_size=8, num_blocks=512)
        z = np.zeros(2, np.int32)
        compiled = compile_as_deployed(decode_loop.lower(
            e.params, e.cache, np.zeros((2, 8), np.int32), z, z, z, np.ones(2, bool), z + 64,
            row_controls([None, None]), spec=e.spec, steps=2))
        mem = compiled.memory_analysis()
        pool = e.cache.k.nbytes + e.cache.v.nbytes
        assert mem.alias_size_in_bytes >= pool and mem.temp_size_in_bytes < pool / 8, (layers, mem)
        sizes[layers] = compiled.as_text().count("\n")
    assert abs(sizes[6] - sizes[2]) < 0.05 * sizes[2], sizes          # unrolled: ~3x


def test_sessions_sharing_a_prefix_through_a_full_pool_preempt_rarely_and_equal_hf(models):
    """Regression (7B eval, 2026-12-02): with the pool full, a slot waiting to prefill kept
    the shared prefix blocks it had matched, was then picked for preemption (freeing
    nothing), matched them again, and so on: thousands of preemptions, the device idle.
    Waiting slots now hold nothing and only slots with blocks of their own are preempted."""
    ours, hf = models
    rng = np.random.default_rng(12)
    shared = random_prompts(rng, 1, 12, 13, VOCAB)[0]                          # 3 full blocks
    prompts = [shared + rng.integers(3, VOCAB, size=3).tolist() for _ in range(8)]
    engine = Engine(ours, **SMALL)
    steps = 0
    for p in prompts:
        engine.submit(p, SamplingParams(max_new_tokens=14))
    got = []
    while engine.busy or engine.pending_requests:
        got += engine.step()
        steps += 1
        assert steps < 200
    assert sorted(r.tokens for r in got) == sorted(hf_greedy(hf, p, 14) for p in prompts)
    s = engine.stats
    assert 0 < s["preemptions"] <= len(prompts), s
    # each admitted prefill counts its reused prefix once: 3 blocks for every start after the first
    # admission of each row (recomputes after preemption reuse the prefix too)
    assert s["prefix_saved_tokens"] <= 12 * (len(prompts) + s["preemptions"]), s
