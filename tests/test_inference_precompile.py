"""engine_settings.precompile_threads: the engine's programs compiled ahead in background
threads give the same tokens as compiling on first use, and cover every call a run makes."""

import jax
import numpy as np
import pytest

from lumos_jax.inference import Engine, SamplingParams
from lumos_jax.inference.paged_slots import length_bucket, row_count
from lumos_jax.inference.params import random_decode_params
from lumos_jax.inference.precompile import program_shapes
from lumos_jax.models import PRESETS
from lumos_jax.sharding import make_mesh

CONFIG = PRESETS["tiny"]
SIZES = dict(num_slots=4, max_len=128, max_prefill_tokens=256, steps_per_call=4, block_size=8, num_blocks=40)


@pytest.fixture(scope="module")
def weights():
    return random_decode_params(CONFIG, jax.random.PRNGKey(1), "float32")


def run(weights, threads: int, mesh=None):
    """Eight requests of varied lengths through a pool smaller than their sum (evictions and
    preemptions: prefill buckets of several lengths and row counts)."""
    params, spec = weights
    e = Engine.from_params(CONFIG, params, spec, mesh=mesh, cache_dtype="float32", precompile_threads=threads,
                           **SIZES)
    rng = np.random.default_rng(0)
    ids = {}
    for n in (5, 70, 20, 100, 9, 64, 33, 90):
        prompt = rng.integers(3, CONFIG.vocab_size, size=n).tolist()
        ids[e.submit(prompt, SamplingParams(max_new_tokens=int(rng.integers(4, 20))))] = n
    out = {}
    while len(out) < len(ids):
        for r in e.step():
            out[r.request_id] = r.tokens
    return e, [out[k] for k in ids]


def test_precompiled_run_equals_compile_on_first_use(weights):
    lazy_engine, lazy = run(weights, 0)
    e, ahead = run(weights, 2)
    assert ahead == lazy
    calls = e.stats["prefill_calls"] + e.stats["decode_calls"]
    assert e.programs.stats["ran_precompiled"] == calls > 0      # every call had its program ready
    assert e.programs.wait() == 0                                  # then every queued one is built
    assert e.programs.stats["precompiled"] == len(program_shapes(4, 128, 256))
    assert e.programs.stats["precompile_failed"] == 0
    assert lazy_engine.programs.stats["ran_precompiled"] == 0
    mesh = make_mesh(data=1, fsdp=1, tensor=2, devices=jax.devices()[:2])   # sharded weights and pool
    params, spec = weights
    sharded = (jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())), spec)
    e, on_mesh = run(sharded, 2, mesh)
    assert on_mesh == lazy and e.programs.stats["ran_precompiled"] > 0


