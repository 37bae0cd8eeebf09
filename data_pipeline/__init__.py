"""Offline data commands: `lumos-jax data convert|build|inspect` (`data_pipeline.cli.main`) and
the LLM-teacher converter. They build on `lumos_jax.data` (records, converters, tfds builders,
loader); the dependency goes one way, data_pipeline -> lumos_jax.
"""
