"""Imported by lumos_jax.config before gin parsing: every evaluation configurable."""

from lumos_jax.evaluation import experiment  # noqa: F401  eval_experiment, eval_data_dir, scripted_agent
from lumos_jax.evaluation import lumos_adapter  # noqa: F401  lumos_agent
