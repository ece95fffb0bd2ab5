"""Device mesh, logical-axis sharding rules and multi-host setup."""

from videonsa_jax.parallel.mesh import MESH_AXES, create_mesh, maybe_initialize_distributed
from videonsa_jax.parallel.rules import (
    batch_sharding,
    logical_to_spec,
    state_shardings,
)

__all__ = [
    "MESH_AXES",
    "batch_sharding",
    "create_mesh",
    "logical_to_spec",
    "maybe_initialize_distributed",
    "state_shardings",
]
