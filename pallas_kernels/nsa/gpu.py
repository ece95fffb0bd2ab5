"""NSA (variant `videonsa`) on GPU with Pallas kernels: `nsa_gpu`.

Pipeline (q [B, Tq, HQ, D], k/v [B, Tk, H, D], any G = HQ / H):
    kc, vc   = mean_pool(k), mean_pool(v)                          XLA
    o_cmp    = compression attention + lse                         gpu_flash ("cmp")
    idx      = top-S blocks from (q, kc, lse), no gradient         gpu_topk
    o_slc    = selection attention over idx                        gpu_selection
    o_swa    = sliding-window attention                            gpu_flash ("swa")
    o        = g_cmp*o_cmp + g_slc*o_slc + g_swa*o_swa              XLA
The whole pipeline is one `jax.custom_vjp`: its backward computes the gate gradients and the three
deltas in one pass over do and the branch outputs, then runs each branch's backward kernels on do
itself with the branch's gate and delta (no per-branch cotangent gate * do is written), and sums
the branches' dq, dk, dv (the pooling's transpose adds the compression dk, dv). On CPU pass
interpret=True. The two flash forwards run `gpu_mosaic` (Mosaic-GPU lowering) when it is
available (Hopper) and the query offset is static; every other kernel, and those forwards
otherwise, are Triton-lowered.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.nsa import gpu_flash, gpu_mosaic, gpu_selection
from pallas_kernels.nsa.gpu_common import out_dot
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


class Residuals(NamedTuple):
    """What the backward of `_nsa` keeps from its forward (the branch outputs for the gates'
    gradients and the deltas)."""

    q: Array
    k: Array
    v: Array
    gates: tuple[Array, Array, Array]
    off: Array
    kc: Array
    vc: Array
    idx: Array
    index: gpu_selection.ChunkIndex
    outs: tuple[Array, Array, Array]  # o_cmp, o_slc, o_swa
    lses: tuple[Array, Array, Array]


def _forward(q, k, v, gates, off, cfg: BranchConfig, block_count: int):
    """The branches and their gated sum -> (o, idx, Residuals)."""
    kc, vc = mean_pool(k, cfg.block_size), mean_pool(v, cfg.block_size)
    o_cmp, lse_cmp = flash_forward(q, kc, vc, off, cfg)
    idx = select_blocks(
        q,
        kc,
        lse_cmp,
        off,
        block_size=cfg.block_size,
        block_count=block_count,
        scale=cfg.scale,
        interpret=cfg.interpret,
        static_offset=cfg.static_offset,
    )
    o_slc, lse_slc, index = gpu_selection.selection_fwd(
        q, k, v, idx, off, scale=cfg.scale, block_size=cfg.block_size, interpret=cfg.interpret
    )
    o_swa, lse_swa = flash_forward(q, k, v, off, cfg._replace(mode="swa"))
    outs, lses = (o_cmp, o_slc, o_swa), (lse_cmp, lse_slc, lse_swa)
    o = combine(*outs, *gates)
    return o, idx, Residuals(q, k, v, gates, off, kc, vc, idx, index, outs, lses)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _nsa(q, k, v, g_cmp, g_slc, g_swa, off, cfg: BranchConfig, block_count: int):
    """(o [B, Tq, HQ, D], idx [B, Tq, H, S]); the backward runs the Pallas kernels."""
    o, idx, _ = _forward(q, k, v, (g_cmp, g_slc, g_swa), off, cfg, block_count)
    return o, idx


def _nsa_fwd(q, k, v, g_cmp, g_slc, g_swa, off, cfg, block_count):
    o, idx, res = _forward(q, k, v, (g_cmp, g_slc, g_swa), off, cfg, block_count)
    return (o, idx), res


def _nsa_bwd(cfg: BranchConfig, block_count: int, res: Residuals, cts):
    """Each branch's backward takes the gated sum's cotangent with its gate and delta (its own
    cotangent gate * do is never formed); one pass over do and the branch outputs gives the gate
    gradients and the deltas."""
    del block_count
    do = cts[0]
    q, k, v = res.q, res.k, res.v
    dots = [out_dot(o, do) for o in res.outs]  # the gates' gradients
    gates = [g.astype(jnp.float32) for g in res.gates]
    deltas = [g * x for g, x in zip(gates, dots, strict=True)]
    flash = dict(
        scale=cfg.scale, block_size=cfg.block_size, window=cfg.window, interpret=cfg.interpret
    )
    (lse_cmp, lse_slc, lse_swa), off = res.lses, res.off
    dq_c, dkc, dvc = gpu_flash.flash_bwd(
        q, res.kc, res.vc, lse_cmp, do, gates[0], deltas[0], off, mode="cmp", **flash
    )
    dq_s, dk_s, dv_s = gpu_selection.selection_bwd(
        q,
        k,
        v,
        res.idx,
        res.index,
        lse_slc,
        do,
        gates[1],
        deltas[1],
        off,
        scale=cfg.scale,
        block_size=cfg.block_size,
        interpret=cfg.interpret,
    )
    dq_w, dk_w, dv_w = gpu_flash.flash_bwd(
        q, k, v, lse_swa, do, gates[2], deltas[2], off, mode="swa", **flash
    )
    _, pool_vjp = jax.vjp(lambda x: mean_pool(x, cfg.block_size), k)

    def total(*xs: Array) -> Array:
        return sum(x.astype(jnp.float32) for x in xs).astype(xs[0].dtype)

    dq = total(dq_c, dq_s, dq_w)
    dk = total(pool_vjp(dkc)[0], dk_s, dk_w)
    dv = total(pool_vjp(dvc)[0], dv_s, dv_w)
    dg = [x.astype(g.dtype) for x, g in zip(dots, res.gates, strict=True)]
    return dq, dk, dv, *dg, None


_nsa.defvjp(_nsa_fwd, _nsa_bwd)


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
    scale = default_scale(d, scale)
    off = jnp.asarray(q_offset, jnp.int32).reshape(1)
    static_offset = q_offset if isinstance(q_offset, int) else None
    cfg = BranchConfig("cmp", scale, block_size, window_size, interpret, static_offset)
    o, idx = _nsa(q, k, v, g_cmp, g_slc, g_swa, off, cfg, block_count)
    return (o, idx) if return_block_indices else o
