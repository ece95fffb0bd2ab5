"""Selection attention (one softmax over the tokens of the S selected blocks) in Pallas-Triton.

Shapes: q, o, do, dq [B, Tq, HQ, D]; k, v [B, Tk, H, D]; idx int32 [B, Tq, H, S] (-1 = unused);
lse, delta [B, Tq, HQ] fp32. Query t = q_offset + i sees key j of a selected block iff j <= t.

    forward  KV-block-major, over query chunks of C tokens (`_chunk_size`: equal chunks whose
             partials fit PARTIAL_BYTES, 16384 at 128K, 28 heads, D=128, S=32, bf16), run one
             after another (scan: one chunk's buffers live at a time; unrolled, XLA keeps several
             chunks' partials live). Per chunk: the inverse index of its (token, slot) entries
             (below; kept for the backward), then grid (items, B*H): a program loads its
             [BS, D] K and V block once and streams the gathered packed rows [64, D] (64 // G
             tokens x G heads) of the entries that selected it, writing each (token, slot)'s own
             softmax: o normalised, in q.dtype [B, C, S, HQ, D], and its log-sum-exp (log2 units)
             fp32 [B, C, S, HQ]. A merge kernel combines the S partials per (token, head) with an
             online log-sum-exp (unused slots never read) and writes o and lse in place. K/V
             bytes per chunk ~ one read of the selected blocks instead of 1 MiB per (token, KV
             head): at 128K 45.7 ms vs 70.8 ms for the former per-(token, KV head) walk (bound
             by L2 bandwidth).
    backward KV-block-major over the forward's chunks and inverse indices (no second sort),
             one fused pass per chunk: grid (items, B*H), a program keeps its [BS, D] K
             and V block resident while the gathered packed rows [64, D] (q, do, lse, delta) of
             its entries stream through; p is recomputed from lse. It accumulates dK/dV for the
             block in fp32 registers and writes each (token, slot)'s dq = ds @ K (in q.dtype) to
             a partial [B, C, S, HQ, D]; a sum kernel adds the S partials per (token, head) into
             dq in place (unused slots never read). A block's only work item adds its dK/dV to
             the fp32 block accumulators in place (aliased); the items of a block cut into
             several (block 0, the blocks of early chunks) write partials that XLA scatter-adds.
             No atomics, no per-token walk over the S blocks (which read 1 MiB of K/V per
             (token, KV head)): at 128K 72.4 ms vs 100.6 ms for the walk + a separate dK/dV pass.
    inverse  per chunk, a CSR of (token, slot) entries per block (one flat CUB radix sort), cut
    index    into work items of <= ITEM entries: block 0 (forced for all tokens) and other popular
             blocks become several items.
Memory: partial o (fwd) C*S*HQ*(D*itemsize + 4) bytes per chunk (3.8 GB at 128K, bf16) or dq (bwd)
C*S*HQ*D*itemsize (3.8 GB at 128K); the CSRs, int32 4*B*H*Tq*S bytes (67 MB at 128K), kept from
the forward for the backward (x3 for one chunk during its sort); dk/dv fp32 block
accumulators 2 * 4*B*H*(NB+1)*BS*D bytes and per-chunk partials of the items of blocks cut into
several, 2 * 4*B*H*NM*BS*D bytes with NM <= 2*C*S / ITEM + 1.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.nsa.gpu_common import (
    LN2,
    LOG2E,
    NEG,
    call,
    dot,
    load_block,
    load_grad_rows,
    load_rows,
)

Array = jax.Array

ITEM = 1024  # CSR entries ((token, slot) pairs) per work item
FWD_ROWS = 64  # packed query rows per step of the KV-block-major forward
FWD_LAUNCH = (4, 3)  # (num_warps, num_stages)
BWD_ROWS = 64  # packed query rows per step of the KV-block-major backward
BWD_LAUNCH = (4, 1)
MERGE_ROWS, MERGE_LAUNCH = 128, (4, 3)  # (token, head) rows per merge / dq-sum program, launch
PARTIAL_BYTES = 4 * 2**30  # per-chunk budget of the per-(token, slot) partials (forward o + lse)


def step_rows(ent_ref, b, h, e0, e1, it, r, g, c0, tq, chunk, s_count):
    """Packed rows r [R] of step `it` of a work item (entries [e0, e1) of ent_ref[b, h]): row r is
    entry e0 + it * (R // G) + r // G, query head h * G + r % G. Returns (valid, chunk-local token
    (`chunk` when invalid: out of bounds), slot, token (`tq` when invalid)), each [R]."""
    per = r.shape[0] // g
    e = e0 + it * per + r // g
    valid = (r < per * g) & (e < e1)
    ent = plgpu.load(ent_ref.at[b, h, jnp.where(valid, e, 0)], mask=valid, other=0)
    valid = valid & (c0 + ent // s_count < tq)
    loc = jnp.where(valid, ent // s_count, chunk)
    return valid, loc, ent % s_count, jnp.where(valid, c0 + loc, tq)


def _bwd_chunk_kernel(
    off_ref,
    c0_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    dl_ref,
    ent_ref,
    blk_ref,
    start_ref,
    end_ref,
    single_ref,
    pslot_ref,
    _dk_in,
    _dv_in,
    dk_ref,
    dv_ref,
    dk_part_ref,
    dv_part_ref,
    dqp_ref,
    *,
    g,
    scale,
    bs,
):
    """dk_ref/dv_ref: the fp32 block accumulators [B, H, NB + 1, BS, D] (aliasing _dk_in/_dv_in);
    the only item of its block adds to them in place, the items of a block cut into several write
    dk_part/dv_part [B, H, NM, BS, D] at their pslot (summed by XLA)."""
    w, bh = pl.program_id(0), pl.program_id(1)
    _, tq, _, d = q_ref.shape
    tk, h_kv = k_ref.shape[1], k_ref.shape[2]
    _, chunk, s_count, _, _ = dqp_ref.shape
    b, h = bh // h_kv, bh % h_kv
    off, c0 = off_ref[0], c0_ref[0]
    n, e0, e1 = blk_ref[b, h, w], start_ref[b, h, w], end_ref[b, h, w]
    j0 = n * bs
    k = load_block(k_ref, b, j0, bs, h, tk)
    v = load_block(v_ref, b, j0, bs, h, tk)
    j = (j0 + jnp.arange(bs, dtype=jnp.int32))[None, :]
    per = BWD_ROWS // g
    r = jnp.arange(BWD_ROWS, dtype=jnp.int32)
    head = h * g + r % g
    dd = jnp.arange(d, dtype=jnp.int32)[None, :]
    c = scale * LOG2E

    def body(it, carry):
        dk, dv = carry
        valid, loc, slot, tok = step_rows(ent_ref, b, h, e0, e1, it, r, g, c0, tq, chunk, s_count)
        q, do, lse2, delta = load_grad_rows(q_ref, do_ref, lse_ref, dl_ref, b, tok, head, valid)
        last = jnp.where(valid, jnp.minimum(off + tok, tk - 1), -1)  # as in the forward
        p = jnp.where(j <= last[:, None], jnp.exp2(dot(q, k, trans_b=True) * c - lse2), 0.0)
        dv = dv + dot(p.astype(do.dtype), do, trans_a=True)
        ds = (p * (dot(do, v, trans_b=True) - delta)).astype(q.dtype)
        dk = dk + dot(ds, q, trans_a=True)
        plgpu.store(
            dqp_ref.at[b, loc[:, None], slot[:, None], head[:, None], dd],
            (dot(ds, k) * scale).astype(dqp_ref.dtype),
            mask=valid[:, None],
        )
        return dk, dv

    zeros = jnp.zeros((bs, d), jnp.float32)
    dk, dv = lax.fori_loop(0, (e1 - e0 + per - 1) // per, body, (zeros, zeros))
    grads = (dk_ref, dv_ref, dk_part_ref, dv_part_ref, single_ref, pslot_ref)
    add_block_grads(grads, (b, h, w), n, dk * scale, dv)


def add_block_grads(refs, item, n, dk, dv) -> None:
    """A backward work item's dK, dV [BS, D] fp32: added in place to block n's accumulator when
    the item is the block's only one, else written to the item's partial slot. refs: (dk, dv
    accumulators, dk, dv partials, single, pslot); item: (b, h, w); n: its block (-1 = none)."""
    dk_ref, dv_ref, dk_part_ref, dv_part_ref, single_ref, pslot_ref = refs
    b, h, _ = item
    single = single_ref[item] != 0

    @pl.when((n >= 0) & single)
    def _():
        dk_ref[b, h, n] = dk_ref[b, h, n] + dk
        dv_ref[b, h, n] = dv_ref[b, h, n] + dv

    @pl.when((n >= 0) & ~single)
    def _():
        dk_part_ref[b, h, pslot_ref[item]] = dk
        dv_part_ref[b, h, pslot_ref[item]] = dv


def _fwd_chunk_kernel(
    off_ref,
    c0_ref,
    q_ref,
    k_ref,
    v_ref,
    ent_ref,
    blk_ref,
    start_ref,
    end_ref,
    po_ref,
    pls_ref,
    *,
    g,
    scale,
    bs,
):
    w, bh = pl.program_id(0), pl.program_id(1)
    _, tq, _, d = q_ref.shape
    tk, h_kv = k_ref.shape[1], k_ref.shape[2]
    _, chunk, s_count, _, _ = po_ref.shape
    b, h = bh // h_kv, bh % h_kv
    off, c0 = off_ref[0], c0_ref[0]
    n, e0, e1 = blk_ref[b, h, w], start_ref[b, h, w], end_ref[b, h, w]
    j0 = n * bs
    k = load_block(k_ref, b, j0, bs, h, tk)
    v = load_block(v_ref, b, j0, bs, h, tk)
    j = (j0 + jnp.arange(bs, dtype=jnp.int32))[None, :]
    per = FWD_ROWS // g
    r = jnp.arange(FWD_ROWS, dtype=jnp.int32)
    head = h * g + r % g
    dd = jnp.arange(d, dtype=jnp.int32)[None, :]
    c = scale * LOG2E

    def body(it, carry):
        valid, loc, slot, tok = step_rows(ent_ref, b, h, e0, e1, it, r, g, c0, tq, chunk, s_count)
        q = load_rows(q_ref, b, tok, head, valid)
        # Row r sees keys j <= last[r] (-1: padding); one compare per score. A valid row sees
        # at least key j0, so masked scores underflow to p = 0 against its finite max.
        last = jnp.where(valid, jnp.minimum(off + tok, tk - 1), -1)
        sc = jnp.where(j <= last[:, None], dot(q, k, trans_b=True) * c, NEG)
        m = jnp.max(sc, axis=1)
        p = jnp.exp2(sc - m[:, None])
        den = jnp.sum(p, axis=1)  # >= 1: the max term is 1
        o = dot(p.astype(v.dtype), v) * (1.0 / den)[:, None]
        plgpu.store(
            po_ref.at[b, loc[:, None], slot[:, None], head[:, None], dd],
            o.astype(po_ref.dtype),
            mask=valid[:, None],
        )
        plgpu.store(pls_ref.at[b, loc, slot, head], m + jnp.log2(den), mask=valid)
        return carry

    lax.fori_loop(0, (e1 - e0 + per - 1) // per, body, jnp.int32(0))


def partial_bytes_per_query(s: int, hq: int, d: int, dtype) -> int:
    """Bytes of the forward's per-(token, slot) partials per query: o in `dtype` and fp32 lse for
    each of the S slots and HQ heads (what PARTIAL_BYTES budgets per chunk)."""
    return s * hq * (d * jnp.dtype(dtype).itemsize + 4)


def _chunk_size(tq: int, per_token: int, budget: float) -> int:
    """Queries per chunk: the fewest equal chunks whose partials (per_token bytes per query) fit
    `budget`, rounded up to a multiple of 64 (16384 at 128K, 28 heads, D=128, S=32, bf16)."""
    n_chunks = -(-tq * per_token // int(budget))
    per_chunk = -(-tq // n_chunks)
    return min(tq, -(-per_chunk // 64) * 64)


def _slot_grid(chunk: int, hq: int, bsz: int) -> tuple[int, int]:
    """Grid of the merge / dq-sum kernels over a chunk: all HQ heads of a token in one program."""
    if hq > MERGE_ROWS:
        raise ValueError(f"the selection kernels take at most {MERGE_ROWS} query heads; got {hq}")
    return pl.cdiv(chunk, MERGE_ROWS // hq), bsz


def _slot_rows(shape) -> tuple[Array, Array, Array, Array]:
    """Rows of a program over per-(token, slot) partials of shape [B, C, S, HQ, D]: MERGE_ROWS //
    HQ chunk tokens x HQ heads -> (valid, chunk-local token (C when invalid), head) [R], and the
    column index [1, D]."""
    _, chunk, _, hq, d = shape
    tile, tokens = pl.program_id(0), MERGE_ROWS // hq
    r = jnp.arange(MERGE_ROWS, dtype=jnp.int32)
    valid = (r < tokens * hq) & (tile * tokens + r // hq < chunk)
    loc = jnp.where(valid, tile * tokens + r // hq, chunk)
    return valid, loc, r % hq, jnp.arange(d, dtype=jnp.int32)[None, :]


def _dq_sum_kernel(c0_ref, dqp_ref, idx_ref, _dq_in, dq_ref, *, g):
    """Sums one chunk's per-(token, slot) dq partials into rows c0 + token of dq_ref (aliasing
    _dq_in); unused slots (idx < 0) were never written and are never read."""
    b = pl.program_id(1)
    s_count, d = dqp_ref.shape[2], dqp_ref.shape[-1]
    valid, loc, head, dd = _slot_rows(dqp_ref.shape)

    def body(slot, acc):
        used = plgpu.load(idx_ref.at[b, loc, head // g, slot], mask=valid, other=-1) >= 0
        at = dqp_ref.at[b, loc[:, None], slot, head[:, None], dd]
        return acc + plgpu.load(at, mask=used[:, None], other=0.0).astype(jnp.float32)

    dq = lax.fori_loop(0, s_count, body, jnp.zeros((MERGE_ROWS, d), jnp.float32))
    row = c0_ref[0] + loc
    plgpu.store(
        dq_ref.at[b, row[:, None], head[:, None], dd], dq.astype(dq_ref.dtype), mask=valid[:, None]
    )


def _merge_kernel(c0_ref, po_ref, pls_ref, idx_ref, _o_in, _lse_in, o_ref, lse_ref, *, g):
    """Merges one chunk's per-(token, slot) partials into rows c0 + token of o_ref, lse_ref
    (aliasing _o_in, _lse_in). A program takes MERGE_ROWS // HQ tokens x HQ heads and walks the
    S slots with an online log-sum-exp; unused slots (idx < 0) were never written and are never
    read."""
    b = pl.program_id(1)
    s_count, d = po_ref.shape[2], po_ref.shape[-1]
    valid, loc, head, dd = _slot_rows(po_ref.shape)

    def body(slot, carry):
        acc, m, den = carry
        used = plgpu.load(idx_ref.at[b, loc, head // g, slot], mask=valid, other=-1) >= 0
        ls = plgpu.load(pls_ref.at[b, loc, slot, head], mask=used, other=NEG)
        po = plgpu.load(
            po_ref.at[b, loc[:, None], slot, head[:, None], dd], mask=used[:, None], other=0.0
        )
        m_new = jnp.maximum(m, ls)
        alpha = jnp.exp2(m - m_new)
        wt = jnp.where(used, jnp.exp2(ls - m_new), 0.0)
        acc = acc * alpha[:, None] + wt[:, None] * po.astype(jnp.float32)
        return acc, m_new, den * alpha + wt

    init = (
        jnp.zeros((MERGE_ROWS, d), jnp.float32),
        jnp.full((MERGE_ROWS,), NEG, jnp.float32),
        jnp.zeros((MERGE_ROWS,), jnp.float32),
    )
    acc, m, den = lax.fori_loop(0, s_count, body, init)
    nonempty = den > 0
    den = jnp.where(nonempty, den, 1.0)
    row = c0_ref[0] + loc
    o = (acc * (1.0 / den)[:, None]).astype(o_ref.dtype)
    plgpu.store(o_ref.at[b, row[:, None], head[:, None], dd], o, mask=valid[:, None])
    lse = jnp.where(nonempty, (m + jnp.log2(den)) * LN2, -jnp.inf)
    plgpu.store(lse_ref.at[b, row, head], lse, mask=valid)


def _uninitialized(shape: tuple[int, ...], dtype, interpret: bool) -> Array:
    """A float buffer that kernels fill before anything reads it: on GPU a launch that writes
    nothing (no memset of the whole buffer); in interpret mode NaN, so that a value the kernels
    failed to write shows in the CPU tests."""
    if interpret:
        return jnp.full(shape, jnp.nan, dtype)
    return call(lambda ref: None, (1,), jax.ShapeDtypeStruct(shape, dtype), interpret, 1, 1)


class ChunkIndex(NamedTuple):
    """The inverse indices (`_inverse_index`) of the N query chunks of C tokens, stacked: sorted
    entries token*S + slot [N, B, H, C*S] and per work item its block (-1 = no work), start and
    end [N, B, H, NI]. The forward builds them; the backward reuses them."""

    entries: Array
    block: Array
    start: Array
    end: Array


def selection_fwd(
    q, k, v, idx, off, *, scale: float, block_size: int, interpret: bool, chunk: int | None = None
) -> tuple[Array, Array, ChunkIndex]:
    """KV-block-major forward -> (o [B, Tq, HQ, D] q.dtype, lse [B, Tq, HQ] fp32, the chunks'
    inverse indices for `selection_bwd`).

    chunk: queries per chunk (default: `_chunk_size` with PARTIAL_BYTES).
    """
    bsz, tq, hq, d = q.shape
    tk, h = k.shape[1], k.shape[2]
    g, s = hq // h, idx.shape[-1]
    nb = -(-tk // block_size)
    per_token = partial_bytes_per_query(s, hq, d, q.dtype)
    chunk = min(chunk or _chunk_size(tq, per_token, PARTIAL_BYTES), tq)
    n_chunks = -(-tq // chunk)
    idx = jnp.pad(idx, ((0, 0), (0, n_chunks * chunk - tq), (0, 0), (0, 0)), constant_values=-1)
    kern = functools.partial(_fwd_chunk_kernel, g=g, scale=scale, bs=block_size)
    part = (bsz, chunk, s, hq)
    out = (jax.ShapeDtypeStruct((*part, d), q.dtype), jax.ShapeDtypeStruct(part, jnp.float32))

    def one_chunk(carry, c):
        o, lse = carry
        c0 = c * chunk
        idx_c = lax.dynamic_slice_in_dim(idx, c0, chunk, axis=1)
        ci = ChunkIndex(*_inverse_index(idx_c, nb))
        po, pls = call(
            kern,
            (ci.block.shape[-1], bsz * h),
            out,
            interpret,
            *FWD_LAUNCH,
            off,
            c0.reshape(1),
            q,
            k,
            v,
            *ci,
        )
        o, lse = call(
            functools.partial(_merge_kernel, g=g),
            _slot_grid(chunk, hq, bsz),
            (jax.ShapeDtypeStruct(o.shape, o.dtype), jax.ShapeDtypeStruct(lse.shape, lse.dtype)),
            interpret,
            *MERGE_LAUNCH,
            c0.reshape(1),
            po,
            pls,
            idx_c,
            o,
            lse,
            aliases={4: 0, 5: 1},
        )
        return (o, lse), ci

    # The merges write every row (tokens without a selection: o = 0, lse = -inf).
    init = (
        _uninitialized((bsz, n_chunks * chunk, hq, d), q.dtype, interpret),
        _uninitialized((bsz, n_chunks * chunk, hq), jnp.float32, interpret),
    )
    (o, lse), index = lax.scan(one_chunk, init, jnp.arange(n_chunks, dtype=jnp.int32))
    return o[:, :tq], lse[:, :tq], index


def _inverse_index(idx: Array, nb: int) -> tuple[Array, Array, Array, Array]:
    """CSR of block -> selecting (token, slot) entries, cut into work items of <= ITEM entries.

    One flat sort of all B*H*Tq*S (key, position) pairs, key = (b*H + h) * (NB + 1) + block
    (-1 -> NB): XLA lowers this one-dimensional sort to a CUB radix sort (1.1 ms at 128K vs 8.0 ms
    for the former batched [B, H, Tq*S] stable sort). Stable: within a block, ascending token.

    Returns sorted entries token*S + slot [B, H, Tq*S] and per item: block (-1 = no work), start,
    end [B, H, NI] (offsets into the entries of its (b, h)).
    """
    bsz, tq, h, s = idx.shape
    n = tq * s
    rows = lax.broadcasted_iota(jnp.int32, (bsz * h, 1), 0)
    key = jnp.where(idx >= 0, idx, nb).transpose(0, 2, 1, 3).reshape(bsz * h, n)
    key = (key + rows * (nb + 1)).reshape(-1)
    sorted_key, order = lax.sort(
        (key, lax.broadcasted_iota(jnp.int32, key.shape, 0)), num_keys=1, is_stable=True
    )
    entries = (order.reshape(bsz * h, n) - rows * n).reshape(bsz, h, n)
    bounds = jnp.arange(bsz * h * (nb + 1), dtype=jnp.int32)
    offsets = jnp.searchsorted(sorted_key, bounds, side="left").astype(jnp.int32)
    offsets = (offsets.reshape(bsz * h, nb + 1) - rows * n).reshape(bsz, h, nb + 1)
    counts = offsets[..., 1:] - offsets[..., :-1]
    items = (counts + ITEM - 1) // ITEM
    items_end = jnp.cumsum(items, axis=-1)
    n_items = nb + -(-n // ITEM)
    w = jnp.broadcast_to(jnp.arange(n_items, dtype=jnp.int32), (bsz, h, n_items))
    blk = jax.vmap(jax.vmap(functools.partial(jnp.searchsorted, side="right")))(items_end, w)
    blk = blk.astype(jnp.int32)
    real = blk < nb
    blk_c = jnp.minimum(blk, nb - 1)
    take = functools.partial(jnp.take_along_axis, axis=-1)
    local = w - (take(items_end, blk_c) - take(items, blk_c))
    start = take(offsets, blk_c) + local * ITEM
    end = jnp.minimum(start + ITEM, take(offsets, blk_c + 1))
    zero = jnp.zeros_like(start)
    return (
        entries,
        jnp.where(real, blk, -1),
        jnp.where(real, start, zero),
        jnp.where(real, end, zero),
    )


def _multi_item_slots(blk: Array, n_multi: int, nb: int) -> tuple[Array, Array, Array]:
    """Which work items add to their block's dK/dV accumulator in place (the block's only item)
    and where the others write: blk [B, H, NI] (items of a block are consecutive, -1 = none) ->
    single int32 [B, H, NI], pslot int32 [B, H, NI] (< n_multi), and each partial's block
    [B, H, n_multi] (nb, a discarded accumulator row, for unused partials)."""
    bsz, h, _ = blk.shape
    edge = jnp.full((bsz, h, 1), -2, blk.dtype)
    prev = jnp.concatenate([edge, blk[..., :-1]], axis=-1)
    nxt = jnp.concatenate([blk[..., 1:], edge], axis=-1)
    real = blk >= 0
    single = real & (prev != blk) & (nxt != blk)
    multi = (real & ~single).astype(jnp.int32)
    pslot = jnp.cumsum(multi, axis=-1) - multi
    b_ix = jnp.arange(bsz)[:, None, None]
    h_ix = jnp.arange(h)[None, :, None]
    seg = jnp.full((bsz, h, n_multi), nb, jnp.int32)
    seg = seg.at[b_ix, h_ix, jnp.where(multi > 0, pslot, n_multi)].set(blk, mode="drop")
    return single.astype(jnp.int32), jnp.where(multi > 0, pslot, 0), seg


def selection_bwd(
    q,
    k,
    v,
    idx,
    index: ChunkIndex,
    o,
    lse,
    do,
    off,
    *,
    scale: float,
    block_size: int,
    interpret: bool,
) -> tuple[Array, Array, Array]:
    """KV-block-major backward over the forward's chunks (index from `selection_fwd`) ->
    (dq, dk, dv) in the input dtypes."""
    bsz, tq, hq, d = q.shape
    tk, h = k.shape[1], k.shape[2]
    g, s = hq // h, idx.shape[-1]
    nb = -(-tk // block_size)
    n_chunks, chunk = index.entries.shape[0], index.entries.shape[-1] // s
    idx = jnp.pad(idx, ((0, 0), (0, n_chunks * chunk - tq), (0, 0), (0, 0)), constant_values=-1)
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    kern = functools.partial(_bwd_chunk_kernel, g=g, scale=scale, bs=block_size)
    # Items of blocks cut into several: such a block has > ITEM entries, so there are <= 2 *
    # entries / ITEM of them; the index has NI = NB + ceil(entries / ITEM) items.
    n_items = index.block.shape[-1]
    n_multi = min(n_items, 2 * (n_items - nb) + 1)
    part = jax.ShapeDtypeStruct((bsz, h, n_multi, block_size, d), jnp.float32)
    dqp_shape = jax.ShapeDtypeStruct((bsz, chunk, s, hq, d), q.dtype)
    b_ix = jnp.arange(bsz)[:, None, None]
    h_ix = jnp.arange(h)[None, :, None]

    def one_chunk(carry, xs):
        dq, dk, dv = carry
        c, ci = xs
        c0 = c * chunk
        single, pslot, seg = _multi_item_slots(ci.block, n_multi, nb)
        args = (off, c0.reshape(1), q, k, v, do, lse, delta, *ci, single, pslot)
        dk, dv, dk_p, dv_p, dqp = call(
            kern,
            (n_items, bsz * h),
            (jax.ShapeDtypeStruct(dk.shape, dk.dtype),) * 2 + (part, part, dqp_shape),
            interpret,
            *BWD_LAUNCH,
            *args,
            dk,
            dv,
            aliases={len(args): 0, len(args) + 1: 1},
        )
        dq = call(
            functools.partial(_dq_sum_kernel, g=g),
            _slot_grid(chunk, hq, bsz),
            jax.ShapeDtypeStruct(dq.shape, dq.dtype),
            interpret,
            *MERGE_LAUNCH,
            c0.reshape(1),
            dqp,
            lax.dynamic_slice_in_dim(idx, c0, chunk, axis=1),
            dq,
            aliases={3: 0},
        )
        return (dq, dk.at[b_ix, h_ix, seg].add(dk_p), dv.at[b_ix, h_ix, seg].add(dv_p)), None

    # The dq sums write every row (tokens without a selection: 0).
    dq = _uninitialized((bsz, n_chunks * chunk, hq, d), q.dtype, interpret)
    dk = jnp.zeros((bsz, h, nb + 1, block_size, d), jnp.float32)
    chunks = (jnp.arange(n_chunks, dtype=jnp.int32), index)
    (dq, dk, dv), _ = lax.scan(one_chunk, (dq, dk, jnp.zeros_like(dk)), chunks)

    def to_keys(blocks: Array, dtype) -> Array:
        x = blocks[:, :, :nb].reshape(bsz, h, nb * block_size, d)[:, :, :tk]
        return x.transpose(0, 2, 1, 3).astype(dtype)

    return dq[:, :tq], to_keys(dk, k.dtype), to_keys(dv, v.dtype)
