"""Top-k block importance (the score half of `gpu_topk`) in Pallas Mosaic-GPU, for Hopper.

Same values as gpu_topk's Triton score kernel with a static query offset: importance[b, h, t, n]
= sum over the G query heads of h of exp(s - lse) for blocks complete in the past
((n+1)*BS - 1 <= t), G for the forced blocks 0, cur-1, cur (cur = t // BS), -1 for n > cur;
tiles past a token tile's last visible block are not written (the select never reads them).

Kernel: one CTA holds BT tokens of one KV head; the G heads' [BT, D] query tiles and their lse
stay in shared memory for the whole CTA. A memory warpgroup streams [BN, D] tiles of compressed
keys with TMA into STAGES slots, each tile in two halves; compute warpgroup w takes half w (BN/2
blocks). Per tile and head: wgmma QK^T, exp2 against the head's lse, accumulate in fp32
registers; the finished [BT, BN/2] tile goes to HBM by TMA from a shared-memory staging buffer.
A schedule barrier alternates the two warpgroups, one's exp under the other's wgmma (128K, 28/4
heads: 2.59 ms without it 3.54 ms; the Triton score kernel 4.49 ms).

Requires: compute capability 9.x, bf16 or fp16, D 64 or 128, and the G query tiles within shared
memory (G <= 7 at D = 128, G <= 18 at D = 64); `gpu_topk` keeps the Triton kernel otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.nsa import gpu_mosaic
from pallas_kernels.nsa.gpu_common import LOG2E

Array = jax.Array

BT = 64  # tokens per CTA (the wgmma M)
BN = 128  # compressed blocks per key tile; each compute warpgroup takes BN // 2
STAGES = 2  # key-tile slots
SMEM_BYTES = 220 * 1024  # shared memory this kernel may plan for (Hopper: 227 KiB per CTA)


def smem_bytes(g: int, d: int, itemsize: int) -> int:
    """Shared memory of one CTA: query tiles, key slots, output staging, lse."""
    return g * BT * d * itemsize + STAGES * BN * d * itemsize + 2 * BT * (BN // 2) * 4 + g * BT * 4


def available(q: Array, kc: Array, interpret: bool) -> bool:
    """Whether `importance` runs for these inputs here (Hopper, dtype, head dim, shared memory)."""
    g = q.shape[2] // kc.shape[2]
    return gpu_mosaic.available(q, interpret) and (
        smem_bytes(g, q.shape[-1], q.dtype.itemsize) <= SMEM_BYTES
    )


def importance(
    q: Array, kc: Array, lse: Array, *, scale: float, block_size: int, q_offset: int
) -> Array:
    """q [B, Tq, HQ, D], kc [B, NB, H, D], lse [B, Tq, HQ] fp32 (of the compression branch) ->
    importance fp32 [B, H, Tq', NB'] with Tq' = Tq rounded up to BT, NB' = NB rounded up to BN
    and at least STAGES * BN (rows >= Tq and columns >= NB are padding). Query i sits at
    position q_offset + i."""
    from jax.experimental.pallas import mosaic_gpu as plgpu  # GPU-only module

    bsz, tq, hq, d = q.shape
    nb, h = kc.shape[1], kc.shape[2]
    g, half, bs = hq // h, BN // 2, block_size
    n_tok = -(-tq // BT)
    q = jnp.pad(q, ((0, 0), (0, n_tok * BT - tq), (0, 0), (0, 0)))
    # At least STAGES tiles: the first fills are unrolled (their slices must be in bounds).
    kc = jnp.pad(kc, ((0, 0), (0, max(-(-nb // BN), STAGES) * BN - nb), (0, 0), (0, 0)))
    # [B, HQ, Tq'] so one TMA box holds a tile's G lse rows; padded queries get +inf (p = 0).
    lse = jnp.pad(
        lse.transpose(0, 2, 1), ((0, 0), (0, 0), (0, n_tok * BT - tq)), constant_values=jnp.inf
    )
    c = scale * LOG2E

    def kernel(q_ref, kc_ref, lse_ref, imp_ref, scoped):
        (q_smem, kc_smem, lse_smem, out_smem), (q_ready, lse_ready, kc_ready), kc_free, sched = (
            scoped
        )
        b, kv_head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        t0 = (n_tok - 1 - lax.axis_index("tok")) * BT  # heavy (late) token tiles first
        t_hi = q_offset + jnp.minimum(t0 + BT, tq) - 1

        def schedule():
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        stop = lax.div(jnp.minimum(lax.div(t_hi, bs) + 1, nb) + BN - 1, BN)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            layout = plgpu.Layout.WGMMA
            t = plgpu.broadcasted_iota(jnp.int32, (BT, half), 0, layout=layout) + (q_offset + t0)
            col = plgpu.broadcasted_iota(jnp.int32, (BT, half), 1, layout=layout) + wg * half
            cur = lax.div(t, bs)
            for gg in range(g):
                plgpu.barrier_wait(q_ready.at[gg])
            plgpu.barrier_wait(lse_ready)
            lse2 = [
                plgpu.load(lse_smem.at[gg], (), layout=layout.reduce(1)) * LOG2E for gg in range(g)
            ]

            pl.when(wg == 1)(schedule)  # wg 1 starts half a step behind

            @pl.loop(0, stop)
            def _(jt):
                i = lax.rem(jt, STAGES) * 2 + wg
                plgpu.barrier_wait(kc_ready.at[i])
                keys = kc_smem.at[i].transpose((1, 0))
                imp = plgpu.layout_cast(jnp.zeros((BT, half), jnp.float32), layout)
                for gg in range(g):

                    def qk(ref, gg=gg):
                        plgpu.wgmma(ref, q_smem.at[gg], keys)
                        schedule()
                        return ref[...]

                    s = pl.run_scoped(qk, plgpu.ACC((BT, half), jnp.float32))
                    # Unmasked: hidden entries may be inf (never NaN: lse is finite, -inf for a
                    # token that sees no block, +inf for padding); the mask below drops them.
                    imp = imp + jnp.exp2(s * c - lax.broadcast_in_dim(lse2[gg], s.shape, [0]))
                plgpu.barrier_arrive(kc_free.at[i])
                n = col + jt * BN
                forced = (n == 0) | (n == cur - 1) | (n == cur)
                imp = jnp.where((n + 1) * bs - 1 <= t, imp, 0.0)
                imp = jnp.where(n <= cur, jnp.where(forced, float(g), imp), -1.0)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # staging read by the last store
                out_smem.at[wg][...] = imp
                plgpu.commit_smem()
                cols = pl.ds(jt * BN + wg * half, half)
                plgpu.copy_smem_to_gmem(
                    out_smem.at[wg], imp_ref.at[b, kv_head, pl.ds(t0, BT), cols]
                )

            pl.when(wg == 0)(schedule)
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            for gg in range(g):
                src = q_ref.at[b, pl.ds(t0, BT), kv_head * g + gg]
                plgpu.copy_gmem_to_smem(src, q_smem.at[gg], q_ready.at[gg])
            src = lse_ref.at[b, pl.ds(kv_head * g, g), pl.ds(t0, BT)]
            plgpu.copy_gmem_to_smem(src, lse_smem, lse_ready)

            def fill(jt, wait: bool):
                for w in range(2):
                    i = lax.rem(jt, STAGES) * 2 + w
                    if wait:
                        plgpu.barrier_wait(kc_free.at[i])
                    src = kc_ref.at[b, pl.ds(jt * BN + w * half, half), kv_head]
                    plgpu.copy_gmem_to_smem(src, kc_smem.at[i], kc_ready.at[i])

            for s in range(STAGES):
                pl.when(s < stop)(lambda s=s: fill(s, wait=False))

            @pl.loop(STAGES, stop)
            def _(jt):
                fill(jt, wait=True)

    def entry(q_ref, kc_ref, lse_ref, imp_ref):
        bf16_tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        f32_tiles = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
        pl.run_scoped(
            lambda *scoped: kernel(q_ref, kc_ref, lse_ref, imp_ref, scoped),
            (
                plgpu.SMEM((g, BT, d), q.dtype, transforms=bf16_tiles),
                plgpu.SMEM((STAGES * 2, half, d), q.dtype, transforms=bf16_tiles),
                plgpu.SMEM((g, BT), jnp.float32),
                plgpu.SMEM((2, BT, half), jnp.float32, transforms=f32_tiles),
            ),
            (
                plgpu.Barrier(num_barriers=g),
                plgpu.Barrier(),
                plgpu.Barrier(num_barriers=STAGES * 2),
            ),
            plgpu.Barrier(num_barriers=STAGES * 2),
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((bsz, h, n_tok * BT, kc.shape[1]), jnp.float32),
        grid=(h, n_tok, bsz),
        grid_names=("heads", "tok", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q, kc, lse)
