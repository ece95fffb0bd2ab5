"""NSA (variant `videonsa`) on GPU with Pallas kernels: `nsa_gpu`.

Pipeline (q [B, Tq, HQ, D], k/v [B, Tk, H, D], any G = HQ / H):
    kc, vc   = mean_pool(k), mean_pool(v)                          XLA
    o_cmp    = compression attention + lse                         gpu_flash ("cmp")
    idx      = top-S blocks from (q, kc, lse), no gradient         gpu_topk
    o_slc    = selection attention over idx                        gpu_selection
    o_swa    = sliding-window attention                            gpu_flash ("swa")
    o        = g_cmp*o_cmp + g_slc*o_slc + g_swa*o_swa              XLA (autodiff gives gate grads)
Each attention branch is a `jax.custom_vjp` whose backward runs the matching Pallas kernels; the
pooling and the gated sum are differentiated by JAX. On CPU pass interpret=True. The two flash
forwards run `gpu_mosaic` (Mosaic-GPU lowering) when it is available (Hopper) and the query offset
is static; every other kernel, and those forwards otherwise, are Triton-lowered.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.nsa import gpu_flash, gpu_mosaic, gpu_selection
from pallas_kernels.nsa.gpu_topk import select_blocks
from pallas_kernels.nsa.reference import combine, default_scale, mean_pool

Array = jax.Array


class BranchConfig(NamedTuple):
    """Static settings of one attention branch (hashable: a custom_vjp nondiff argument)."""

    mode: str
    scale: float
    block_size: int
    window: int
    interpret: bool
    static_offset: int | None  # the query offset when known at trace time


def flash_forward(
    q: Array, k: Array, v: Array, off: Array, cfg: BranchConfig
) -> tuple[Array, Array]:
    """Forward of a flash-shaped branch (cfg.mode "cmp" or "swa") -> (o, lse): Mosaic-GPU
    when available here, else Triton (or its interpret mode)."""
    if cfg.static_offset is not None and gpu_mosaic.available(q, cfg.interpret):
        return gpu_mosaic.flash_fwd(
            q,
            k,
            v,
            mode=cfg.mode,
            scale=cfg.scale,
            block_size=cfg.block_size,
            window=cfg.window,
            q_offset=cfg.static_offset,
        )
    return gpu_flash.flash_fwd(
        q,
        k,
        v,
        off,
        mode=cfg.mode,
        scale=cfg.scale,
        block_size=cfg.block_size,
        window=cfg.window,
        interpret=cfg.interpret,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q: Array, k: Array, v: Array, off: Array, cfg: BranchConfig) -> tuple[Array, Array]:
    return flash_forward(q, k, v, off, cfg)


def _flash_fwd(q, k, v, off, cfg):
    o, lse = _flash(q, k, v, off, cfg)
    return (o, lse), (q, k, v, off, o, lse)


def _flash_bwd(cfg, res, cts):
    q, k, v, off, o, lse = res
    dq, dk, dv = gpu_flash.flash_bwd(
        q,
        k,
        v,
        o,
        lse,
        cts[0],
        off,
        mode=cfg.mode,
        scale=cfg.scale,
        block_size=cfg.block_size,
        window=cfg.window,
        interpret=cfg.interpret,
    )
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _selection(q: Array, k: Array, v: Array, idx: Array, off: Array, cfg: BranchConfig) -> Array:
    return gpu_selection.selection_fwd(
        q, k, v, idx, off, scale=cfg.scale, block_size=cfg.block_size, interpret=cfg.interpret
    )[0]


def _selection_fwd(q, k, v, idx, off, cfg):
    o, lse, index = gpu_selection.selection_fwd(
        q, k, v, idx, off, scale=cfg.scale, block_size=cfg.block_size, interpret=cfg.interpret
    )
    return o, (q, k, v, idx, index, off, o, lse)


def _selection_bwd(cfg, res, do):
    q, k, v, idx, index, off, o, lse = res
    dq, dk, dv = gpu_selection.selection_bwd(
        q,
        k,
        v,
        idx,
        index,
        o,
        lse,
        do,
        off,
        scale=cfg.scale,
        block_size=cfg.block_size,
        interpret=cfg.interpret,
    )
    return dq, dk, dv, None, None


_selection.defvjp(_selection_fwd, _selection_bwd)


def nsa_branches(
    q: Array,
    k: Array,
    v: Array,
    *,
    block_size: int,
    block_count: int,
    window_size: int,
    scale: float | None = None,
    q_offset: int | Array = 0,
    interpret: bool = False,
) -> tuple[Array, Array, Array, Array]:
    """The three branch outputs [B, Tq, HQ, D] and the block indices [B, Tq, H, S]."""
    scale = default_scale(q.shape[-1], scale)
    off = jnp.asarray(q_offset, jnp.int32).reshape(1)
    static_offset = q_offset if isinstance(q_offset, int) else None
    cfg = BranchConfig("cmp", scale, block_size, window_size, interpret, static_offset)
    kc, vc = mean_pool(k, block_size), mean_pool(v, block_size)
    o_cmp, lse = _flash(q, kc, vc, off, cfg)
    sg = jax.lax.stop_gradient
    idx = select_blocks(
        sg(q),
        sg(kc),
        sg(lse),
        off,
        block_size=block_size,
        block_count=block_count,
        scale=scale,
        interpret=interpret,
        static_offset=static_offset,
    )
    o_slc = _selection(q, k, v, idx, off, cfg)
    o_swa, _ = _flash(q, k, v, off, cfg._replace(mode="swa"))
    return o_cmp, o_slc, o_swa, idx


def nsa_gpu(
    q: Array,
    k: Array,
    v: Array,
    g_cmp: Array,
    g_slc: Array,
    g_swa: Array,
    *,
    block_size: int,
    block_count: int,
    window_size: int,
    scale: float | None = None,
    q_offset: int | Array = 0,
    return_block_indices: bool = False,
    interpret: bool = False,
) -> Array | tuple[Array, Array]:
    """Native Sparse Attention (`videonsa`), same contract as `reference.nsa_reference`.

    Args:
        q: [B, Tq, HQ, D]; k, v: [B, Tk, H, D]; gates [B, Tq, HQ] in (0, 1).
        block_size, block_count, window_size, scale, q_offset: as in `nsa_reference`
            (q_offset may be a traced int32 scalar).
        return_block_indices: also return the int32 [B, Tq, H, S] selection.
        interpret: run the kernels in Pallas interpret mode (CPU).

    Returns:
        o [B, Tq, HQ, D] in q.dtype (and the block indices if requested).

    Raises:
        ValueError: compiled (not interpret) with block_size or head dim below 16 or not a power
            of two (Triton tile rules).
    """
    d = q.shape[-1]
    if not interpret and any(x < 16 or x & (x - 1) for x in (block_size, d)):
        raise ValueError(
            f"nsa_gpu needs power-of-two block_size and head dim >= 16; got {block_size}, {d}"
        )
    o_cmp, o_slc, o_swa, idx = nsa_branches(
        q,
        k,
        v,
        block_size=block_size,
        block_count=block_count,
        window_size=window_size,
        scale=scale,
        q_offset=q_offset,
        interpret=interpret,
    )
    o = combine(o_cmp, o_slc, o_swa, g_cmp, g_slc, g_swa)
    return (o, idx) if return_block_indices else o
