"""Host side of a step: collated numpy batches -> fixed-shape model inputs on the mesh.

A collated batch (`videonsa_jax.data.collate`) becomes `ModelInputs` through the model's
`prepare_inputs` (M-RoPE positions, vision layout, scatter targets, patch rows padded to
`num_patches`), plus the loss mask. A training step stacks `grad_accum` such micro-batches on a
leading axis; every micro-batch must have the same shapes (fixed `max_length`, `num_patches`).

Every process builds the whole global batch (same seed, same order) and places the pieces its
devices hold: batch-major arrays follow the `batch` / `length` rules, the ViT patch rows and their
layout are replicated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

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


def stack(micro_batches: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stacks micro-batches (`model_batch` outputs) on a new leading axis.

    The VideoNSA text-row lists (padded with L) are padded to the longest one; every other array
    must have the same shape in all micro-batches.
    """
    widths = {
        m["inputs"].text_rows.shape[1] for m in micro_batches if m["inputs"].text_rows is not None
    }
    if len(widths) > 1:
        micro_batches = [_pad_text_rows(m, max(widths)) for m in micro_batches]
    shapes = [jax.tree.map(np.shape, m) for m in micro_batches]
    if any(s != shapes[0] for s in shapes[1:]):
        raise ValueError(
            "micro-batches of one step have different shapes; fix data.max_length (no length "
            f"buckets) and data.num_patches: {shapes}"
        )
    return jax.tree.map(lambda *xs: np.stack(xs), *micro_batches)


def _pad_text_rows(micro: dict[str, Any], width: int) -> dict[str, Any]:
    rows = micro["inputs"].text_rows
    length = micro["inputs"].input_ids.shape[1]
    rows = np.pad(rows, ((0, 0), (0, width - rows.shape[1])), constant_values=length)
    return {**micro, "inputs": micro["inputs"]._replace(text_rows=rows)}


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
