"""Pallas kernels (GPU and TPU) for videonsa-jax, with their plain-JAX references."""
