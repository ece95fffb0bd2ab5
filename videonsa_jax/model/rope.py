"""Rotary position embeddings: the decoder's multimodal RoPE (M-RoPE) and the ViT's 2D RoPE.

Host side (numpy, outside jit):
    `get_rope_index`: the 3D (temporal, height, width) decoder positions of a multimodal prompt.
    `vision_rotary_positions`: the (h, w) position of every ViT patch row.
Device side (jax):
    `mrope_cos_sin` + `apply_rotary`: decoder q/k rotation.
    `vision_cos_sin` + `apply_rotary`: ViT q/k rotation (in fp32).

Rotations use the rotate-half convention: dim d pairs with dim d + D/2 and both share frequency
index d mod D/2.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from videonsa_jax.config import ModelConfig

VISION_ROPE_THETA = 10000.0

_TEXT, _IMAGE, _VIDEO = 0, 1, 2


def inv_freq(dim: int, theta: float) -> np.ndarray:
    """Inverse frequencies 1 / theta^(2i/dim), i < dim/2, in fp32 as transformers computes them."""
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    # float64 pow rounded once to fp32 = a correctly rounded fp32 pow.
    base = (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)
    return np.float32(1.0) / base


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin, computed in the promoted dtype of the operands.

    Args:
        x: [..., L, H, D] (e.g. [B, L, H, D] for the decoder, [N, H, D] for the ViT).
        cos, sin: [..., L, D], broadcast over the heads axis.
    """
    cos = cos[..., None, :]
    sin = sin[..., None, :]
    return x * cos + rotate_half(x) * sin


# -- decoder M-RoPE ------------------------------------------------------------------------------


def mrope_cos_sin(
    position_ids: jax.Array,
    *,
    head_dim: int,
    theta: float,
    mrope_section: Sequence[int],
    dtype=jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """M-RoPE tables for the decoder.

    Frequency index f < head_dim/2 rotates with axis a(f): the first mrope_section[0] frequencies
    use the temporal position, the next mrope_section[1] the height, the rest the width. Angles and
    cos/sin are computed in fp32 and then cast to `dtype` (as transformers casts to the activation
    dtype).

    Args:
        position_ids: int [3, B, L] (temporal, height, width).

    Returns:
        cos, sin: [B, L, head_dim] in `dtype`.
    """
    if sum(mrope_section) != head_dim // 2:
        raise ValueError(f"mrope_section {tuple(mrope_section)} must sum to head_dim/2")
    axis_of_freq = np.repeat(np.arange(len(mrope_section)) % 3, mrope_section)  # [head_dim/2]
    pos = jnp.asarray(position_ids)[axis_of_freq].astype(jnp.float32)  # [head_dim/2, B, L]
    freqs = jnp.moveaxis(pos, 0, -1) * inv_freq(head_dim, theta)  # [B, L, head_dim/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def get_rope_index(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    image_grid_thw: np.ndarray | None,
    video_grid_thw: np.ndarray | None,
    second_per_grid_ts: np.ndarray | Sequence[float] | None,
    *,
    config: ModelConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """3D M-RoPE positions of a batch of prompts, as transformers 5.x `get_rope_index` computes.

    Each row is processed over its non-padded tokens. Runs of `<|image_pad|>` / `<|video_pad|>`
    tokens (ids from `config`) take the next image / video grid in order over the whole batch; a
    grid (t, h, w) covers t * (h/2) * (w/2) tokens. With `start` = the current text position:
      * text token k of a text run: (start + k) on all 3 axes; `start` advances by the run length;
      * vision token (ti, hi, wi), row-major: (start + T(ti), start + hi, start + wi), with
        T(ti) = ti for images and, for videos, T(ti) = int(fp32(ti) * fp32(tps * spg)) where
        tps = vision tokens_per_second and spg = second_per_grid_ts[video] (1 when not given);
        after the grid `start` advances by max(h/2, w/2).
    With `config.rope_time_rule == "int"` (transformers 4.x, the released VideoNSA) instead:
    T(ti) = ti * int(spg) * tps (spg truncated to an int first: 0.5 -> 0, 1.5 -> 1) and after a
    grid `start` = (largest position of the grid on any axis) + 1.

    Without image and video grids the positions are text positions: cumsum(mask) - 1.
    Padded entries (attention_mask == 0) are 0 on all axes.

    Args:
        input_ids: int [B, L].
        attention_mask: [B, L], 1 = real token, 0 = padding; None = all real.
        image_grid_thw: int [n_images, 3] patch grids, in prompt order over the batch.
        video_grid_thw: int [n_videos, 3].
        second_per_grid_ts: [n_videos] seconds per temporal grid step.

    Returns:
        position_ids: int32 [3, B, L].
        rope_deltas: int32 [B], (largest position of the row) + 1 - (number of real tokens of the
            row): the k-th generated token (k = 0, 1, ...) of row b gets position
            n_real[b] + k + rope_deltas[b] on all 3 axes.
    """
    input_ids = np.asarray(input_ids)
    batch, length = input_ids.shape
    mask = (
        np.ones((batch, length), bool) if attention_mask is None else np.asarray(attention_mask) > 0
    )
    position_ids = np.zeros((3, batch, length), np.int32)
    if image_grid_thw is None and video_grid_thw is None:
        text_pos = np.cumsum(mask, axis=-1) - 1
        position_ids[:] = np.where(mask, text_pos, 0)
        return position_ids, np.zeros((batch,), np.int32)

    token_type = np.where(
        input_ids == config.image_token_id,
        _IMAGE,
        np.where(input_ids == config.video_token_id, _VIDEO, _TEXT),
    )
    grids = {
        _IMAGE: iter(np.asarray(image_grid_thw if image_grid_thw is not None else [])),
        _VIDEO: iter(np.asarray(video_grid_thw if video_grid_thw is not None else [])),
    }
    spgs = iter(
        np.ones((0,), np.float32)
        if second_per_grid_ts is None
        else np.asarray(second_per_grid_ts, np.float32).reshape(-1)
    )
    merge = config.vision.spatial_merge_size
    tps = config.vision.tokens_per_second
    deltas = np.zeros((batch,), np.int32)
    for b in range(batch):
        types = token_type[b][mask[b]]
        chunks, start = [], 0
        for kind, run_len in _runs(types):
            if kind == _TEXT:
                chunks.append(np.broadcast_to(start + np.arange(run_len), (3, run_len)))
                start += run_len
                continue
            grid = next(grids[kind], None)
            if grid is None:
                name = "image" if kind == _IMAGE else "video"
                raise ValueError(f"row {b}: more {name} token runs than {name}_grid_thw entries")
            t, h, w = (int(v) for v in grid)
            gh, gw = h // merge, w // merge
            if run_len != t * gh * gw:
                raise ValueError(
                    f"row {b}: a run of {run_len} vision tokens does not match the grid "
                    f"{(t, h, w)} ({t * gh * gw} tokens)"
                )
            spg = next(spgs, np.float32(1.0)) if kind == _VIDEO else None
            temporal = _temporal_index(t, spg, tps, config.rope_time_rule)
            grid_pos = np.stack(
                np.meshgrid(temporal, np.arange(gh), np.arange(gw), indexing="ij")
            ).reshape(3, -1)
            chunks.append(grid_pos + start)
            if config.rope_time_rule == "int":
                start += int(grid_pos.max()) + 1
            else:
                start += max(gh, gw)
        row = np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), np.int64)
        position_ids[:, b, mask[b]] = row
        deltas[b] = (int(row.max()) + 1 if row.size else 0) - row.shape[1]
    return position_ids, deltas


