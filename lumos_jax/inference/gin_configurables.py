"""Every inference module with gin configurables (imported up front by lumos_jax.config)."""

from lumos_jax.inference import chat, settings  # noqa: F401
