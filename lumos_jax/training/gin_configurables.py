"""Imports every training module that defines gin configurables (see lumos_jax.config)."""

from lumos_jax.training import data, distributed, loop, metrics, state  # noqa: F401
