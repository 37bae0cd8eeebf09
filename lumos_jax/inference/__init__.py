"""Fast inference: slot KV cache, jitted prefill / decode loop, sampling, serving."""

from lumos_jax.inference.engine import Engine
from lumos_jax.inference.paged_slots import NoFreeSlotError, TurnResult
from lumos_jax.inference.sampling import SamplingParams

__all__ = ["Engine", "NoFreeSlotError", "SamplingParams", "TurnResult"]
