"""Flash attention over packed GQA rows for the two dense-pattern NSA branches (Pallas-Triton).

Masks (query at absolute position t = q_offset + i, key j):
    "cmp"  compressed keys (mean-pooled blocks): visible iff (j+1)*BS - 1 <= t.
    "swa"  raw keys, sliding window: t - W < j <= t.

Shapes: q, o, do, dq [B, Tq, HQ, D]; k, v [B, NK, H, D] (NK = NB for "cmp", Tk for "swa");
lse, delta [B, Tq, HQ] fp32 (natural log; -inf for a query that sees no key).

Kernels (rows = packed GQA rows of one KV head, see gpu_common):
    forward  grid (cdiv(Tq, R//G), B*H); a [R=64, D] query tile stays in registers; loop over
             the visible key tiles [BK=64, D] with an online softmax (exp2). Registers: acc
             [64, D] fp32. Memory: o and lse only.
    dq       same grid and loop; recomputes p from lse; dq = scale * sum ds @ k.
    dk/dv    grid (cdiv(NK, 64), B*H, splits): a [64, D] key tile stays resident, the loop walks the
             query tiles [R=64, D] that can see it (KV-block-major, no atomics). For "cmp" the long
             query range is cut into `splits` parts whose fp32 partial dk/dv [splits, B, NK, H, D]
             are summed by XLA; "swa" needs one split.
All three walks visit first the tiles that every row of the tile sees whole (`whole_key_tiles`,
`_whole_query_tiles`: no mask, no bounds checks), then the boundary tiles with the mask.
"""

from __future__ import annotations

import functools

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
    packed_rows,
    store_rows,
    store_stat,
)

Array = jax.Array

FWD_ROWS, FWD_KEYS, FWD_LAUNCH = 64, 64, (4, 2)  # packed query rows, keys per step, launch
DQ_ROWS, DQ_KEYS, DQ_LAUNCH = 64, 64, (4, 2)
BWD_ROWS, BWD_KEYS, BWD_LAUNCH = 64, 64, (4, 2)  # dk/dv: query rows per step, resident keys
SPLIT_TILES, MAX_SPLITS = 128, 64  # "cmp" dk/dv: query tiles per split of the query range


def visible(mode: str, t: Array, j: Array, nk: int, bs: int, w: int) -> Array:
    """[R, 1] positions x [1, K] key indices -> bool mask."""
    if mode == "cmp":
        return ((j + 1) * bs - 1 <= t) & (j < nk)
    return (j <= t) & (j > t - w) & (j >= 0) & (j < nk)


