"""Attention of arbitrary query rows over all keys, flash-style (Pallas-Triton): `rows_attention`.

For the dense text rows of a VideoNSA layer: n query rows (n << S) each take causal GQA over the
S keys, row i seeing the valid keys s <= q_index[b, i]. Online softmax over key tiles with fp32
accumulation: no [n, S] array is ever in memory.

Shapes: q, o, do, dq [B, n, HQ, D]; k, v, dk, dv [B, S, H, D]; q_index [B, n] int32; kv_valid
[B, S]; lse, delta [B, n, HQ] fp32 (natural log; -inf for a row that sees no key). Tiles hold
packed GQA rows (gpu_common): R // G tokens x the G query heads of one KV head, so a tile's K/V
loads serve all its heads. A tile walks the key tiles up to its largest q_index only.

Kernels:
    forward  grid (cdiv(n, 128 // G), B*H, splits): a [128, D] query tile stays in registers and
             walks its key tiles [64, D], cut into `splits` equal parts (split-K, as in flash
             decoding: n is small, so without it there would be too few programs for the GPU;
             splits brings them to about TARGET_PROGRAMS). Each part writes its own normalised
             fp32 o and lse; XLA merges the parts into o (q.dtype) and lse.
    dq       same grid and walk; recomputes p from lse; fp32 dq per part, summed by XLA.
    dk/dv    grid (cdiv(S, 64), B*H): a [64, D] key tile stays resident and walks the query tiles
             [64, D] whose largest q_index reaches it (XLA lists the query tiles by decreasing
             reach and counts, per key tile, those that reach it); writes dk, dv in k.dtype. No
             atomics, no partials.
Memory: the fp32 partial o (forward) and dq (backward), splits * B * n * HQ * D * 4 bytes each:
264 MB for B = 1, 1,024 rows, 28 / 4 heads, D = 128 (18 splits; timings: benchmarks/RESULTS.md).
Rows that see no valid key (q_index below the first valid key) get the mean of v over all S keys,
as in `attention.dense_attention`, whose finite mask value makes their softmax uniform; their
gradient goes to v only. The kernels leave them 0 and `rows_attention` fills them in.
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
    packed_rows,
    store_rows,
    store_stat,
)
from pallas_kernels.nsa.reference import default_scale

Array = jax.Array

FWD_ROWS, FWD_KEYS, FWD_LAUNCH = 128, 64, (8, 2)  # packed query rows, keys per step, launch
DQ_ROWS, DQ_KEYS, DQ_LAUNCH = 128, 64, (8, 2)
BWD_ROWS, BWD_KEYS, BWD_LAUNCH = 64, 64, (4, 2)  # dk/dv: query rows per step, resident keys
TARGET_PROGRAMS = 4096  # forward / dq programs aimed at by the key splits (H100: 132 SMs)


class _Cfg(NamedTuple):
    scale: float
    interpret: bool


def _row_limits(qi_ref, b: Array, tok: Array, valid: Array) -> Array:
    """q_index of the tile's rows -> [R] (-1 for rows outside [0, n): they see nothing)."""
    return plgpu.load(qi_ref.at[b, tok], mask=valid, other=-1)


def _key_tile(kvv_ref, b: Array, j0: Array, size: int) -> tuple[Array, Array]:
    """Key slots j0 .. j0+size-1 and their validity (False past S), each [1, size]."""
    j = j0 + jnp.arange(size, dtype=jnp.int32)
    ok = plgpu.load(kvv_ref.at[b, pl.ds(j0, size)], mask=j < kvv_ref.shape[1], other=0) != 0
    return j[None, :], ok[None, :]


def _key_steps(qi: Array, split: Array, splits: int, s: int, keys: int) -> tuple[Array, Array]:
    """Key tiles [start, stop) of part `split` of the walk that rows with limits qi [R] need."""
    steps = (jnp.clip(jnp.max(qi), -1, s - 1) + keys) // keys
    per = (steps + splits - 1) // splits
    start = split * per
    return start, jnp.minimum(start + per, steps)