def _runs(types: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of equal values: [(value, run length)]."""
    if types.size == 0:
        return []
    starts = np.concatenate([[0], np.flatnonzero(np.diff(types)) + 1])
    lengths = np.diff(np.concatenate([starts, [types.size]]))
    return [(int(types[s]), int(n)) for s, n in zip(starts, lengths, strict=True)]


def _temporal_index(t: int, spg: np.float32 | None, tps: int, rule: str) -> np.ndarray:
    """Temporal M-RoPE index of each of the t temporal grid steps (see `get_rope_index`)."""
    steps = np.arange(t, dtype=np.int64)
    if spg is None:  # image
        return steps
    if rule == "int":
        return steps * int(spg) * tps
    if rule != "float":
        raise ValueError(f"rope_time_rule must be 'float' or 'int', got {rule!r}")
    interval = np.float32(tps) * np.float32(spg)
    return (steps.astype(np.float32) * interval).astype(np.int64)


# -- vision 2D RoPE ------------------------------------------------------------------------------


def vision_rotary_positions(grid_thw: np.ndarray, spatial_merge_size: int) -> np.ndarray:
    """(h, w) patch coordinates of every ViT patch row, in the processor's row order.

    Rows of one item are ordered (t, h-block, w-block, h-in-block, w-in-block) with merge blocks
    of spatial_merge_size x spatial_merge_size patches.

    Args:
        grid_thw: int [n_items, 3] patch grids.

    Returns:
        int32 [sum(t * h * w), 2].
    """
    m = spatial_merge_size
    out = []
    for t, h, w in np.asarray(grid_thw, np.int64).reshape(-1, 3):
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        hw = np.stack([hpos, wpos], axis=-1).reshape(h // m, m, w // m, m, 2)
        hw = hw.transpose(0, 2, 1, 3, 4).reshape(-1, 2)
        out.append(np.tile(hw, (t, 1)))
    return np.concatenate(out, axis=0).astype(np.int32) if out else np.zeros((0, 2), np.int32)


def vision_cos_sin(
    positions: jax.Array, *, head_dim: int, theta: float = VISION_ROPE_THETA
) -> tuple[jax.Array, jax.Array]:
    """fp32 2D rotary tables of the ViT.

    Frequencies 1 / theta^(2i / (head_dim/2)), i < head_dim/4, are shared by both axes; the angle
    vector is [h * freqs, w * freqs] (head_dim/2) repeated twice, so dims [0, D/4) and
    [D/2, 3D/4) rotate with h, the others with w.

    Args:
        positions: int [N, 2] (h, w) per patch row.

    Returns:
        cos, sin: fp32 [N, head_dim].
    """
    if head_dim % 4:
        raise ValueError(f"2D rotary needs head_dim % 4 == 0, got {head_dim}")
    freqs = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq(head_dim // 2, theta)
    freqs = freqs.reshape(*freqs.shape[:-2], -1)  # [N, head_dim/2] = [h freqs | w freqs]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)
