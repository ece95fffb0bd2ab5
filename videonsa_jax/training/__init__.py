"""Training: state, step, checkpoints, metrics and evaluation, driven by `videonsa_jax.train`."""