def key_range(mode: str, t_lo: Array, t_hi: Array, nk: int, bs: int, w: int):
    """Key index range [lo, hi) any query in [t_lo, t_hi] may see."""
    if mode == "cmp":
        return jnp.int32(0), jnp.minimum((t_hi + 1) // bs, nk)
    return jnp.maximum(t_lo - w + 1, 0), jnp.minimum(t_hi + 1, nk)


def _query_range(mode: str, k_lo: Array, k_hi: Array, off: Array, tq: int, bs: int, w: int):
    """Query index range [lo, hi) that may see a key in [k_lo, k_hi]."""
    if mode == "cmp":
        return jnp.maximum((k_lo + 1) * bs - 1 - off, 0), jnp.int32(tq)
    return jnp.maximum(k_lo - off, 0), jnp.clip(k_hi + w - off, 0, tq)


def whole_key_tiles(mode, t_lo, t_hi, first, stop, nk, bs, w, keys):
    """Key tiles [a, b) within [first, stop) whose keys every query in [t_lo, t_hi] sees."""
    if mode == "cmp":
        a, b = first, jnp.minimum((t_lo + 1) // bs, nk) // keys
    else:
        a = (jnp.maximum(t_hi - w + 1, 0) + keys - 1) // keys
        b = jnp.minimum(t_lo + 1, nk) // keys
    a = jnp.clip(a, first, stop)
    return a, jnp.clip(b, a, stop)


def _whole_query_tiles(mode, j_lo, j_hi, off, first, stop, tokens, bs, w):
    """Query tiles [a, b) within [first, stop) (tile i: positions off + i*tokens + [0, tokens))
    whose queries all see every key in [j_lo, j_hi]. Padding rows of the last tile load zero q,
    do, lse and delta, so they add nothing to dk / dv unmasked."""
    if mode == "cmp":
        a, b = (jnp.maximum((j_hi + 1) * bs - 1 - off, 0) + tokens - 1) // tokens, stop
    else:
        a = (jnp.maximum(j_hi - off, 0) + tokens - 1) // tokens
        b = jnp.maximum(j_lo + w - off, 0) // tokens
    a = jnp.clip(a, first, stop)
    return a, jnp.clip(b, a, stop)


def _split_walk(body, first, a, b, stop, carry):
    """body(i, carry, masked) over [a, b) unmasked, then [first, a) and [b, stop) masked."""
    carry = lax.fori_loop(a, b, functools.partial(body, masked=False), carry)
    masked = functools.partial(body, masked=True)
    return lax.fori_loop(b, stop, masked, lax.fori_loop(first, a, masked, carry))


def _fwd_kernel(off_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, mode, g, scale, bs, w):
    tile, bh = pl.program_id(0), pl.program_id(1)
    _, tq, _, d = q_ref.shape
    nk, h_kv = k_ref.shape[1], k_ref.shape[2]
    b, h = bh // h_kv, bh % h_kv
    off = off_ref[0]
    tok, head, valid = packed_rows(tile, FWD_ROWS, g, tq, h)
    t = (off + tok)[:, None]
    q = load_rows(q_ref, b, tok, head, valid)
    tokens = FWD_ROWS // g
    t_lo = off + tile * tokens
    t_hi = off + jnp.minimum((tile + 1) * tokens, tq) - 1
    lo, hi = key_range(mode, t_lo, t_hi, nk, bs, w)
    c = scale * LOG2E

    def body(jt, carry, masked):
        acc, m, den = carry
        j0 = jt * FWD_KEYS
        k = load_block(k_ref, b, j0, FWD_KEYS, h, nk if masked else None)
        v = load_block(v_ref, b, j0, FWD_KEYS, h, nk if masked else None)
        s = dot(q, k, trans_b=True) * c
        if masked:
            mask = visible(
                mode, t, (j0 + jnp.arange(FWD_KEYS, dtype=jnp.int32))[None, :], nk, bs, w
            )
            s = jnp.where(mask, s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        if masked:
            p = jnp.where(mask, p, 0.0)
        den = den * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v)
        return acc, m_new, den

    init = (
        jnp.zeros((FWD_ROWS, d), jnp.float32),
        jnp.full((FWD_ROWS,), NEG, jnp.float32),
        jnp.zeros((FWD_ROWS,), jnp.float32),
    )
    first, stop = lo // FWD_KEYS, (hi + FWD_KEYS - 1) // FWD_KEYS
    a, z = whole_key_tiles(mode, t_lo, t_hi, first, stop, nk, bs, w, FWD_KEYS)
    acc, m, den = _split_walk(body, first, a, z, stop, init)
    nonempty = den > 0
    den_safe = jnp.where(nonempty, den, 1.0)
    store_rows(o_ref, b, tok, head, valid, acc / den_safe[:, None])
    lse = jnp.where(nonempty, (m + jnp.log2(den_safe)) * LN2, -jnp.inf)
    store_stat(lse_ref, b, tok, head, valid, lse)


def _dq_kernel(
    off_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref, *, mode, g, scale, bs, w
):
    tile, bh = pl.program_id(0), pl.program_id(1)
    _, tq, _, d = q_ref.shape
    nk, h_kv = k_ref.shape[1], k_ref.shape[2]
    b, h = bh // h_kv, bh % h_kv
    off = off_ref[0]
    tok, head, valid = packed_rows(tile, DQ_ROWS, g, tq, h)
    t = (off + tok)[:, None]
    q, do, lse2, delta = load_grad_rows(q_ref, do_ref, lse_ref, dl_ref, b, tok, head, valid)
    tokens = DQ_ROWS // g
    t_lo = off + tile * tokens
    t_hi = off + jnp.minimum((tile + 1) * tokens, tq) - 1
    lo, hi = key_range(mode, t_lo, t_hi, nk, bs, w)
    c = scale * LOG2E

    def body(jt, dq, masked):
        j0 = jt * DQ_KEYS
        k = load_block(k_ref, b, j0, DQ_KEYS, h, nk if masked else None)
        v = load_block(v_ref, b, j0, DQ_KEYS, h, nk if masked else None)
        p = jnp.exp2(dot(q, k, trans_b=True) * c - lse2)
        if masked:
            j = (j0 + jnp.arange(DQ_KEYS, dtype=jnp.int32))[None, :]
            p = jnp.where(visible(mode, t, j, nk, bs, w), p, 0.0)
        ds = p * (dot(do, v, trans_b=True) - delta)
        return dq + dot(ds.astype(k.dtype), k)

    first, stop = lo // DQ_KEYS, (hi + DQ_KEYS - 1) // DQ_KEYS
    a, z = whole_key_tiles(mode, t_lo, t_hi, first, stop, nk, bs, w, DQ_KEYS)
    dq = _split_walk(body, first, a, z, stop, jnp.zeros((DQ_ROWS, d), jnp.float32))
    store_rows(dq_ref, b, tok, head, valid, dq * scale)


def _dkv_kernel(
    off_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    dl_ref,
    dk_ref,
    dv_ref,
    *,
    mode,
    g,
    scale,
    bs,
    w,
    splits,
):
    kt, bh, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    _, tq, _, d = q_ref.shape
    nk, h_kv = k_ref.shape[1], k_ref.shape[2]
    b, h = bh // h_kv, bh % h_kv
    off = off_ref[0]
    j0 = kt * BWD_KEYS
    k = load_block(k_ref, b, j0, BWD_KEYS, h, nk)
    v = load_block(v_ref, b, j0, BWD_KEYS, h, nk)
    j = (j0 + jnp.arange(BWD_KEYS, dtype=jnp.int32))[None, :]
    tokens = BWD_ROWS // g
    i_lo, i_hi = _query_range(mode, j0, j0 + BWD_KEYS - 1, off, tq, bs, w)
    first, last = i_lo // tokens, (i_hi + tokens - 1) // tokens
    per_split = (last - first + splits - 1) // splits
    start = first + split * per_split
    stop = jnp.minimum(start + per_split, last)
    c = scale * LOG2E

    def body(tile, carry, masked):
        dk, dv = carry
        tok, head, valid = packed_rows(tile, BWD_ROWS, g, tq, h)
        q, do, lse2, delta = load_grad_rows(q_ref, do_ref, lse_ref, dl_ref, b, tok, head, valid)
        p = jnp.exp2(dot(q, k, trans_b=True) * c - lse2)
        if masked:
            mask = visible(mode, (off + tok)[:, None], j, nk, bs, w) & valid[:, None]
            p = jnp.where(mask, p, 0.0)
        dv = dv + dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (dot(do, v, trans_b=True) - delta)
        dk = dk + dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    zeros = jnp.zeros((BWD_KEYS, d), jnp.float32)
    a, z = _whole_query_tiles(mode, j0, j0 + BWD_KEYS - 1, off, start, stop, tokens, bs, w)
    dk, dv = _split_walk(body, start, a, z, stop, (zeros, zeros))
    rows = j0 + jnp.arange(BWD_KEYS, dtype=jnp.int32)
    dd = jnp.arange(d, dtype=jnp.int32)
    mask = (rows < nk)[:, None]
    idx = (split, b, rows[:, None], h, dd[None, :])
    plgpu.store(dk_ref.at[idx], dk * scale, mask=mask)
    plgpu.store(dv_ref.at[idx], dv, mask=mask)


def _static(mode, g, scale, bs, w):
    return dict(mode=mode, g=g, scale=scale, bs=bs, w=w)


def flash_fwd(
    q, k, v, off, *, mode: str, scale: float, block_size: int, window: int, interpret: bool
) -> tuple[Array, Array]:
    """Forward of one branch -> (o [B, Tq, HQ, D] q.dtype, lse [B, Tq, HQ] fp32)."""
    bsz, tq, hq, _ = q.shape
    h = k.shape[2]
    g = hq // h
    kern = functools.partial(_fwd_kernel, **_static(mode, g, scale, block_size, window))
    grid = (pl.cdiv(tq, FWD_ROWS // g), bsz * h)
    out = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(q.shape[:3], jnp.float32))
    return call(kern, grid, out, interpret, *FWD_LAUNCH, off, q, k, v)


def flash_bwd(
    q,
    k,
    v,
    o,
    lse,
    do,
    off,
    *,
    mode: str,
    scale: float,
    block_size: int,
    window: int,
    interpret: bool,
) -> tuple[Array, Array, Array]:
    """Backward of one branch -> (dq, dk, dv) in the input dtypes."""
    bsz, tq, hq, d = q.shape
    nk, h = k.shape[1], k.shape[2]
    g = hq // h
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    st = _static(mode, g, scale, block_size, window)
    dq = call(
        functools.partial(_dq_kernel, **st),
        (pl.cdiv(tq, DQ_ROWS // g), bsz * h),
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret,
        *DQ_LAUNCH,
        off,
        q,
        k,
        v,
        do,
        lse,
        delta,
    )
    q_tiles = pl.cdiv(tq, BWD_ROWS // g)
    splits = 1 if mode == "swa" else max(1, min(MAX_SPLITS, q_tiles // SPLIT_TILES))
    part = jax.ShapeDtypeStruct((splits, bsz, nk, h, d), jnp.float32)
    dk, dv = call(
        functools.partial(_dkv_kernel, splits=splits, **st),
        (pl.cdiv(nk, BWD_KEYS), bsz * h, splits),
        (part, part),
        interpret,
        *BWD_LAUNCH,
        off,
        q,
        k,
        v,
        do,
        lse,
        delta,
    )
    return dq, dk.sum(0).astype(k.dtype), dv.sum(0).astype(v.dtype)
