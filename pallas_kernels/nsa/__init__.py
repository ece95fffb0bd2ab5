"""Native Sparse Attention: `nsa` dispatches to the plain-JAX reference or a Pallas kernel."""

from pallas_kernels.nsa.ops import nsa

__all__ = ["nsa"]
