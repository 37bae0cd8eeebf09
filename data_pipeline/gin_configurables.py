"""Imports every data_pipeline module with gin configurables (see lumos_jax.config)."""

import data_pipeline.loader  # noqa: F401  make_train_iterator, make_eval_iterator
