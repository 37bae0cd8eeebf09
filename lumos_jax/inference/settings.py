"""gin-configurable engine and sampling settings shared by `generate` and `serve`."""

from __future__ import annotations

from typing import Sequence

import gin

from lumos_jax.inference.sampling import SamplingParams


@gin.configurable
def engine_settings(num_slots: int = 8, max_len: int = 2048, steps_per_call: int = 16,
                    max_prefill_tokens: int = 16384) -> dict:
    """Engine size: slots (concurrent sequences), cache length per slot, decode steps per
    device call, and the most tokens one prefill call may process."""
    return dict(num_slots=num_slots, max_len=max_len, steps_per_call=steps_per_call,
                max_prefill_tokens=max_prefill_tokens)


@gin.configurable
def sampling_settings(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
                      seed: int = 0) -> dict:
    """Default sampling (greedy). The reference agent stops at the first newline:
    bind `sampling_settings.stop_strings = ["\\n"]`."""
    return dict(temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=tuple(stop_ids),
                stop_strings=tuple(stop_strings), seed=seed)


def make_sampling(max_new_tokens: int, extra_stop_ids: Sequence[int] = (), **overrides) -> SamplingParams:
    s = sampling_settings()
    s.update({k: v for k, v in overrides.items() if v is not None})
    s["stop_ids"] = tuple(s["stop_ids"]) + tuple(i for i in extra_stop_ids if i not in s["stop_ids"])
    return SamplingParams(max_new_tokens=max_new_tokens, **s)
