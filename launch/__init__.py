"""Launchers: start `lumos-jax train` on a TPU VM slice, a SLURM GPU cluster, one
multi-GPU host, or N local CPU processes. Each is `python -m launch.<name> ... --dry_run`.

Every launcher starts one JAX process per host (or per GPU) and hands it the
multi-controller settings through the environment (see `launch.env`), so the
training code calls `jax.distributed.initialize()` the same way everywhere.
"""
