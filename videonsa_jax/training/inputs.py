"""Host side of a step: this process's rows of a collated batch -> global model inputs on the mesh.

A collated batch (`videonsa_jax.data.collate`) becomes `ModelInputs` through the model's
`prepare_inputs` (M-RoPE positions, vision layout, scatter targets, patch rows padded to a fixed
count), plus the loss mask. A training step stacks `grad_accum` such micro-batches on a leading
axis: `max_length` and `num_patches` are fixed by the config, and the parts that depend on the
video sizes (ViT attention groups, VideoNSA text rows) are padded to common, only-growing sizes
(`uniform_sizes`, the maximum over all processes), so mixed video sizes neither break the stacking
nor recompile each step.

Each process reads and preprocesses only the block of batch rows its devices hold (`Placement`,
`parallel.process_batch_block`), with its share of `num_patches`. `place` turns the block's index
fields into indices of the global batch (`globalize`) and assembles global arrays: batch-major
fields follow the `batch` / `length` rules; the ViT patch rows, their layout and the vision scatter
targets split their leading axis over the batch's mesh axes, so a process's devices hold exactly
its block. Processes that differ only along `context` / `tensor` read the same block.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from videonsa_jax.model import videonsa, vision
from videonsa_jax.parallel.mesh import BatchBlock, process_batch_block
from videonsa_jax.parallel.rules import Rules, batch_sharding, logical_to_spec

# Logical axes of the batch-major fields; every other array (ViT patch rows, their layout, vision
# scatter targets) splits its leading axis like the batch (see `shardings`).
_BATCH_AXES = {
    "input_ids": ("batch", "length"),
    "attention_mask": ("batch", "length"),
    "loss_mask": ("batch", "length"),
    "positions": (None, "batch", "length"),
    "rope_deltas": ("batch",),
    "text_rows": ("batch", None),
}


def batch_axes(mesh: jax.sharding.Mesh, rules: Rules, batch_size: int) -> tuple[str, ...]:
    """The mesh axes that split the rows of a batch of `batch_size` (the `batch` rule)."""
    axes = logical_to_spec(("batch",), rules, mesh, (batch_size,))[0]
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Which rows of a global batch of `batch_size` this process reads, and where they go.

    `block`: this process's rows (`of_process`: those its devices hold; `whole`: every process
    reads the whole batch).
    """

    mesh: jax.sharding.Mesh
    rules: Rules
    batch_size: int
    block: BatchBlock

    @classmethod
    def of_process(cls, mesh: jax.sharding.Mesh, rules: Rules, batch_size: int) -> Placement:
        axes = batch_axes(mesh, rules, batch_size)
        return cls(mesh, rules, batch_size, process_batch_block(mesh, axes, batch_size))

    @classmethod
    def whole(cls, mesh: jax.sharding.Mesh, rules: Rules, batch_size: int) -> Placement:
        return cls(mesh, rules, batch_size, BatchBlock(0, 1, batch_size))

    @property
    def shards(self) -> int:
        """Devices along the batch's mesh axes per block (they split its ViT rows and groups)."""
        axes = batch_axes(self.mesh, self.rules, self.batch_size)
        return math.prod(self.mesh.shape[a] for a in axes) // self.block.count

    def num_patches(self, num_patches: int, unit: int) -> int:
        """The block's patch rows for `num_patches` in the global batch: its share, rounded up
        to a multiple of `unit` (spatial_merge_size**2) x `shards`."""
        multiple = unit * self.shards
        share = -(-num_patches * self.block.rows // self.batch_size)
        return -(-share // multiple) * multiple


def model_batch(model, batch: Mapping[str, Any], num_patches: int) -> dict[str, Any]:
    """One collated batch -> {"inputs": ModelInputs, "loss_mask": [B, L] bool} (numpy)."""
    has = lambda key: key in batch and len(batch[key]) > 0
    inputs = model.prepare_inputs(
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"] if has("image_grid_thw") else None,
        batch["image_grid_thw"] if has("image_grid_thw") else None,
        batch["pixel_values_videos"] if has("video_grid_thw") else None,
        batch["video_grid_thw"] if has("video_grid_thw") else None,
        batch["second_per_grid_ts"] if has("video_grid_thw") else None,
        num_patches=num_patches,
    )
    return {"inputs": inputs, "loss_mask": np.asarray(batch["loss_mask"], bool)}


# Variable-size parts of a model batch and the multiple each is rounded up to.
SIZE_BUCKETS = {
    "num_windows": 8,
    "num_slices": 8,
    "slice_len": 64,
    "num_text_rows": videonsa.TEXT_ROWS_MULTIPLE,
}


def batch_sizes(micro: dict[str, Any]) -> dict[str, int]:
    """The variable sizes of one `model_batch` output (0 where the batch has no such part)."""
    inputs = micro["inputs"]
    layout = inputs.vision_layout
    sizes = dict.fromkeys(SIZE_BUCKETS, 0)
    if layout is not None:
        sizes["num_windows"] = layout.window_index.shape[0]
        sizes["num_slices"], sizes["slice_len"] = layout.full_index.shape
    if inputs.text_rows is not None:
        sizes["num_text_rows"] = inputs.text_rows.shape[1]
    return sizes


def uniform_sizes(
    micro_batches: Sequence[dict[str, Any]],
    floor: Mapping[str, int] | None = None,
    shards: int = 1,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Pads the variable-size parts of `model_batch` outputs to common sizes.

    Videos of different sizes give different numbers of ViT attention groups, slice lengths and
    VideoNSA text rows. These parts are padded (with invalid entries) to the largest over the
    batches, all processes and `floor`, rounded up to `SIZE_BUCKETS` (group counts also to a
    multiple of `shards`, see `Placement.shards`). Pass the returned sizes as the next call's
    `floor`: the sizes then only grow, so a jitted step recompiles a few times early on instead
    of for every new video shape. Every process must call it (a collective).

    Returns:
        (the padded batches, the sizes used).
    """
    floor = dict(floor or {})
    local = [batch_sizes(m) for m in micro_batches]
    most = [max([floor.get(name, 0)] + [b[name] for b in local]) for name in SIZE_BUCKETS]
    parts = [any(m["inputs"].vision_layout is not None for m in micro_batches)]
    parts.append(any(m["inputs"].text_rows is not None for m in micro_batches))
    table = multihost_utils.process_allgather(np.asarray([*parts, *most]))  # [processes, ...]
    if np.any(table[:, :2] != table[:1, :2]):
        raise ValueError(
            "the batch rows of some processes have images / videos (or VideoNSA text rows) and "
            "those of others do not; a step's batch must be all vision or all text"
        )
    sizes = {}
    for name, size in zip(SIZE_BUCKETS, table[:, 2:].max(0), strict=True):
        multiple = SIZE_BUCKETS[name]
        if name in ("num_windows", "num_slices"):
            multiple = math.lcm(multiple, shards)
        sizes[name] = -(-int(size) // multiple) * multiple
    length = micro_batches[0]["inputs"].input_ids.shape[1]
    sizes["num_text_rows"] = min(sizes["num_text_rows"], length)
    return [_pad(m, sizes) for m in micro_batches], sizes


def stack(
    micro_batches: Sequence[dict[str, Any]],
    floor: Mapping[str, int] | None = None,
    shards: int = 1,
) -> tuple[dict[str, Any], dict[str, int]]:
    """Stacks micro-batches (`model_batch` outputs) on a new leading axis, after
    `uniform_sizes(micro_batches, floor, shards)`; every other array must have the same shape in
    all micro-batches (fixed `data.max_length` and `data.num_patches`).

    Returns:
        (the stacked batch, the sizes used: the next step's `floor`).
    """
    micro_batches, sizes = uniform_sizes(micro_batches, floor, shards)
    shapes = [jax.tree.map(np.shape, m) for m in micro_batches]
    if any(s != shapes[0] for s in shapes[1:]):
        raise ValueError(
            "micro-batches of one step have different shapes; fix data.max_length (no length "
            f"buckets) and data.num_patches: {shapes}"
        )
    return jax.tree.map(lambda *xs: np.stack(xs), *micro_batches), sizes


def _pad(micro: dict[str, Any], sizes: Mapping[str, int]) -> dict[str, Any]:
    inputs = micro["inputs"]
    if inputs.vision_layout is not None:
        layout = vision.pad_layout(
            inputs.vision_layout,
            num_windows=sizes["num_windows"],
            num_slices=sizes["num_slices"],
            slice_len=sizes["slice_len"],
        )
        inputs = inputs._replace(vision_layout=layout)
    if inputs.text_rows is not None:
        rows, length = inputs.text_rows, inputs.input_ids.shape[1]
        width = sizes["num_text_rows"] - rows.shape[1]
        inputs = inputs._replace(
            text_rows=np.pad(rows, ((0, 0), (0, width)), constant_values=length)
        )
    return {**micro, "inputs": inputs}


def globalize(inputs: Any, block: BatchBlock) -> Any:
    """`ModelInputs` of a block of rows (`block.rows` x L tokens, N patch rows) with the index
    fields turned into indices of the global batch, whose ViT arrays are the blocks' concatenated.

    Offsets: `window_index` / `full_index` + index x N, `window_inverse` / `full_inverse` +
    index x (groups x group_len), `vision_targets` + index x rows x L (the block's padding value
    rows x L becomes the global B x L, dropped by the scatter). Works on stacked inputs too.
    """
    if inputs.pixel_rows is None:
        return inputs
    layout, targets = inputs.vision_layout, inputs.vision_targets
    tokens = block.rows * inputs.input_ids.shape[-1]
    n = inputs.pixel_rows.shape[-2]
    windows = math.prod(layout.window_index.shape[-2:])
    slices = math.prod(layout.full_index.shape[-2:])
    layout = layout.replace(
        window_index=layout.window_index + block.index * n,
        window_inverse=layout.window_inverse + block.index * windows,
        full_index=layout.full_index + block.index * n,
        full_inverse=layout.full_inverse + block.index * slices,
    )
    targets = np.where(targets < tokens, targets + block.index * tokens, block.count * tokens)
    return inputs._replace(vision_layout=layout, vision_targets=targets.astype(np.int32))


def place(tree: Any, placement: Placement, leading: int = 0) -> Any:
    """Global arrays on the mesh from this process's block of a model batch.

    `tree`: a `model_batch` output (or its `ModelInputs`) for `placement.block`'s rows, with
    `leading` extra axes (1 for `stack`ed micro-batches), padded by `uniform_sizes(...,
    placement.shards)` and built with `placement.num_patches(...)` patch rows. The global batch has
    `block.count` times the rows, patch rows and ViT groups.
    """
    if isinstance(tree, Mapping):
        tree = {**tree, "inputs": globalize(tree["inputs"], placement.block)}
    else:
        tree = globalize(tree, placement.block)

    def global_shape(path, x):
        name, shape = _name(path), list(np.shape(x))
        shape[leading + (_BATCH_AXES[name].index("batch") if name in _BATCH_AXES else 0)] *= (
            placement.block.count
        )
        return jax.ShapeDtypeStruct(tuple(shape), np.asarray(x).dtype)

    shapes = jax.tree_util.tree_map_with_path(global_shape, tree)
    return device_put(tree, shardings(shapes, placement.mesh, placement.rules, leading), shapes)


def shardings(tree: Any, mesh: jax.sharding.Mesh, rules: Rules, leading: int = 0) -> Any:
    """NamedShardings of a model batch (arrays or shapes); `leading` extra unsplit axes (e.g. the
    micro-batch axis).

    Batch-major fields follow their logical axes (`_BATCH_AXES`); every other array splits its
    leading axis over the mesh axes of the batch rows (`batch_axes`) when they divide it, and is
    replicated otherwise.
    """
    sizes = jax.tree_util.tree_map_with_path(
        lambda path, x: _batch_dim(_name(path), np.shape(x), leading), tree
    )
    axes = batch_axes(mesh, rules, next(b for b in jax.tree.leaves(sizes) if b))
    split = math.prod(mesh.shape[a] for a in axes)

    def leaf(path, x):
        name, shape = _name(path), np.shape(x)
        if name in _BATCH_AXES:
            return batch_sharding(mesh, rules, (None,) * leading + _BATCH_AXES[name], shape)
        first = axes if axes and shape[leading] % split == 0 else None
        return NamedSharding(mesh, PartitionSpec(*(None,) * leading, first))

    return jax.tree_util.tree_map_with_path(leaf, tree)


def _batch_dim(name: str, shape: tuple[int, ...], leading: int) -> int:
    """The batch size of a batch-major field; 0 for other fields."""
    if name not in _BATCH_AXES:
        return 0
    return shape[leading + _BATCH_AXES[name].index("batch")]


def _name(path) -> str:
    """The innermost field / key name on a pytree path."""
    named = (jax.tree_util.GetAttrKey, jax.tree_util.DictKey)
    key = next((k for k in reversed(path) if isinstance(k, named)), None)
    return "" if key is None else key.name if hasattr(key, "name") else key.key


def device_put(tree: Any, tree_shardings: Any, global_shapes: Any = None) -> Any:
    """Global arrays from this process's host arrays.

    `global_shapes`: a tree of `jax.ShapeDtypeStruct`; each dimension of a host array is either
    the whole global dimension or the part this process's devices hold. Default: the host arrays
    are the global arrays (identical on every process).
    """
    if global_shapes is None:
        global_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)

    def put(x, sharding, shape):
        return jax.make_array_from_process_local_data(sharding, np.asarray(x), shape.shape)

    return jax.tree.map(put, tree, tree_shardings, global_shapes)
