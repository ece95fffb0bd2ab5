"""Top-S block selection on TPU (Mosaic) from the compression scores, and the per-tile union lists.

Importance of block n for token t and KV head h is sum_g exp(q_{t,g}.kc_n * scale - lse_{t,g}) over
the G query heads of h (the reference's mean times G: same order), on blocks complete in the past;
blocks 0, cur-1, cur (cur = t // BS) are forced to G; blocks n > cur are invalid (-1).

Kernel `select_blocks`: grid (B, H, nqt), "parallel" everywhere. A step owns the M = TQ*G rows of
TQ tokens (same layout as `tpu_attention`). The whole compressed key head kc [NBp, D] sits in VMEM.
For each chunk of KC = min(128, NBp) compressed blocks up to the chunk of the tile's last current
block, it recomputes s = q kc^T [M, KC] (MXU), p = exp(s - lse), and sums the G rows of each token
with a 0/1 matmul Esum[TQ, M] @ p (fp32, HIGHEST precision) into an fp32 importance scratch
[NBp / KC, TQ, KC] (chunk index leading, so dynamic chunk loops index a leading dim).

Top-S without a sort or knock-out writes: round r picks, per token, the largest (importance,
-index) strictly below round r-1's pick. A round is one pass over the visible chunks keeping an
elementwise running (best value, lowest index) per lane column, then one lane reduction of a
[TQ, KC] tile; a lower block index wins ties, as in the reference. Slots whose pick is invalid are
-1. The output [TQ, S] is in pick order (importance descending); `tpu.py` sorts it only when the
caller asks for the indices.

VMEM at T = 128K (NB = 2048, D = 128, bf16, TQ = 32, G = 7): kc 512 KiB, importance 256 KiB, q and
lse tiles < 200 KiB: < 2 MiB on v5e / v5p / v6e.
Roofline at T = 128K, HQ = 28, H = 4: scoring recomputes the compression scores, 0.96 TFLOP
(causal), plus the Esum matmul (TQ / D = 1/4 of that): 6.1 / 2.6 / 1.3 ms on v5e / v5p / v6e.
The S = 32 rounds are VPU work: ~8 visible chunks on average x 4 vregs x ~7 ops + one [32, 128]
lane reduction per round, ~8K vreg ops per tile, 16K tiles -> ~1.3e8 vreg ops: roughly 30 ms on a
v5e core (at ~4 vector ops per cycle, ~1 GHz; not measured), comparable to the selection kernel at
128K; a radix (bit-threshold) select over the same chunks would need ~16 rounds instead of S.
Bytes: q 0.9 GB + lse + idx (64 MB): ~1.1 / 0.4 / 0.7 ms.

`union_lists` (plain XLA, sorts): for each query tile the ascending distinct blocks selected by
any of its tokens, [B, H, nqt, 1, U] int32 with the count in slot 0; U = 1 + min(TQ*S, NB).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.nsa.tpu_attention import row_tokens

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TopkPlan:
    """group G, q_tile TQ, key_tile KC, block_size BS, num_blocks NB, block_count S, scale."""

    group: int
    q_tile: int
    key_tile: int
    block_size: int
    num_blocks: int
    block_count: int
    scale: float

    @property
    def rows(self) -> int:
        return self.q_tile * self.group


def _token_blocks(plan: TopkPlan, t_first: Array) -> Array:
    """cur = t // BS per token of the tile, int32 [TQ, 1] (exact for t < 2**22)."""
    t = t_first + lax.broadcasted_iota(jnp.int32, (plan.q_tile, 1), 0)
    return jnp.floor((t.astype(jnp.float32) + 0.5) * (1.0 / plan.block_size)).astype(jnp.int32)


