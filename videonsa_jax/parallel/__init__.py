"""Device mesh, logical-axis sharding rules and multi-host setup."""

from videonsa_jax.parallel.mesh import (
    MESH_AXES,
    BatchBlock,
    create_mesh,
    maybe_initialize_distributed,
    process_batch_block,
)
from videonsa_jax.parallel.rules import (
    batch_sharding,
    logical_to_spec,
    state_shardings,
)

__all__ = [
    "MESH_AXES",
    "BatchBlock",
    "batch_sharding",
    "create_mesh",
    "logical_to_spec",
    "maybe_initialize_distributed",
    "process_batch_block",
    "state_shardings",
]