def test_program_shapes_cover_the_engines_buckets():
    """Every (rows, length) `Engine._prefill_rows` can pad a call to, and every decode row count."""
    for slots, max_len, budget in ((4, 128, 256), (512, 4096, 16384), (6, 200, 1000)):
        shapes = set(program_shapes(slots, max_len, budget))
        for new_tokens in range(1, max_len + 1):
            t = length_bucket(new_tokens, max_len)
            per_call = max(1, min(slots, budget // t))
            for k in range(1, per_call + 1):
                n = max(k, min(row_count(k, t, slots), budget // t))
                assert ("prefill", n, t) in shapes, (slots, max_len, budget, k, t)
        for k in range(1, slots + 1):
            assert ("decode", row_count(k, 1, slots), 1) in shapes


def test_a_queued_program_is_compiled_at_once_by_its_caller(weights, monkeypatch):
    """With the only thread held by a slow compile, a call needing a program still queued
    compiles it in the calling thread instead of waiting for the queue (the 7B eval: 34
    programs of ~8 s per engine)."""
    import threading
    from lumos_jax.inference import precompile

    unused = ("decode", 3, 1)  # a valid shape no bucket pads to: queued second, it holds the thread
    real_shapes, real_compile = precompile.program_shapes, precompile.Precompiler._compile
    release, callers = threading.Event(), []

    def compile_(self, key):
        callers.append((key, threading.current_thread().name))
        if key[:3] == unused:
            release.wait(60)
        return real_compile(self, key)

    monkeypatch.setattr(precompile, "program_shapes", lambda *a: [unused] + real_shapes(*a))
    monkeypatch.setattr(precompile.Precompiler, "_compile", compile_)
    try:
        e, tokens = run(weights, 1)
        held = not release.is_set()
        building = e.programs.wait(timeout=0)      # the held compile (and the queue behind it)
    finally:
        release.set()
    _, lazy = run(weights, 0)
    assert tokens == lazy and held and building >= 1
    assert e.programs.wait(timeout=60) == 0
    inline = [k for k, name in callers if not name.startswith("lumos-precompile")]
    assert len(inline) >= 2, callers     # the run's other programs, each compiled when first needed
    assert e.programs.stats["ran_precompiled"] == e.stats["prefill_calls"] + e.stats["decode_calls"]


def test_engines_of_one_shape_compile_each_program_once(weights, monkeypatch):
    """Two engines of the same shapes (a planner and a grounder) precompiling side by side
    share every program being built rather than compiling it twice; each gives the tokens of
    compile-on-first-use with its own weights. (Builds slowed to 0.3 s, as a 7B compile's
    ~8 s would be, so that the two engines' builds overlap.)"""
    import threading
    import time

    from lumos_jax.inference import precompile

    real_build = precompile.Precompiler._build

    def slow_build(self, key):
        time.sleep(0.3)
        return real_build(self, key)

    monkeypatch.setattr(precompile.Precompiler, "_build", slow_build)
    other = random_decode_params(CONFIG, jax.random.PRNGKey(2), "float32")
    out = {}

    def go(name, w):
        out[name] = run(w, 2)

    threads = [threading.Thread(target=go, args=(n, w)) for n, w in (("a", weights), ("b", other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out["a"][1] == run(weights, 0)[1] and out["b"][1] == run(other, 0)[1]
    shapes = len(program_shapes(4, 128, 256))
    built = sum(out[n][0].programs.stats["precompiled"] - out[n][0].programs.stats["shared"] for n in "ab")
    assert sum(out[n][0].programs.stats["shared"] for n in "ab") > 0
    assert built < 2 * shapes


def test_prefill_calls_cover_the_rows_with_compiled_shapes_and_pad_least():
    """A group of k rows is split into calls whose padded shapes are all precompiled, never
    padding more than one call per `budget` rows did (the 7B rollouts: 70 rows of 64 tokens
    padded to 256 rows in one call), and exactly as little as a brute-force search."""
    import itertools

    from lumos_jax.inference.paged_slots import prefill_calls, prefill_rows

    slots, max_len, budget, cost = 512, 4096, 16384, 179
    shapes = set(program_shapes(slots, max_len, budget))
    for t in (64, 128, 512):
        per_call = min(slots, budget // t)
        for k in (1, 5, 17, 60, 70, 130, 200, 256, 300, 512):
            calls = prefill_calls(k, t, slots, budget, cost)
            assert sum(calls) == k and all(0 < c <= per_call for c in calls), (k, t, calls)
            assert all(("prefill", prefill_rows(c, t, slots, budget), t) in shapes for c in calls)
            padded = sum(prefill_rows(c, t, slots, budget) for c in calls)
            chunked = sum(prefill_rows(min(per_call, k - lo), t, slots, budget) for lo in range(0, k, per_call))
            assert padded <= chunked
    # brute force over splits into at most 3 calls, small k
    t = 64
    for k in range(1, 90):
        best = min(sum(prefill_rows(c, t, slots, budget) * t + cost for c in split)
                   for n in (1, 2, 3) for split in itertools.product(range(1, k + 1), repeat=n) if sum(split) == k)
        calls = prefill_calls(k, t, slots, budget, cost)
        assert sum(prefill_rows(c, t, slots, budget) * t + cost for c in calls) <= best, k
    assert sum(prefill_rows(c, 64, slots, budget) for c in prefill_calls(70, 64, slots, budget, cost)) <= 80
