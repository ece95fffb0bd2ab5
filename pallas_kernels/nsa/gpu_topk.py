"""Top-S block selection (fla `naive_nsa_topk` rule) as two Pallas-Triton kernels, no sort.

importance[t, h, n] = sum over the G query heads of h of exp(s - lse) for blocks complete in the
past ((n+1)*BS - 1 <= t); blocks 0, cur-1, cur (cur = t // BS) are forced to G (the maximum);
blocks n > cur are invalid (-1). The sum ranks exactly like the reference's mean.

    score   grid (cdiv(Tq, 64), B*H): a tile of 64 tokens x 64 compressed blocks accumulates the G
            heads' probabilities (loop over heads inside the loop over block tiles; the [64, D]
            query tile of one head comes from L1/L2), then writes fp32 importance
            [B, H, Tq, NB] (only the causal part each tile can see: ~half of T*NB*4 bytes per H).
    select  grid (cdiv(Tq, M), B*H), M = 8192 // NBp rows: the whole importance row [M, NBp]
            (NBp = next pow2 of NB) sits in registers; S rounds of argmax (ties -> lower index,
            like lax.top_k) pick the blocks; a rank count over the [M, S, S] pairs lists them in
            ascending block order with -1 padding, as `reference.select_blocks` does.
Memory: the importance buffer, B*H*Tq*NB*4 bytes (4.3 GB at 128K, 4 KV heads), freed after select.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.nsa.gpu_common import call, dot, next_pow2

Array = jax.Array

SCORE_TOKENS, SCORE_BLOCKS = 64, 64


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


def _select_kernel(off_ref, imp_ref, idx_ref, *, rows, nbp, count, bs):
    tile, bh = pl.program_id(0), pl.program_id(1)
    _, h_kv, tq, nb = imp_ref.shape
    _, _, _, s_total = idx_ref.shape
    b, h = bh // h_kv, bh % h_kv
    off = off_ref[0]
    i = tile * rows + jnp.arange(rows, dtype=jnp.int32)
    valid = i < tq
    tok = jnp.where(valid, i, tq)
    cur = ((off + i) // bs)[:, None]
    n = jnp.arange(nbp, dtype=jnp.int32)[None, :]
    imp = plgpu.load(
        imp_ref.at[b, h, tok[:, None], n], mask=valid[:, None] & (n <= cur) & (n < nb), other=-1.0
    )
    sp = next_pow2(s_total)
    slot = jnp.arange(sp, dtype=jnp.int32)[None, :]

    def pick(s, carry):
        imp, sel = carry
        best = jnp.argmax(imp, axis=1)
        ok = jnp.max(imp, axis=1) >= 0
        sel = jnp.where(slot == s, jnp.where(ok, best, -1)[:, None], sel)
        imp = jnp.where(n == best[:, None], -2.0, imp)
        return imp, sel

    _, sel = lax.fori_loop(0, count, pick, (imp, jnp.full((rows, sp), -1, jnp.int32)))
    # Ascending block order, -1 last: rank of each slot among its row's slots.
    big = jnp.int32(2**30)
    key = jnp.where(sel >= 0, sel, big)
    a, c = key[:, :, None], key[:, None, :]
    before = (c < a) | ((c == a) & (slot[:, None, :] < slot[:, :, None]))
    rank = jnp.sum(before.astype(jnp.int32), axis=2)
    plgpu.store(idx_ref.at[b, tok[:, None], h, rank], sel, mask=valid[:, None] & (rank < s_total))


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
) -> Array:
    """int32 [B, Tq, H, S] selected blocks (ascending, -1 padded); no gradient."""
    bsz, tq, hq, _ = q.shape
    nb, h = kc.shape[1], kc.shape[2]
    g = hq // h
    imp = call(
        functools.partial(_score_kernel, g=g, scale=scale, bs=block_size),
        (pl.cdiv(tq, SCORE_TOKENS), bsz * h),
        jax.ShapeDtypeStruct((bsz, h, tq, nb), jnp.float32),
        interpret,
        4,
        2,
        off,
        q,
        kc,
        lse,
    )
    nbp = next_pow2(nb)
    rows = max(1, min(16, 8192 // nbp))
    return call(
        functools.partial(
            _select_kernel, rows=rows, nbp=nbp, count=min(block_count, nb), bs=block_size
        ),
        (pl.cdiv(tq, rows), bsz * h),
        jax.ShapeDtypeStruct((bsz, tq, h, block_count), jnp.int32),
        interpret,
        4,
        1,
        off,
        imp,
    )
