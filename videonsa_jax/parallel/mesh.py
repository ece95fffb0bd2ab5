"""One device mesh with the axes (`data`, `fsdp`, `context`, `tensor`), and multi-host start-up.

`data` replicates the model and splits the batch; `fsdp` splits the batch and the parameters;
`context` is reserved for sequence parallelism (activations split along the sequence); `tensor`
splits heads / MLP / vocab. Axes of size 1 cost nothing, so every run uses the same four names.
`process_batch_block` says which rows of a global batch this process's devices hold (each
process reads only those).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "context", "tensor")

# Set by a launcher that starts one process per host (or per GPU) without Slurm / MPI / Cloud TPU.
_COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
_NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
_PROCESS_ID_ENV = "JAX_PROCESS_ID"


def resolve_mesh_shape(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces the (at most one) -1 in `sizes` by what is left of `num_devices`."""
    sizes = [int(s) for s in sizes]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive with at most one -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh sizes {sizes} do not divide the {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices, "
            f"there are {num_devices}"
        )
    return tuple(sizes)


def create_mesh(
    sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """Builds the mesh from `{axis: size}` (-1 = the remaining devices) over all (global) devices.

    Axes are `Auto`: parameters and batches are placed by the rules, XLA propagates the rest.
    """
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
    devices = list(devices) if devices is not None else jax.devices()
    shape = resolve_mesh_shape([sizes.get(a, 1) for a in MESH_AXES], len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


class BatchBlock(NamedTuple):
    """Rows [index * rows, (index + 1) * rows) of a global batch of `count * rows` rows."""

    index: int
    count: int
    rows: int


def process_batch_block(
    mesh: jax.sharding.Mesh, batch_axes: Sequence[str], batch_size: int
) -> BatchBlock:
    """The block of a global batch that this process's devices hold.

    The batch axis (size `batch_size`) is split over the mesh axes `batch_axes`. The rows held by
    each process's devices must form one contiguous block, of the same size for every process;
    the blocks tile the batch. Processes that differ only along other axes (`context`, `tensor`)
    share a block. One process holds everything: `BatchBlock(0, 1, batch_size)`.
    """
    sharding = NamedSharding(mesh, PartitionSpec(tuple(batch_axes) or None))
    parts: dict[int, set[tuple[int, int]]] = {}
    for device, index in sharding.devices_indices_map((batch_size,)).items():
        start, stop, _ = index[0].indices(batch_size)
        parts.setdefault(device.process_index, set()).add((start, stop))
    spans = {}
    for process, ranges in parts.items():
        start, stop = min(a for a, _ in ranges), max(b for _, b in ranges)
        if sum(b - a for a, b in ranges) != stop - start:
            raise ValueError(
                f"process {process} holds batch rows {sorted(ranges)} of {batch_size}: not one "
                f"contiguous block; order the mesh axes {tuple(batch_axes)} so that each process's "
                "devices are adjacent along them"
            )
        spans[process] = (start, stop)
    rows = spans[jax.process_index()][1] - spans[jax.process_index()][0]
    if any(b - a != rows or a % rows for a, b in spans.values()):
        raise ValueError(f"processes hold unequal blocks of the batch of {batch_size}: {spans}")
    return BatchBlock(spans[jax.process_index()][0] // rows, batch_size // rows, rows)


def maybe_initialize_distributed() -> None:
    """Calls `jax.distributed.initialize()` when this process is one of several.

    Recognised launches: explicit `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`
    env vars, Slurm (`srun`, one task per GPU or host), Open MPI, and multi-host Cloud TPU slices
    (where JAX finds everything itself). A single process does nothing.
    """
    if _COORDINATOR_ENV in os.environ:
        kwargs = dict(
            coordinator_address=os.environ[_COORDINATOR_ENV],
            num_processes=int(os.environ[_NUM_PROCESSES_ENV]),
            process_id=int(os.environ[_PROCESS_ID_ENV]),
        )
    elif (
        int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    ):
        kwargs = {}
    else:
        return
    jax.distributed.initialize(**kwargs)
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
