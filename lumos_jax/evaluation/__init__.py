"""Evaluation: datasets, the paper's metrics, a resumable runner and reports (issue 7).

See docs/evaluation.md. Entry point: `lumos-jax eval --gin_file=experiments/eval/<name>.gin`.
"""
