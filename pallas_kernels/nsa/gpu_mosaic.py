"""Forward of the flash-shaped NSA branches ("cmp", "swa") in Pallas Mosaic-GPU, for Hopper.

Same result as `gpu_flash.flash_fwd` (masks in gpu_flash's docstring) with a static query offset.
The Triton-lowered `gpu_flash` stays the path for traced offsets (decoding), other GPUs and the
CPU interpret mode; its backward consumes this forward's o and lse unchanged.

Kernel: one CTA holds 2 * BQ query rows of one query head. Two compute warpgroups take BQ rows
each; a third (memory) warpgroup streams [BK, D] K and V tiles of the head's KV head into STAGES
shared-memory slots with TMA. QK^T and PV run on wgmma with an fp32 online softmax in exp2 units.
Both compute warpgroups walk every key tile of the CTA's range (the union of their rows' ranges)
in order, so each slot is consumed twice per fill; tiles that all of a warpgroup's rows see whole
skip the mask. A schedule barrier alternates the two warpgroups between tensor-core work and the
softmax. Query tiles run last-first, so the long rows of "cmp" start early.

Requires: compute capability 9.x, bf16 or fp16, head dim 64 or 128.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.nsa.gpu_common import LN2, LOG2E, NEG
from pallas_kernels.nsa.gpu_flash import key_range, visible, whole_key_tiles

Array = jax.Array

BQ = 64  # query rows per compute warpgroup
BK = 128  # keys per step
STAGES = 2  # K/V shared-memory slots


def available(q: Array, interpret: bool) -> bool:
    """Whether these kernels can run q here: compiled on a Hopper GPU, bf16/fp16, D 64 or 128."""
    if interpret or q.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    if q.shape[-1] not in (64, 128):
        return False
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def flash_fwd(
    q: Array,
    k: Array,
    v: Array,
    *,
    mode: str,
    scale: float,
    block_size: int,
    window: int,
    q_offset: int,
) -> tuple[Array, Array]:
    """q [B, Tq, HQ, D], k/v [B, NK, H, D] -> (o [B, Tq, HQ, D] q.dtype, lse [B, Tq, HQ] fp32,
    natural log, -inf for a query that sees no key). Query i sits at position q_offset + i."""
    from jax.experimental.pallas import mosaic_gpu as plgpu  # GPU-only module

    bsz, tq, hq, d = q.shape
    nk, h = k.shape[1], k.shape[2]
    g = hq // h
    rows_cta = 2 * BQ
    n_tiles = -(-tq // rows_cta)
    q = jnp.pad(q, ((0, 0), (0, n_tiles * rows_cta - tq), (0, 0), (0, 0)))
    kv_pad = ((0, 0), (0, -(-nk // BK) * BK - nk), (0, 0), (0, 0))
    k, v = jnp.pad(k, kv_pad), jnp.pad(v, kv_pad)
    dtype, c, bs, w = q.dtype, scale * LOG2E, block_size, window

    def kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, scoped):
        (q_smem, k_smem, v_smem, lse_smem), (k_ready, v_ready, q_ready), (k_free, v_free), sched = (
            scoped
        )
        b, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        tile = n_tiles - 1 - lax.axis_index("q_seq")
        cta_lo = q_offset + tile * rows_cta
        lo, hi = key_range(mode, cta_lo, cta_lo + rows_cta - 1, nk, bs, w)
        first = lax.div(lo, BK)
        stop = jnp.maximum(lax.div(hi + BK - 1, BK), first)

        def schedule():
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            qo = q_smem.at[wg]
            row0 = tile * rows_cta + wg * BQ
            t_lo = q_offset + row0
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, BQ), head], qo, q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])
            a, z = whole_key_tiles(mode, t_lo, t_lo + BQ - 1, first, stop, nk, bs, w, BK)
            wgmma = plgpu.Layout.WGMMA
            t = plgpu.broadcasted_iota(jnp.int32, (BQ, BK), 0, layout=wgmma) + t_lo
            col = plgpu.broadcasted_iota(jnp.int32, (BQ, BK), 1, layout=wgmma)

            def step(s, carry, masked):
                acc, m, den = carry
                slot = lax.rem(s - first, STAGES)
                plgpu.barrier_wait(k_ready.at[slot])

                def qk(ref):
                    plgpu.wgmma(ref, qo, k_smem.at[slot].transpose((1, 0)))
                    schedule()
                    return ref[...]

                x = pl.run_scoped(qk, plgpu.ACC((BQ, BK), jnp.float32)) * c
                plgpu.barrier_arrive(k_free.at[slot])
                if masked:
                    mask = visible(mode, t, col + s * BK, nk, bs, w)
                    x = jnp.where(mask, x, NEG)
                m_new = jnp.maximum(m, x.max(axis=1))
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(x - lax.broadcast_in_dim(m_new, x.shape, [0]))
                if masked:
                    p = jnp.where(mask, p, 0.0)
                den = den * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p = p.astype(dtype)
                plgpu.barrier_arrive(sched)  # softmax done
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(sched)  # tensor cores free

                def pv(ref):
                    plgpu.wgmma(ref, p, v_smem.at[slot])

                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, den

            carry = (
                plgpu.layout_cast(jnp.zeros((BQ, d), jnp.float32), wgmma),
                plgpu.layout_cast(jnp.full((BQ,), NEG, jnp.float32), wgmma.reduce(1)),
                plgpu.layout_cast(jnp.zeros((BQ,), jnp.float32), wgmma.reduce(1)),
            )
            pl.when(wg == 1)(schedule)
            masked = lambda s, cr: step(s, cr, True)  # noqa: E731
            carry = lax.fori_loop(first, a, masked, carry)
            carry = lax.fori_loop(a, z, lambda s, cr: step(s, cr, False), carry)
            acc, m, den = lax.fori_loop(z, stop, masked, carry)
            pl.when(wg == 0)(schedule)

            nonempty = den > 0
            den = jnp.where(nonempty, den, 1.0)
            qo[...] = (acc / lax.broadcast_in_dim(den, acc.shape, [0])).astype(dtype)
            lse_smem.at[wg][...] = jnp.where(nonempty, m * LN2 + jnp.log(den), -jnp.inf)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo, o_ref.at[b, pl.ds(row0, BQ), head])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, head, pl.ds(row0, BQ)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(head, g)

            def fill(s, slot, wait: bool):
                rows = (b, pl.ds(s * BK, BK), kv_head)
                if wait:
                    plgpu.barrier_wait(k_free.at[slot])
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
                if wait:
                    plgpu.barrier_wait(v_free.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])

            for i in range(STAGES):
                pl.when(first + i < stop)(lambda i=i: fill(first + i, i, wait=False))

            @pl.loop(first + STAGES, stop)
            def _(s):
                fill(s, lax.rem(s - first, STAGES), wait=True)

    def entry(q_ref, k_ref, v_ref, o_ref, lse_ref):
        tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        pl.run_scoped(
            lambda *scoped: kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, scoped),
            (
                plgpu.SMEM((2, BQ, d), dtype, transforms=tiles),
                plgpu.SMEM((STAGES, BK, d), dtype, transforms=tiles),
                plgpu.SMEM((STAGES, BK, d), dtype, transforms=tiles),
                plgpu.SMEM((2, BQ), jnp.float32),
            ),
            (
                plgpu.Barrier(num_barriers=STAGES),
                plgpu.Barrier(num_barriers=STAGES),
                plgpu.Barrier(num_barriers=2),
            ),
            (plgpu.Barrier(num_arrivals=2, num_barriers=STAGES),) * 2,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    o, lse = plgpu.kernel(
        entry,
        out_type=(
            jax.ShapeDtypeStruct(q.shape, dtype),
            jax.ShapeDtypeStruct((bsz, hq, q.shape[1]), jnp.float32),
        ),
        grid=(hq, n_tiles, bsz),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q, k, v)
    return o[:, :tq], lse.transpose(0, 2, 1)[:, :tq]
