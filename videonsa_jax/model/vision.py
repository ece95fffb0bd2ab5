"""Qwen2.5-VL vision tower: patch embed, 2D RoPE, windowed / full-attention blocks, 2x2 merger.

Attention never crosses an attention *group*; groups partition the patch rows of each item
(image or video) and never cross items:
    windowed blocks: one window = the patches of <= merge_window x merge_window merged tokens
        (112 x 112 pixels) of one temporal slice; edge windows are smaller;
    full blocks (`fullatt_block_indexes`): one temporal slice of one item.
This is the partition transformers builds with `get_window_index` / `cu_seqlens`. Attention is
permutation-equivariant and every other op is per row, so rows stay in the processor order and
attention runs batched over groups: gather [n_groups, group_len] rows, masked softmax, gather back.
No [N, N] mask is built. The group index arrays are computed on the host by
`prepare_vision_layout` and passed to the jitted model as a `VisionLayout`.

Parameters (our path <- HF key; HF keys are `visual.*` in Hub checkpoints, `model.visual.*` in
transformers 5.x memory; Linear kernels are torch weights transposed to [in, out]):
    patch_embed.kernel [1176, hidden]   <- patch_embed.proj.weight [hidden, 3, 2, 14, 14]
                                           .reshape(hidden, 1176).T
    blocks.{i}.norm1.weight             <- blocks.{i}.norm1.weight
    blocks.{i}.norm2.weight             <- blocks.{i}.norm2.weight
    blocks.{i}.attn.qkv.kernel / .bias  <- blocks.{i}.attn.qkv.weight.T / .bias
    blocks.{i}.attn.proj.kernel / .bias <- blocks.{i}.attn.proj.weight.T / .bias
    blocks.{i}.mlp.gate_proj.kernel / .bias  <- blocks.{i}.mlp.gate_proj.weight.T / .bias
    blocks.{i}.mlp.up_proj.kernel / .bias    <- blocks.{i}.mlp.up_proj.weight.T / .bias
    blocks.{i}.mlp.down_proj.kernel / .bias  <- blocks.{i}.mlp.down_proj.weight.T / .bias
    merger.ln_q.weight                  <- merger.ln_q.weight
    merger.mlp_0.kernel / .bias         <- merger.mlp.0.weight.T / .bias
    merger.mlp_2.kernel / .bias         <- merger.mlp.2.weight.T / .bias

Logical axes: `vision_embed` (ViT hidden), `vision_heads` (fused qkv output / proj input,
heads x head_dim), `vision_mlp` (block MLP width and merger MLP width), `vision_merged`
(4 x hidden merger input), `embed` (merger output = LLM hidden); the patch dim is unnamed.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from videonsa_jax.config import VisionConfig
from videonsa_jax.model import rope
from videonsa_jax.model.layers import REMAT_POLICIES, Linear, RMSNorm
from videonsa_jax.parallel import context


@flax.struct.dataclass
class VisionLayout:
    """Host-computed, fixed-shape index arrays describing a batch of ViT patch rows.

    Group arrays: `*_index[g, s]` is the patch row in slot s of group g (valid slots first,
    `*_valid` marks them); `*_inverse[r]` = g * group_len + s of row r (padded rows point at an
    arbitrary slot).

    rotary_pos: int32 [N, 2] (h, w) of every patch row (0 for padded rows).
    window_index, window_valid: int32 / bool [n_windows, window_len].
    window_inverse: int32 [N].
    full_index, full_valid: int32 / bool [n_slices, slice_len].
    full_inverse: int32 [N].
    """

    rotary_pos: jax.Array
    window_index: jax.Array
    window_valid: jax.Array
    window_inverse: jax.Array
    full_index: jax.Array
    full_valid: jax.Array
    full_inverse: jax.Array


def prepare_vision_layout(
    grid_thw: np.ndarray,
    config: VisionConfig,
    *,
    num_patches: int | None = None,
    num_windows: int | None = None,
    num_slices: int | None = None,
    slice_len: int | None = None,
) -> VisionLayout:
    """The `VisionLayout` of the items `grid_thw` (processor row order, items concatenated).

    The keyword sizes pad the arrays to fixed shapes so that jitted shapes stay static across
    batches; each defaults to the exact size and must be >= it. Padded patch rows (beyond the
    real ones) belong to no group: their outputs are garbage and must be ignored. `num_patches`
    must be a multiple of spatial_merge_size**2.

    Args:
        grid_thw: int [n_items, 3] (t, h, w) patch grids.
        config: the vision config.
        num_patches: patch rows N.
        num_windows: windowed-attention groups.
        num_slices: full-attention groups (temporal slices).
        slice_len: rows per full-attention group (default: largest h * w).
    """
    grid_thw = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    m, win = config.spatial_merge_size, config.merge_window
    unit = m * m
    if np.any(grid_thw[:, 1:] % m):
        raise ValueError(f"grid h and w must be multiples of {m}, got {grid_thw.tolist()}")
    n_real = int(np.sum(np.prod(grid_thw, axis=1)))
    num_patches = n_real if num_patches is None else num_patches
    if num_patches < n_real or num_patches % unit:
        raise ValueError(f"num_patches={num_patches} must be >= {n_real} and a multiple of {unit}")

    window_of_row, slice_of_row = [], []
    n_win = n_slice = 0
    for t, h, w in grid_thw:
        mh, mw = h // m, w // m
        nwh, nww = -(-mh // win), -(-mw // win)
        merged = np.arange(t * mh * mw)  # merged token index inside the item, (t, bh, bw) order
        ti, bh, bw = merged // (mh * mw), merged // mw % mh, merged % mw
        window = n_win + (ti * nwh + bh // win) * nww + bw // win
        window_of_row.append(np.repeat(window, unit))
        slice_of_row.append(n_slice + np.arange(t * h * w) // (h * w))
        n_win += t * nwh * nww
        n_slice += t
    window_of_row = _concat(window_of_row)
    slice_of_row = _concat(slice_of_row)
    max_slice = int(np.max(grid_thw[:, 1] * grid_thw[:, 2])) if len(grid_thw) else 0

    window_index, window_valid, window_inverse = _groups(
        window_of_row,
        _at_least(num_windows, n_win, "num_windows"),
        win * win * unit,
        num_patches,
    )
    full_index, full_valid, full_inverse = _groups(
        slice_of_row,
        _at_least(num_slices, n_slice, "num_slices"),
        _at_least(slice_len, max_slice, "slice_len"),
        num_patches,
    )
    rotary_pos = np.zeros((num_patches, 2), np.int32)
    rotary_pos[:n_real] = rope.vision_rotary_positions(grid_thw, m)
    return VisionLayout(
        rotary_pos=rotary_pos,
        window_index=window_index,
        window_valid=window_valid,
        window_inverse=window_inverse,
        full_index=full_index,
        full_valid=full_valid,
        full_inverse=full_inverse,
    )


def pad_layout(
    layout: VisionLayout, *, num_windows: int, num_slices: int, slice_len: int
) -> VisionLayout:
    """The same groups in larger arrays: extra window / slice groups and slice slots are invalid.

    Lets batches with different grids share one jitted shape (each size must be >= the layout's).
    """
    w, s, length = layout.window_index.shape[0], *layout.full_index.shape
    for name, value, have in (
        ("num_windows", num_windows, w),
        ("num_slices", num_slices, s),
        ("slice_len", slice_len, length),
    ):
        _at_least(value, have, name)
    pad = lambda x, groups, slots: np.pad(x, ((0, groups - x.shape[0]), (0, slots - x.shape[1])))
    inverse = np.asarray(layout.full_inverse)
    return layout.replace(
        window_index=pad(layout.window_index, num_windows, layout.window_index.shape[1]),
        window_valid=pad(layout.window_valid, num_windows, layout.window_valid.shape[1]),
        full_index=pad(layout.full_index, num_slices, slice_len),
        full_valid=pad(layout.full_valid, num_slices, slice_len),
        full_inverse=(inverse // length * slice_len + inverse % length).astype(np.int32),
    )


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0,), np.int64)


def _at_least(value: int | None, needed: int, name: str) -> int:
    if value is None:
        return needed
    if value < needed:
        raise ValueError(f"{name}={value} is smaller than the {needed} this batch needs")
    return value


def _groups(
    group_of_row: np.ndarray, num_groups: int, group_len: int, num_rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gather indices [num_groups, group_len], their valid mask and the inverse [num_rows]."""
    counts = np.bincount(group_of_row, minlength=num_groups)
    if counts.size and counts.max() > group_len:
        raise ValueError(f"a group has {counts.max()} rows, more than group_len={group_len}")
    order = np.argsort(group_of_row, kind="stable")
    group = group_of_row[order]
    slot = np.arange(order.size) - (np.cumsum(counts) - counts)[group]
    index = np.zeros((num_groups, group_len), np.int32)
    valid = np.zeros((num_groups, group_len), bool)
    index[group, slot] = order
    valid[group, slot] = True
    inverse = np.zeros((num_rows,), np.int32)
    inverse[order] = group * group_len + slot
    return index, valid, inverse


GROUP_LOGITS_BYTES = 2 * 2**30  # fp32 logits of one query chunk of group_attention, all groups


def _attend_groups(qg: jax.Array, kg: jax.Array, vg: jax.Array, valid: jax.Array) -> jax.Array:
    """qg [G, Sq, H, D] over kg, vg [G, S, H, D] with key mask valid [G, S] -> [G, Sq, H, D]."""
    logits = jnp.einsum("gqhd,gkhd->ghqk", qg, kg, preferred_element_type=jnp.float32)
    logits = logits * (1.0 / math.sqrt(qg.shape[-1]))
    # A finite fill keeps all-padding groups NaN-free; their rows are never read back.
    logits = jnp.where(valid[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(vg.dtype)
    return jnp.einsum("ghqk,gkhd->gqhd", probs, vg)


def group_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    index: jax.Array,
    valid: jax.Array,
    inverse: jax.Array,
) -> jax.Array:
    """Bidirectional attention inside each group (fp32 softmax, probabilities cast to v's dtype).

    Long groups (the full-attention blocks: 1,024 patches per slice at 448 x 448) run in query
    chunks whose fp32 logits over all groups stay within GROUP_LOGITS_BYTES, each rematerialised
    in the backward: at 128K tokens the logits of one block would otherwise be 32 GiB.

    Args:
        q, k, v: [N, H, D].
        index, valid: [G, S] group slots (see `VisionLayout`).
        inverse: [N] flat slot of every row.

    Returns:
        [N, H, D].
    """
    # [G, S, H, D]; groups are independent: split over the devices (sequence parallelism).
    qg, kg, vg = (context.shard_leading(x[index]) for x in (q, k, v))
    g, s, h, d = qg.shape
    chunk = max(8, GROUP_LOGITS_BYTES // (g * h * s * 4) // 8 * 8)
    if chunk >= s:
        out = _attend_groups(qg, kg, vg, valid)
    else:
        n = -(-s // chunk)
        qc = jnp.pad(qg, ((0, 0), (0, n * chunk - s), (0, 0), (0, 0))).reshape(g, n, chunk, h, d)
        step = jax.checkpoint(lambda qi: _attend_groups(qi, kg, vg, valid))
        out = jax.lax.map(step, jnp.moveaxis(qc, 1, 0))  # [n, G, chunk, H, D]
        out = jnp.moveaxis(out, 0, 1).reshape(g, n * chunk, h, d)[:, :s]
    return out.reshape(-1, h, d)[inverse]


class VisionAttention(nnx.Module):
    """Fused qkv (with bias), 2D rotary in fp32, grouped attention, output proj (with bias)."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads = config.num_heads
        hidden = config.hidden_size
        kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.qkv = Linear(hidden, 3 * hidden, axes=("vision_embed", "vision_heads"), **kw)
        self.proj = Linear(hidden, hidden, axes=("vision_heads", "vision_embed"), **kw)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        groups: tuple[jax.Array, jax.Array, jax.Array],
    ) -> jax.Array:
        n = x.shape[0]
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, -1)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        q = rope.apply_rotary(q.astype(jnp.float32), cos, sin).astype(v.dtype)
        k = rope.apply_rotary(k.astype(jnp.float32), cos, sin).astype(v.dtype)
        out = group_attention(q, k, v, *groups)
        return self.proj(out.reshape(n, -1))


class VisionMLP(nnx.Module):
    """SwiGLU with bias: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        hidden, inner = config.hidden_size, config.intermediate_size
        kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = Linear(hidden, inner, axes=("vision_embed", "vision_mlp"), **kw)
        self.up_proj = Linear(hidden, inner, axes=("vision_embed", "vision_mlp"), **kw)
        self.down_proj = Linear(inner, hidden, axes=("vision_mlp", "vision_embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nnx.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(eps=config.rms_norm_eps, axis_name="vision_embed", param_dtype=param_dtype)
        self.norm1 = RMSNorm(config.hidden_size, **norm)
        self.norm2 = RMSNorm(config.hidden_size, **norm)
        self.attn = VisionAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = VisionMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, groups) -> jax.Array:
        x = x + self.attn(self.norm1(x), cos, sin, groups)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm, concat each 2x2 merge group (4 consecutive rows), Linear, exact GELU, Linear."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        merged = config.hidden_size * config.spatial_merge_size**2
        kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.ln_q = RMSNorm(
            config.hidden_size,
            eps=config.rms_norm_eps,
            axis_name="vision_embed",
            param_dtype=param_dtype,
        )
        self.mlp_0 = Linear(merged, merged, axes=("vision_merged", "vision_mlp"), **kw)
        self.mlp_2 = Linear(merged, config.out_hidden_size, axes=("vision_mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.ln_q(x).reshape(-1, self.mlp_0.kernel.shape[0])
        return self.mlp_2(jax.nn.gelu(self.mlp_0(x), approximate=False))


class VisionTransformer(nnx.Module):
    """The Qwen2.5-VL ViT: patch rows [N, patch_dim] -> merged features [N / 4, out_hidden_size].

    Activations run in `dtype` (the patch rows are cast to it, as transformers casts
    `pixel_values` to the tower's dtype); rotary tables and q/k rotation are fp32.
    """

    def __init__(
        self,
        config: VisionConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
        self.config = config
        self.remat = remat
        self.patch_embed = Linear(
            config.patch_dim,
            config.hidden_size,
            use_bias=False,
            axes=(None, "vision_embed"),
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        self.blocks = nnx.List(
            [
                VisionBlock(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for _ in range(config.depth)
            ]
        )
        self.merger = PatchMerger(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, pixel_rows: jax.Array, layout: VisionLayout) -> jax.Array:
        """pixel_rows [N, patch_dim] in processor row order -> [N // 4, out_hidden_size].

        Output rows are merged tokens in the same order as the `<|image_pad|>` / `<|video_pad|>`
        tokens of the prompt.
        """
        x = context.shard_leading(self.patch_embed(pixel_rows))
        cos, sin = rope.vision_cos_sin(layout.rotary_pos, head_dim=self.config.head_dim)
        window = (layout.window_index, layout.window_valid, layout.window_inverse)
        full = (layout.full_index, layout.full_valid, layout.full_inverse)

        def run(block: VisionBlock, x: jax.Array, groups) -> jax.Array:
            return block(x, cos, sin, groups)

        if self.remat != "none":
            run = nnx.remat(run, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        for i, block in enumerate(self.blocks):
            x = run(block, x, full if i in self.config.fullatt_block_indexes else window)
        return self.merger(x)
