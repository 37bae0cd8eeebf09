"""Lumos training data: annotation readers and converters, tfds builders, batching.

Entry points: `data_pipeline.loader.make_train_iterator` / `make_eval_iterator` (batches
for training), `data_pipeline.cli.main` (`lumos-jax data convert|build|inspect`).
"""
