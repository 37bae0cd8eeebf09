"""The 7B agent rollouts' scheduling on the CPU: `bench/agent_rollouts.py`'s ours side with
every device call faked, and a cost model of those calls on one H200.

The engines, runner, generators, tokenizer and tools are the real ones (tiny weights that
are never run); prefill calls return a token, decode calls return each row's forced token
count (at most the call's steps and the row's room). The model, checked against the card's
51.1 s for tree 32f8723 (it gives 48 s): a prefill call costs 4 ms + padded tokens x 13.4
GFLOP at 400 TFLOP/s; a decode step 4 ms (the 13.5 GB of bf16 weights) + the K/V of its
active rows (0.5 MB a token) at half the 3.36 TB/s copy bandwidth. It answers "how many
passes, how much padding, where would the time go" for a scheduler change without a GPU.

    python bench/rollout_replay.py --concurrency 256 --out /tmp/replay.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.agent_rollouts import (DEFAULT_GSM8K, DEFAULT_TOKENIZER, episode_config, gold_episodes,  # noqa: E402
                                  random_engine, token_counter)

PREFILL_FLOP_PER_TOKEN, FLOP_S = 13.4e9, 400e12
WEIGHTS_S, KV_BYTES_PER_TOKEN, KV_BW = 0.004, 0.5e6, 1.68e12


class FakeDevice:
    """Stands in for `Precompiler.run`: outputs the host can use, costs in `model`."""

    def __init__(self, engine):
        self.engine = engine
        self.model = dict(prefill_s=0.0, decode_s=0.0, prefill_calls=0, decode_calls=0, decode_steps=0,
                          padded_prefill_tokens=0, needed_prefill_tokens=0, row_padding_tokens=0)

    def __call__(self, kind, rows, tokens, fn, args, statics):
        m = self.model
        if kind == "prefill":
            valid = np.asarray(args[5])
            m["prefill_calls"] += 1
            m["prefill_s"] += WEIGHTS_S + rows * tokens * PREFILL_FLOP_PER_TOKEN / FLOP_S
            m["padded_prefill_tokens"] += rows * tokens
            m["needed_prefill_tokens"] += int(valid.sum())
            m["row_padding_tokens"] += (rows - int((valid > 0).sum())) * tokens
            return np.full(rows, 29871, np.int32), self.engine.cache
        from lumos_jax.inference.steps import DecodeOut

        _, _, _, last, lengths, generated, active, capacity, ctl = args
        steps = statics["steps"]
        n = np.minimum(steps, np.maximum(capacity - lengths, 0))
        n = np.where(active, np.minimum(n, np.maximum(np.asarray(ctl.max_new) - generated, 0)), 0)
        toks = np.where(np.arange(steps)[None, :] < n[:, None], 29871, -1).astype(np.int32)
        run = int(n.max()) if n.size else 0
        for i in range(run):
            m["decode_s"] += WEIGHTS_S + float(((lengths + i) * (n > i)).sum()) * KV_BYTES_PER_TOKEN / KV_BW
        m["decode_calls"] += 1
        m["decode_steps"] += run
        still = active & (n == steps) & (generated + n < np.asarray(ctl.max_new))
        return DecodeOut(toks, last, lengths + n, generated + n, still, np.int32(run)), self.engine.cache


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--episodes_per_slot", type=int, default=2)
    p.add_argument("--steps_per_call", type=int, default=16)
    p.add_argument("--slots", type=int, default=512)
    p.add_argument("--blocks", type=int, default=10240, help="per engine (the H200 run's 40 GB pools: 5,120)")
    p.add_argument("--call_cost", type=int, default=179, help="prefill call cost in tokens (call_cost_tokens at 6.7B)")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    p.add_argument("--gsm8k", default=DEFAULT_GSM8K)
    p.add_argument("--out")
    args = p.parse_args(argv)

    from lumos_jax.agent.backends import EngineBackend
    from lumos_jax.agent.execution import Executor
    from lumos_jax.agent.generators import ChatModelGenerator
    from lumos_jax.agent.replay import GoldForcing
    from lumos_jax.agent.runner import EpisodeRunner
    from lumos_jax.agent.tools.registry import build_registry
    from lumos_jax.models import PRESETS
    from lumos_jax.tokenization import Tokenizer

    config = PRESETS["tiny"].replace(vocab_size=32001, param_dtype="float32", dtype="float32")
    tok = Tokenizer(args.tokenizer)
    engines, fakes = {}, {}
    for seed, m in enumerate(("plan", "ground")):
        e = random_engine(config, seed, num_slots=args.slots, max_len=4096, steps_per_call=args.steps_per_call,
                          max_prefill_tokens=16384, num_blocks=args.blocks)
        e.call_cost = args.call_cost            # the 7B's, not the tiny stand-in's
        fakes[m] = e.programs.run = FakeDevice(e)
        engines[m] = e
    n = args.concurrency * args.episodes_per_slot
    tasks, gold = gold_episodes(args.gsm8k, n)
    registry = build_registry("maths")
    gens = {m: GoldForcing(ChatModelGenerator(EngineBackend(e), tok, style="reference", max_new_tokens=512),
                           gold, token_counter(tok)) for m, e in engines.items()}
    runner = EpisodeRunner(gens, lambda i: (Executor(registry), None), episode_config(),
                           max_concurrent=args.concurrency)
    t = time.perf_counter()
    results = runner.run(tasks[:n])
    host_s = time.perf_counter() - t
    model = {m: f.model for m, f in fakes.items()}
    device_s = sum(v["prefill_s"] + v["decode_s"] for v in model.values())
    out = dict(concurrency=args.concurrency, episodes=len(results), failed=sum(not r.ok for r in results),
               passes=runner.stats.generate_calls, host_s=round(host_s, 1), modelled_device_s=round(device_s, 1),
               modelled_episodes_per_hour=round(3600 * len(results) / (host_s + device_s)),
               engines={m: {k: round(v, 2) if isinstance(v, float) else v for k, v in d.items()}
                        for m, d in model.items()})
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
