"""Continuous batching: many requests through few slots equal running them one at a time."""

import numpy as np

from inference_helpers import random_prompts

from lumos_jax.inference import Engine, SamplingParams
from lumos_jax.models import PRESETS, create_model


def test_50_requests_through_8_slots_equal_one_at_a_time():
    model = create_model(PRESETS["tiny"].replace(initializer_range=0.1), seed=5)
    rng = np.random.default_rng(0)
    prompts = random_prompts(rng, 50, 1, 15, 512)
    params = [SamplingParams(max_new_tokens=int(rng.integers(1, 20)),
                             temperature=float(i % 3 == 0), top_k=int(i % 2) * 50,
                             stop_ids=(int(rng.integers(3, 512)),), seed=i)
              for i in range(50)]
    engine = Engine(model, num_slots=8, max_len=48, steps_per_call=4)
    ids = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
    results, busy = {}, []
    while len(results) < 50:
        done = engine.step()
        busy.append(engine.num_slots - engine.free_slots + len(done))
        for r in done:
            results[r.request_id] = r
    assert max(busy) == 8 and engine.free_slots == 8 and engine.pending_requests == 0
    assert engine.stats["prefilled_tokens"] == sum(map(len, prompts))
    single = Engine(model, num_slots=1, max_len=48, steps_per_call=4)
    for rid, p, sp in zip(ids, prompts, params):
        alone = single.generate([p], sp)[0]
        assert results[rid].tokens == alone.tokens, rid
        assert results[rid].finish_reason == alone.finish_reason
        assert len(alone.tokens) <= sp.max_new_tokens
