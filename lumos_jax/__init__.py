"""lumos-jax: Agent Lumos (planning, grounding, execution) in JAX / Flax NNX."""

__version__ = "0.1.0"
