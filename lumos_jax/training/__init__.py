"""Sharded training of Lumos modules: state, step, data adapter, checkpoints, metrics, loop.

Entry points: `lumos_jax.training.loop.train` (gin-configurable) and `lumos-jax train`.
"""