def _topk_kernel(plan: TopkPlan, off_ref, q_ref, kc_ref, lse_ref, idx_ref, imp_ref):
    tq, kc_rows = plan.q_tile, plan.key_tile
    nbp = imp_ref.shape[0] * kc_rows
    t_first = off_ref[0] + pl.program_id(2) * tq
    pos = t_first + row_tokens(plan.rows, plan.group)  # [M, 1]
    cur = _token_blocks(plan, t_first)  # [TQ, 1]
    r = lax.broadcasted_iota(jnp.int32, (tq, plan.rows), 1).astype(jnp.float32)
    row_tok = jnp.floor((r + 0.5) * (1.0 / plan.group)).astype(jnp.int32)
    esum = (lax.broadcasted_iota(jnp.int32, (tq, plan.rows), 0) == row_tok).astype(jnp.float32)
    q, lse = q_ref[...], lse_ref[...]
    cur_max = lax.div(t_first + tq - 1, plan.block_size)
    last_chunk = lax.div(jnp.minimum(cur_max, plan.num_blocks - 1), kc_rows)

    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    lane = lax.broadcasted_iota(jnp.int32, (1, kc_rows), 1)

    def score(j, carry):
        n = j * kc_rows + lane
        kc = kc_ref[pl.ds(pl.multiple_of(j * kc_rows, kc_rows), kc_rows), :]
        s = lax.dot_general(
            q,
            kc,
            (((1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32,
            precision=precision,
        )
        visible = (n + 1) * plan.block_size - 1 <= pos
        p = jnp.where(visible, jnp.exp(s * plan.scale - lse), 0.0)
        imp = lax.dot_general(
            esum,
            p,
            (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
            precision=lax.Precision.HIGHEST,
        )
        forced = (n == 0) | (n == cur - 1) | (n == cur)
        imp = jnp.where(forced, float(plan.group), imp)
        imp_ref[j] = jnp.where((n <= cur) & (n < plan.num_blocks), imp, -1.0)
        return carry

    lax.fori_loop(0, last_chunk + 1, score, 0)
    slots = lax.broadcasted_iota(jnp.int32, (tq, plan.block_count), 1)

    def pick(slot, carry):
        # The next pick is the largest (value, -index) strictly below the previous pick's.
        idx, prev_v, prev_n = carry

        def chunk_best(j, best):
            best_v, best_n = best
            v, n = imp_ref[j], j * kc_rows + lane
            v = jnp.where((v < prev_v) | ((v == prev_v) & (n > prev_n)), v, -3.0)
            better = v > best_v  # strict: an earlier chunk (lower index) keeps ties
            return jnp.where(better, v, best_v), jnp.where(better, n, best_n)

        init = (jnp.full((tq, kc_rows), -3.0, jnp.float32), jnp.full((tq, kc_rows), nbp))
        best_v, best_n = lax.fori_loop(0, last_chunk + 1, chunk_best, init)
        v = jnp.max(best_v, axis=1, keepdims=True)
        n = jnp.min(jnp.where(best_v == v, best_n, nbp), axis=1, keepdims=True)
        idx = jnp.where(slots == slot, jnp.where(v >= 0.0, n, -1), idx)
        return idx, v, n

    init = (
        jnp.full((tq, plan.block_count), -1, jnp.int32),
        jnp.full((tq, 1), jnp.inf, jnp.float32),
        jnp.full((tq, 1), -1, jnp.int32),
    )
    idx_ref[...] = lax.fori_loop(0, min(plan.block_count, plan.num_blocks), pick, init)[0]


def select_blocks(
    plan: TopkPlan,
    q_offset: Array,
    q: Array,
    kc: Array,
    lse: Array,
    *,
    interpret=False,
    vmem_limit_bytes: int | None = None,
) -> Array:
    """q [B, H, Tqp*G, D], kc [B, H, NBp, D], lse [B, H, Tqp*G, 1] -> idx [B, H, Tqp, S] int32."""
    b, h, rows, d = q.shape
    nbp = kc.shape[2]
    nqt = rows // plan.rows
    qmap = lambda b_, h_, i, off: (b_, h_, i, 0)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, h, nqt),
        in_specs=[
            pl.BlockSpec((None, None, plan.rows, d), qmap),
            pl.BlockSpec(
                (None, None, nbp, d),
                lambda b_, h_, i, off: (b_, h_, 0, 0),
                pipeline_mode=pl.Buffered(1),
            ),
            pl.BlockSpec((None, None, plan.rows, 1), qmap),
        ],
        out_specs=pl.BlockSpec((None, None, plan.q_tile, plan.block_count), qmap),
        scratch_shapes=[
            pltpu.VMEM((nbp // plan.key_tile, plan.q_tile, plan.key_tile), jnp.float32)
        ],
    )
    return pl.pallas_call(
        functools.partial(_topk_kernel, plan),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, h, rows // plan.group, plan.block_count), jnp.int32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel"),
            vmem_limit_bytes=vmem_limit_bytes,
        ),
        interpret=interpret,
        name="nsa_select_blocks",
    )(q_offset, q, kc, lse)


def union_lists(idx: Array, q_tile: int, num_blocks: int) -> Array:
    """idx [B, H, Tqp, S] (-1 empty) -> [B, H, nqt, 1, U]: count, then distinct blocks ascending."""
    b, h, tqp, s = idx.shape
    nqt = tqp // q_tile
    width = min(q_tile * s, num_blocks)
    big = jnp.int32(num_blocks)
    x = idx.reshape(b, h, nqt, q_tile * s)
    x = jnp.sort(jnp.where(x < 0, big, x), axis=-1)
    dup = jnp.concatenate([jnp.zeros_like(x[..., :1], bool), x[..., 1:] == x[..., :-1]], -1)
    x = jnp.sort(jnp.where(dup, big, x), axis=-1)[..., :width]
    count = jnp.sum(x < big, axis=-1, keepdims=True, dtype=jnp.int32)
    x = jnp.where(x < big, x, 0)
    return jnp.concatenate([count, x], axis=-1)[:, :, :, None, :]
