"""Top-S block selection (fla `naive_nsa_topk` rule) as two Pallas-Triton kernels, no sort.

importance[t, h, n] = sum over the G query heads of h of exp(s - lse) for blocks complete in the
past ((n+1)*BS - 1 <= t); blocks 0, cur-1, cur (cur = t // BS) are forced to G (the maximum);
blocks n > cur are invalid (-1). The sum ranks exactly like the reference's mean.

    score   grid (cdiv(Tq, 64), B*H): a tile of 64 tokens x 128 compressed blocks accumulates the
            G heads' probabilities (loop over heads inside the loop over block tiles; the [64, D]
            query tile of one head comes from L1/L2), then writes fp32 importance
            [B, H, Tq, NB] (only the causal part each tile can see: ~half of T*NB*4 bytes per H).
            On Hopper with a static query offset, `gpu_mosaic_score` computes the same values
            (its buffer padded to whole tiles).
    select  grid (cdiv(Tq, M), B*H), M = min(16, 2048 // W) rows: the rows [M, W] sit in
            registers, W = NBp (next pow2 of NB), or, when the query offset is static, the
            narrowest power of two >= 16 covering the blocks the tokens can see: one launch per
            token range of equal W (2/3 of the work of full rows at 128K). A bisection on the
            fp32 bit pattern finds the S-th largest value (a while loop of row counts, ~20
            rounds, stopping as soon as exactly S values lie above the cut); exact ties at the
            cut take the lowest block indices (a second bisection on the index, run only if a
            row has a tie), like lax.top_k. A cumsum over the chosen mask gives each block its
            slot: ascending block order with -1 padding, as `reference.select_blocks` does.
Memory: the importance buffer, B*H*Tq*NB*4 bytes (4.3 GB at 128K, 4 KV heads), freed after select.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.nsa import gpu_mosaic_score
from pallas_kernels.nsa.gpu_common import call, dot, next_pow2

Array = jax.Array

SCORE_TOKENS, SCORE_BLOCKS, SCORE_LAUNCH = 64, 128, (4, 2)  # tile, (num_warps, num_stages)
SELECT_ELEMS, SELECT_WARPS = 2048, 2  # importance values per select program, its warps


def _score_kernel(off_ref, q_ref, kc_ref, lse_ref, imp_ref, *, g, scale, bs):
    tile, bh = pl.program_id(0), pl.program_id(1)
    _, tq, _, d = q_ref.shape
    nb, h_kv = kc_ref.shape[1], kc_ref.shape[2]
    b, h = bh // h_kv, bh % h_kv
    off = off_ref[0]
    i = tile * SCORE_TOKENS + jnp.arange(SCORE_TOKENS, dtype=jnp.int32)
    valid = i < tq
    tok = jnp.where(valid, i, tq)
    t = (off + i)[:, None]
    cur = t // bs
    t_hi = off + jnp.minimum((tile + 1) * SCORE_TOKENS, tq) - 1
    n_hi = jnp.minimum(t_hi // bs + 1, nb)
    dd = jnp.arange(d, dtype=jnp.int32)[None, :]

    def tile_body(jt, carry):
        n0 = jt * SCORE_BLOCKS
        n = n0 + jnp.arange(SCORE_BLOCKS, dtype=jnp.int32)
        kc = plgpu.load(
            kc_ref.at[b, pl.ds(n0, SCORE_BLOCKS), h, :], mask=(n < nb)[:, None], other=0.0
        )
        n = n[None, :]
        visible = ((n + 1) * bs - 1 <= t) & valid[:, None]

        def head_body(gg, imp):
            head = h * g + gg
            q = plgpu.load(q_ref.at[b, tok[:, None], head, dd], mask=valid[:, None], other=0.0)
            lse = plgpu.load(lse_ref.at[b, tok, head], mask=valid, other=0.0)
            s = dot(q, kc, trans_b=True) * scale
            return imp + jnp.where(visible, jnp.exp(s - jnp.where(visible, lse[:, None], 0.0)), 0.0)

        imp = lax.fori_loop(0, g, head_body, jnp.zeros((SCORE_TOKENS, SCORE_BLOCKS), jnp.float32))
        forced = (n == 0) | (n == cur - 1) | (n == cur)
        imp = jnp.where(forced, float(g), imp)
        imp = jnp.where(n <= cur, imp, -1.0)
        plgpu.store(imp_ref.at[b, h, tok[:, None], n], imp, mask=valid[:, None] & (n < nb))
        return carry

    lax.fori_loop(0, (n_hi + SCORE_BLOCKS - 1) // SCORE_BLOCKS, tile_body, jnp.int32(0))


def _count(mask: Array) -> Array:
    return jnp.sum(mask.astype(jnp.int32), axis=1)


def _select_kernel(off_ref, imp_ref, idx_ref, *, rows, nbp, count, bs, i0):
    """Rows i0 .. i0 + L - 1 of the importance -> idx_ref [B, L, H, S]; nbp: the row width."""
    tile, bh = pl.program_id(0), pl.program_id(1)
    _, h_kv, tq, nb = imp_ref.shape
    _, n_rows, _, s_total = idx_ref.shape
    b, h = bh // h_kv, bh % h_kv
    off = off_ref[0]
    i = tile * rows + jnp.arange(rows, dtype=jnp.int32)
    valid = i < n_rows
    loc = jnp.where(valid, i, n_rows)
    tok = jnp.where(valid, i0 + i, tq)
    cur = ((off + i0 + i) // bs)[:, None]
    n = jnp.arange(nbp, dtype=jnp.int32)[None, :]
    imp = plgpu.load(
        imp_ref.at[b, h, tok[:, None], n], mask=valid[:, None] & (n <= cur) & (n < nb), other=-1.0
    )
    # Non-negative fp32 values order like their int32 bit patterns; invalid entries (-1) are < 0.
    bits = lax.bitcast_convert_type(imp, jnp.int32)

    # Bisection for the count-th largest value: cnt(bits >= lo) = c_lo >= count > cnt(bits >= hi).
    # A row stops once c_lo == count (its set is bits >= lo) or hi == lo + 1 (a tie at lo).
    # Rows with <= count valid entries start done with lo = 0 (all valid entries).
    def active(lo, hi, c_lo):
        return (c_lo > count) & (hi - lo > 1)

    def bisect(carry):
        lo, hi, c_lo = carry
        act = active(lo, hi, c_lo)
        mid = lo + (hi - lo) // 2
        c = _count(bits >= mid[:, None])
        up, down = act & (c >= count), act & (c < count)
        return jnp.where(up, mid, lo), jnp.where(down, mid, hi), jnp.where(up, c, c_lo)

    lo, hi, c_lo = lax.while_loop(
        lambda c: jnp.max(active(*c).astype(jnp.int32)) > 0,
        bisect,
        (jnp.zeros((rows,), jnp.int32), jnp.max(bits, axis=1) + 1, _count(bits >= 0)),
    )
    # Ties at lo: take the lowest indices (like lax.top_k): the smallest cut J with
    # cnt(tie & n < J) >= need, by bisection on J (runs only when some row has a tie).
    tie = c_lo > count
    base = bits >= jnp.where(tie, hi, lo)[:, None]
    need = count - _count(base)
    eq = tie[:, None] & (bits == lo[:, None])

    def cut(carry):
        j_lo, j_hi = carry
        act = tie & (j_hi - j_lo > 1)
        mid = j_lo + (j_hi - j_lo) // 2
        ok = _count(eq & (n < mid[:, None])) >= need
        return jnp.where(act & ~ok, mid, j_lo), jnp.where(act & ok, mid, j_hi)

    _, j_hi = lax.while_loop(
        lambda c: jnp.max((tie & (c[1] - c[0] > 1)).astype(jnp.int32)) > 0,
        cut,
        (jnp.zeros((rows,), jnp.int32), jnp.full((rows,), nbp, jnp.int32)),
    )
    chosen = base | (eq & (n < j_hi[:, None]))
    # Ascending block order: slot = number of chosen blocks before it; -1 fills the rest.
    # Indices that must not be written are pushed out of bounds (interpret-mode scatters drop them).
    chosen_i = chosen.astype(jnp.int32)
    rank = jnp.where(chosen, jnp.cumsum(chosen_i, axis=1) - chosen_i, s_total)
    plgpu.store(
        idx_ref.at[b, loc[:, None], h, rank],
        jnp.broadcast_to(n, (rows, nbp)),
        mask=valid[:, None] & chosen,
    )
    slot = jnp.arange(next_pow2(s_total), dtype=jnp.int32)[None, :]
    pad = valid[:, None] & (slot >= _count(chosen)[:, None]) & (slot < s_total)
    plgpu.store(
        idx_ref.at[b, loc[:, None], h, jnp.where(pad, slot, s_total)],
        jnp.full(pad.shape, -1, jnp.int32),
        mask=pad,
    )


def _row_widths(tq: int, nb: int, bs: int, off: int | None) -> list[tuple[int, int, int]]:
    """Token ranges [i0, i1) with the power-of-two row width W their visible blocks need.

    Token i sees blocks n <= (off + i) // bs, so width W covers every i < W*bs - off. Without a
    static offset: one range of width NBp.
    """
    nbp = next_pow2(nb)
    if off is None:
        return [(0, tq, nbp)]
    out, i0, w = [], 0, 16
    while i0 < tq:
        i1 = tq if w >= nbp else min(tq, max(i0, w * bs - off))
        if i1 > i0:
            out.append((i0, i1, min(w, nbp)))
        i0, w = i1, w * 2
    return out


def importance(
    q: Array,
    kc: Array,
    lse: Array,
    off: Array,
    *,
    scale: float,
    block_size: int,
    interpret: bool,
    static_offset: int | None = None,
) -> Array:
    """fp32 importance [B, H, Tq', NB'] (module docstring); Tq' >= Tq and NB' >= NB: the Mosaic
    kernel pads to whole tiles. Only n <= cur of each row is meant to be read."""
    if static_offset is not None and gpu_mosaic_score.available(q, kc, interpret):
        return gpu_mosaic_score.importance(
            q, kc, lse, scale=scale, block_size=block_size, q_offset=static_offset
        )
    bsz, tq, hq, _ = q.shape
    nb, h = kc.shape[1], kc.shape[2]
    return call(
        functools.partial(_score_kernel, g=hq // h, scale=scale, bs=block_size),
        (pl.cdiv(tq, SCORE_TOKENS), bsz * h),
        jax.ShapeDtypeStruct((bsz, h, tq, nb), jnp.float32),
        interpret,
        *SCORE_LAUNCH,
        off,
        q,
        kc,
        lse,
    )


def select_blocks(
    q: Array,
    kc: Array,
    lse: Array,
    off: Array,
    *,
    block_size: int,
    block_count: int,
    scale: float,
    interpret: bool,
    static_offset: int | None = None,
) -> Array:
    """int32 [B, Tq, H, S] selected blocks (ascending, -1 padded); no gradient.

    static_offset: the value of `off` when known at trace time (narrower select rows).
    """
    bsz, tq = q.shape[:2]
    nb, h = kc.shape[1], kc.shape[2]
    imp = importance(
        q,
        kc,
        lse,
        off,
        scale=scale,
        block_size=block_size,
        interpret=interpret,
        static_offset=static_offset,
    )
    parts = []
    for i0, i1, width in _row_widths(tq, nb, block_size, static_offset):
        rows = max(1, min(16, SELECT_ELEMS // width))
        kern = functools.partial(
            _select_kernel,
            rows=rows,
            nbp=width,
            count=min(block_count, nb),
            bs=block_size,
            i0=i0,
        )
        out = jax.ShapeDtypeStruct((bsz, i1 - i0, h, block_count), jnp.int32)
        parts.append(
            call(kern, (pl.cdiv(i1 - i0, rows), bsz * h), out, interpret, SELECT_WARPS, 1, off, imp)
        )
    return jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
