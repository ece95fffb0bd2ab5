"""Host side of a step: collated numpy batches -> fixed-shape model inputs on the mesh.

A collated batch (`videonsa_jax.data.collate`) becomes `ModelInputs` through the model's
`prepare_inputs` (M-RoPE positions, vision layout, scatter targets, patch rows padded to
`num_patches`), plus the loss mask. A training step stacks `grad_accum` such micro-batches on a
leading axis: `max_length` and `num_patches` are fixed by the config, and the parts that depend on
the video sizes (ViT attention groups, VideoNSA text rows) are padded to common, only-growing
sizes (`uniform_sizes`), so mixed video sizes neither break the stacking nor recompile each step.

Every process builds the whole global batch (same seed, same order) and places the pieces its
devices hold: batch-major arrays follow the `batch` / `length` rules, the ViT patch rows and their
layout are replicated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from videonsa_jax.model import videonsa, vision
from videonsa_jax.parallel.rules import Rules, batch_sharding

# Logical axes of the batch-major fields; every other array is replicated.
_BATCH_AXES = {
    "input_ids": ("batch", "length"),
    "attention_mask": ("batch", "length"),
    "loss_mask": ("batch", "length"),
    "positions": (None, "batch", "length"),
    "rope_deltas": ("batch",),
    "text_rows": ("batch", None),
}


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
    micro_batches: Sequence[dict[str, Any]], floor: Mapping[str, int] | None = None
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Pads the variable-size parts of `model_batch` outputs to common sizes.

    Videos of different sizes give different numbers of ViT attention groups, slice lengths and
    VideoNSA text rows. These parts are padded (with invalid entries) to the largest over the
    batches and `floor`, rounded up to `SIZE_BUCKETS`. Pass the returned sizes as the next call's
    `floor`: the sizes then only grow, so a jitted step recompiles a few times early on instead
    of for every new video shape.

    Returns:
        (the padded batches, the sizes used).
    """
    floor = dict(floor or {})
    sizes = {}
    for name, multiple in SIZE_BUCKETS.items():
        most = max([floor.get(name, 0)] + [batch_sizes(m)[name] for m in micro_batches])
        sizes[name] = -(-most // multiple) * multiple
    length = micro_batches[0]["inputs"].input_ids.shape[1]
    sizes["num_text_rows"] = min(sizes["num_text_rows"], length)
    return [_pad(m, sizes) for m in micro_batches], sizes


def stack(
    micro_batches: Sequence[dict[str, Any]], floor: Mapping[str, int] | None = None
) -> tuple[dict[str, Any], dict[str, int]]:
    """Stacks micro-batches (`model_batch` outputs) on a new leading axis, after
    `uniform_sizes(micro_batches, floor)`; every other array must have the same shape in all
    micro-batches (fixed `data.max_length` and `data.num_patches`).

    Returns:
        (the stacked batch, the sizes used: the next step's `floor`).
    """
    micro_batches, sizes = uniform_sizes(micro_batches, floor)
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


def shardings(tree: Any, mesh: jax.sharding.Mesh, rules: Rules, leading: int = 0) -> Any:
    """NamedShardings of a model batch; `leading` extra unsplit axes (e.g. the micro-batch axis)."""

    def leaf(path, x):
        name = next(
            (k.name if hasattr(k, "name") else k.key for k in reversed(path) if _is_named(k)), ""
        )
        axes = _BATCH_AXES.get(name, (None,) * (np.ndim(x) - leading))
        return batch_sharding(mesh, rules, (None,) * leading + axes, np.shape(x))

    return jax.tree_util.tree_map_with_path(leaf, tree)


def _is_named(key) -> bool:
    return isinstance(key, jax.tree_util.GetAttrKey | jax.tree_util.DictKey)


def device_put(tree: Any, tree_shardings: Any) -> Any:
    """Global arrays from the (identical on every process) host arrays."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
        tree,
        tree_shardings,
    )