def _fwd_kernel(qi_ref, kvv_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, g, scale, splits):
    tile, bh, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bsz, n, _, d = q_ref.shape
    s, h_kv = k_ref.shape[1], k_ref.shape[2]
    b, h = bh // h_kv, bh % h_kv
    tok, head, valid = packed_rows(tile, FWD_ROWS, g, n, h)
    qi = _row_limits(qi_ref, b, tok, valid)
    q = load_rows(q_ref, b, tok, head, valid)
    start, stop = _key_steps(qi, split, splits, s, FWD_KEYS)
    lim = qi[:, None]
    c = scale * LOG2E

    def body(jt, carry):
        acc, m, den = carry
        j0 = jt * FWD_KEYS
        k = load_block(k_ref, b, j0, FWD_KEYS, h, s)
        v = load_block(v_ref, b, j0, FWD_KEYS, h, s)
        j, ok = _key_tile(kvv_ref, b, j0, FWD_KEYS)
        mask = (j <= lim) & ok
        sc = jnp.where(mask, dot(q, k, trans_b=True) * c, NEG)
        m_new = jnp.maximum(m, jnp.max(sc, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.where(mask, jnp.exp2(sc - m_new[:, None]), 0.0)
        den = den * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v)
        return acc, m_new, den

    init = (
        jnp.zeros((FWD_ROWS, d), jnp.float32),
        jnp.full((FWD_ROWS,), NEG, jnp.float32),
        jnp.zeros((FWD_ROWS,), jnp.float32),
    )
    acc, m, den = lax.fori_loop(start, stop, body, init)
    nonempty = den > 0
    den_safe = jnp.where(nonempty, den, 1.0)
    part = split * bsz + b  # parts are stacked along the batch axis
    store_rows(o_ref, part, tok, head, valid, acc / den_safe[:, None])
    lse = jnp.where(nonempty, (m + jnp.log2(den_safe)) * LN2, -jnp.inf)
    store_stat(lse_ref, part, tok, head, valid, lse)


def _dq_kernel(
    qi_ref, kvv_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref, *, g, scale, splits
):
    tile, bh, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bsz, n, _, d = q_ref.shape
    s, h_kv = k_ref.shape[1], k_ref.shape[2]
    b, h = bh // h_kv, bh % h_kv
    tok, head, valid = packed_rows(tile, DQ_ROWS, g, n, h)
    qi = _row_limits(qi_ref, b, tok, valid)
    q, do, lse2, delta = load_grad_rows(q_ref, do_ref, lse_ref, dl_ref, b, tok, head, valid)
    start, stop = _key_steps(qi, split, splits, s, DQ_KEYS)
    lim = qi[:, None]
    c = scale * LOG2E

    def body(jt, dq):
        j0 = jt * DQ_KEYS
        k = load_block(k_ref, b, j0, DQ_KEYS, h, s)
        v = load_block(v_ref, b, j0, DQ_KEYS, h, s)
        j, ok = _key_tile(kvv_ref, b, j0, DQ_KEYS)
        p = jnp.where((j <= lim) & ok, jnp.exp2(dot(q, k, trans_b=True) * c - lse2), 0.0)
        ds = p * (dot(do, v, trans_b=True) - delta)
        return dq + dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(start, stop, body, jnp.zeros((DQ_ROWS, d), jnp.float32))
    store_rows(dq_ref, split * bsz + b, tok, head, valid, dq * scale)


def _dkv_kernel(
    qi_ref,
    kvv_ref,
    order_ref,
    count_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    dl_ref,
    dk_ref,
    dv_ref,
    *,
    g,
    scale,
):
    kt, bh = pl.program_id(0), pl.program_id(1)
    _, n, _, d = q_ref.shape
    s, h_kv = k_ref.shape[1], k_ref.shape[2]
    b, h = bh // h_kv, bh % h_kv
    j0 = kt * BWD_KEYS
    k = load_block(k_ref, b, j0, BWD_KEYS, h, s)
    v = load_block(v_ref, b, j0, BWD_KEYS, h, s)
    j, ok = _key_tile(kvv_ref, b, j0, BWD_KEYS)
    c = scale * LOG2E

    def body(i, carry):
        dk, dv = carry
        tok, head, valid = packed_rows(order_ref[b, i], BWD_ROWS, g, n, h)
        lim = _row_limits(qi_ref, b, tok, valid)[:, None]
        q, do, lse2, delta = load_grad_rows(q_ref, do_ref, lse_ref, dl_ref, b, tok, head, valid)
        p = jnp.where((j <= lim) & ok, jnp.exp2(dot(q, k, trans_b=True) * c - lse2), 0.0)
        dv = dv + dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (dot(do, v, trans_b=True) - delta)
        dk = dk + dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    zeros = jnp.zeros((BWD_KEYS, d), jnp.float32)
    dk, dv = lax.fori_loop(0, count_ref[b, kt], body, (zeros, zeros))
    rows = (j0 + jnp.arange(BWD_KEYS, dtype=jnp.int32) < s)[:, None]
    plgpu.store(
        dk_ref.at[b, pl.ds(j0, BWD_KEYS), h, :], (dk * scale).astype(dk_ref.dtype), mask=rows
    )
    plgpu.store(dv_ref.at[b, pl.ds(j0, BWD_KEYS), h, :], dv.astype(dv_ref.dtype), mask=rows)


def _splits(programs: int, s: int) -> int:
    """Key splits of the forward / dq walks: about TARGET_PROGRAMS programs, >= 1 key tile each."""
    return max(1, min(pl.cdiv(TARGET_PROGRAMS, programs), pl.cdiv(s, FWD_KEYS)))


def _forward(q, k, v, qi, kvv, cfg: _Cfg) -> tuple[Array, Array]:
    """-> (o [B, n, HQ, D] q.dtype, 0 for rows that see no key; lse [B, n, HQ] fp32)."""
    bsz, n, hq, d = q.shape
    h = k.shape[2]
    g = hq // h
    tiles = pl.cdiv(n, FWD_ROWS // g)
    splits = _splits(tiles * bsz * h, k.shape[1])
    out = (
        jax.ShapeDtypeStruct((splits * bsz, n, hq, d), jnp.float32),
        jax.ShapeDtypeStruct((splits * bsz, n, hq), jnp.float32),
    )
    kern = functools.partial(_fwd_kernel, g=g, scale=cfg.scale, splits=splits)
    grid = (tiles, bsz * h, splits)
    part, part_lse = call(kern, grid, out, cfg.interpret, *FWD_LAUNCH, qi, kvv, q, k, v)
    part = part.reshape(splits, bsz, n, hq, d)
    part_lse = part_lse.reshape(splits, bsz, n, hq)
    lse = jax.nn.logsumexp(part_lse, axis=0)  # -inf where every part is empty
    w = jnp.where(jnp.isneginf(part_lse), 0.0, jnp.exp(part_lse - lse))
    return jnp.sum(part * w[..., None], axis=0).astype(q.dtype), lse


def _backward(q, k, v, qi, kvv, o, lse, do, cfg: _Cfg) -> tuple[Array, Array, Array]:
    """-> (dq, dk, dv) in the input dtypes."""
    bsz, n, hq, d = q.shape
    s, h = k.shape[1], k.shape[2]
    g = hq // h
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    tiles = pl.cdiv(n, DQ_ROWS // g)
    splits = _splits(tiles * bsz * h, s)
    dq = call(
        functools.partial(_dq_kernel, g=g, scale=cfg.scale, splits=splits),
        (tiles, bsz * h, splits),
        jax.ShapeDtypeStruct((splits * bsz, n, hq, d), jnp.float32),
        cfg.interpret,
        *DQ_LAUNCH,
        qi,
        kvv,
        q,
        k,
        v,
        do,
        lse,
        delta,
    )
    dq = jnp.sum(dq.reshape(splits, bsz, n, hq, d), axis=0).astype(q.dtype)
    # Query tiles of the dk/dv walk by decreasing reach (largest q_index); count[b, kt] = how many
    # reach key tile kt, so a key tile walks a prefix of the order.
    tokens = BWD_ROWS // g
    q_tiles = pl.cdiv(n, tokens)
    reach = jnp.pad(qi, ((0, 0), (0, q_tiles * tokens - n)), constant_values=-1)
    reach = jnp.max(reach.reshape(bsz, q_tiles, tokens), axis=2)
    order = jnp.argsort(reach, axis=1, descending=True).astype(jnp.int32)
    key_start = jnp.arange(pl.cdiv(s, BWD_KEYS), dtype=jnp.int32) * BWD_KEYS
    count = jnp.sum(reach[:, None, :] >= key_start[None, :, None], axis=2, dtype=jnp.int32)
    dk, dv = call(
        functools.partial(_dkv_kernel, g=g, scale=cfg.scale),
        (pl.cdiv(s, BWD_KEYS), bsz * h),
        (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        cfg.interpret,
        *BWD_LAUNCH,
        qi,
        kvv,
        order,
        count,
        q,
        k,
        v,
        do,
        lse,
        delta,
    )
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _rows(q: Array, k: Array, v: Array, qi: Array, kvv: Array, cfg: _Cfg) -> Array:
    return _forward(q, k, v, qi, kvv, cfg)[0]


def _rows_fwd(q, k, v, qi, kvv, cfg):
    o, lse = _forward(q, k, v, qi, kvv, cfg)
    return o, (q, k, v, qi, kvv, o, lse)


def _rows_bwd(cfg, res, do):
    return (*_backward(*res, do, cfg), None, None)


_rows.defvjp(_rows_fwd, _rows_bwd)


def rows_attention(
    q: Array,
    k: Array,
    v: Array,
    q_index: Array,
    kv_valid: Array,
    *,
    scale: float | None = None,
    interpret: bool = False,
) -> Array:
    """Causal GQA of n query rows over all keys; differentiable in q, k, v.

    Args:
        q: [B, n, HQ, D] queries; k, v: [B, S, H, D] with HQ % H == 0 (query head i reads KV
            head i // (HQ // H)).
        q_index: int [B, n]: row i sees key s iff s <= q_index[b, i] and kv_valid[b, s]. Any
            value is allowed (padding rows).
        kv_valid: bool [B, S], False for padding keys.
        scale: softmax scale; D ** -0.5 if None.
        interpret: run the kernels in Pallas interpret mode (CPU).

    Returns:
        [B, n, HQ, D] in q.dtype, equal to `attention.dense_attention` on the same rows: a row that
        sees no valid key gets the mean of v over all S keys.

    Raises:
        ValueError: HQ not a multiple of H, a GQA group above 64, or (compiled) a head dim that
            is below 16 or not a power of two (Triton tile rules).
    """
    hq, d = q.shape[2], q.shape[3]
    s, h = k.shape[1], k.shape[2]
    if hq % h or hq // h > BWD_ROWS:
        raise ValueError(f"rows_attention needs HQ % H == 0 and HQ / H <= 64; got {hq}, {h}")
    if not interpret and (d < 16 or d & (d - 1)):
        raise ValueError(f"rows_attention needs a power-of-two head dim >= 16; got {d}")
    qi = q_index.astype(jnp.int32)
    o = _rows(q, k, v, qi, kv_valid.astype(jnp.int32), _Cfg(default_scale(d, scale), interpret))
    first = jnp.min(jnp.where(kv_valid, jnp.arange(s, dtype=jnp.int32), s), axis=1)  # S if none
    mean = jnp.repeat(jnp.mean(v.astype(jnp.float32), axis=1), hq // h, axis=1)  # [B, HQ, D]
    empty = jnp.minimum(qi, s - 1) < first[:, None]
    return jnp.where(empty[..., None, None], mean[:, None].astype(o.dtype), o)
