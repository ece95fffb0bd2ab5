"""Plain-JAX Native Sparse Attention, variant `videonsa`: the executable specification.

Shapes: q [B, Tq, HQ, D]; k, v [B, Tk, H, D]; gates [B, Tq, HQ]; G = HQ // H (any integer
>= 1); query head h reads KV head h // G. Queries are the contiguous slice of the key sequence that
starts at `q_offset` (a Python int or a traced int32 scalar): query row i sits at absolute position
t = q_offset + i. BS = block_size, S = block_count, W = window_size, NB = ceil(Tk / BS).

Branches (see shared/design/NSA_SEMANTICS.md):
    compression  softmax over mean-pooled blocks that are complete in the past, (n+1)*BS-1 <= t;
    selection    one softmax over the tokens (<= t) of the S blocks chosen by `select_blocks`;
    window       softmax over keys in [t-W+1, t];
    o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa.

All softmax statistics are fp32; outputs have q.dtype. Every branch maps over chunks of queries,
so no [T, T] array is ever built, and each chunk is rematerialized in the backward pass: memory
stays bounded by one chunk's working set plus the inputs. Kernels test against these functions
branch by branch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Offset = int | Array

# Queries per chunk. Selection gathers S*BS keys and values per query and KV head; its chunks are
# small so that the gathered blocks stay in cache (measured fastest on CPU).
CHUNK_SIZE = 256
SELECTION_CHUNK_SIZE = 8


def default_scale(head_dim: int, scale: float | None) -> float:
    """The softmax scale: `scale` if given, else head_dim ** -0.5."""
    return head_dim**-0.5 if scale is None else scale


def _map_query_chunks(fn: Callable[..., Any], q_offset: Offset, chunk_size: int, *xs: Array) -> Any:
    """Applies `fn(positions [C], *chunks)` to consecutive query chunks; concatenates the results.

    Every x in `xs` has the query axis at position 1 ([B, Tq, ...]); so does every output leaf of
    `fn`. The last chunk is zero-padded (padded rows are computed and dropped). Each chunk is
    rematerialized in the backward pass.
    """
    tq = xs[0].shape[1]
    c = min(chunk_size, tq)
    n = -(-tq // c)

    def split(x):
        x = jnp.pad(x, [(0, 0), (0, n * c - tq)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(x.shape[0], n, c, *x.shape[2:]), 1, 0)

    def merge(y):
        y = jnp.moveaxis(y, 0, 1)
        return y.reshape(y.shape[0], n * c, *y.shape[3:])[:, :tq]

    starts = jnp.asarray(q_offset, jnp.int32) + c * jnp.arange(n, dtype=jnp.int32)
    body = jax.checkpoint(
        lambda args: fn(args[0] + jnp.arange(c, dtype=jnp.int32), *args[1:]), prevent_cse=False
    )
    return jax.tree.map(merge, lax.map(body, (starts, *map(split, xs))))


def _group(q: Array, num_kv_heads: int) -> Array:
    """[B, C, HQ, D] -> [B, C, H, G, D]: query heads grouped by the KV head they read."""
    b, c, hq, d = q.shape
    return q.reshape(b, c, num_kv_heads, hq // num_kv_heads, d)


def _masked_softmax(s: Array, mask: Array) -> tuple[Array, Array]:
    """Softmax of fp32 scores over the last axis, restricted to `mask`.

    Returns (probabilities, lse). A row with no allowed entry gets probabilities 0 and lse -inf; its
    gradient is 0, never NaN.
    """
    s = jnp.where(mask, s, -jnp.inf)
    m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(s - m)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    nonempty = denom > 0
    denom = jnp.where(nonempty, denom, 1.0)
    lse = jnp.where(nonempty, m + jnp.log(denom), -jnp.inf)
    return e / denom, lse[..., 0]


def _dot(spec: str, a: Array, b: Array) -> Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def mean_pool(x: Array, block_size: int) -> Array:
    """Means of consecutive blocks along the sequence: [B, T, H, D] -> [B, ceil(T/BS), H, D].

    Blocks are aligned to position 0; the last partial block is divided by its true length. Sums are
    fp32; the result has x.dtype.
    """
    b, t, h, d = x.shape
    nb = -(-t // block_size)
    xp = jnp.pad(x.astype(jnp.float32), [(0, 0), (0, nb * block_size - t), (0, 0), (0, 0)])
    sums = xp.reshape(b, nb, block_size, h, d).sum(axis=2)
    counts = jnp.minimum(block_size, t - block_size * jnp.arange(nb)).astype(jnp.float32)
    return (sums / counts[:, None, None]).astype(x.dtype)


def compression_attention(
    q: Array, kc: Array, vc: Array, *, block_size: int, scale: float, q_offset: Offset = 0
) -> tuple[Array, Array]:
    """Attention over compressed blocks that are complete in the past.

    Args:
        q: [B, Tq, HQ, D] queries.
        kc, vc: [B, NB, H, D] compressed keys and values (`mean_pool` of k and v).
        block_size: BS; query t sees block n iff (n+1)*BS - 1 <= t.
        scale: softmax scale.
        q_offset: absolute position of query row 0.

    Returns:
        o [B, Tq, HQ, D] in q.dtype and lse [B, Tq, HQ] fp32 (natural log). A query with no visible
        block (t < BS-1) gets o = 0 and lse = -inf, as fla's naive reference does.
    """
    b, tq, hq, d = q.shape
    nb, h = kc.shape[1], kc.shape[2]
    blocks = jnp.arange(nb)

    def chunk(pos, qc):
        s = _dot("bchgd,bnhd->bchgn", _group(qc, h), kc) * scale
        visible = (blocks + 1) * block_size - 1 <= pos[:, None]
        p, lse = _masked_softmax(s, visible[None, :, None, None, :])
        o = _dot("bchgn,bnhd->bchgd", p, vc)
        return o.reshape(b, -1, hq, d).astype(q.dtype), lse.reshape(b, -1, hq)

    return _map_query_chunks(chunk, q_offset, CHUNK_SIZE, q)


def select_blocks(
    q: Array,
    kc: Array,
    lse: Array,
    *,
    block_size: int,
    block_count: int,
    scale: float,
    q_offset: Offset = 0,
) -> Array:
    """Top-S key blocks per (query, KV head), fla's `naive_nsa_topk` rule.

    The importance of block n for query t and KV head g is the mean over the G query heads of g of
    the compression probability exp(s - lse) (0 for blocks not complete in the past). Blocks 0,
    cur-1 and cur (cur = t // BS) are forced to importance 1.0; blocks n > cur are never selected.

    Order (deterministic): the S most important blocks, ties at the cut going to the lower block
    index, listed in ascending block index, then -1 padding for unused slots (fewer than S
    candidates). With S < 3 the forced blocks compete on index, so the current block may be dropped;
    use S >= 3. fla's naive top-k picks the same set; its order within the set is torch.topk's,
    which is unspecified for ties (the forced blocks always tie), so compare after sorting.

    Args:
        q: [B, Tq, HQ, D]; kc: [B, NB, H, D]; lse: [B, Tq, HQ] from `compression_attention`.
        block_size, block_count, scale, q_offset: as in `nsa_reference`.

    Returns:
        int32 [B, Tq, H, S] block indices. No gradient flows through the selection.
    """
    q, kc, lse = (lax.stop_gradient(x) for x in (q, kc, lse))
    nb, h = kc.shape[1], kc.shape[2]
    k_top = min(block_count, nb)
    blocks = jnp.arange(nb)

    def chunk(pos, qc, lsec):
        s = _dot("bchgd,bnhd->bchgn", _group(qc, h), kc) * scale
        lsec = _group(lsec[..., None], h)
        visible = ((blocks + 1) * block_size - 1 <= pos[:, None])[None, :, None, None, :]
        p = jnp.where(visible, jnp.exp(s - jnp.where(visible, lsec, 0.0)), 0.0)
        importance = jnp.mean(p, axis=3)  # [B, C, H, NB]
        cur = (pos // block_size)[:, None]
        forced = (blocks == 0) | (blocks == cur - 1) | (blocks == cur)
        importance = jnp.where(forced[None, :, None], 1.0, importance)
        importance = jnp.where((blocks <= cur)[None, :, None], importance, -1.0)
        values, idx = lax.top_k(importance, k_top)
        idx = jnp.sort(jnp.where(values >= 0, idx, nb), axis=-1)
        idx = jnp.where(idx < nb, idx, -1).astype(jnp.int32)
        return jnp.pad(idx, [(0, 0)] * 3 + [(0, block_count - k_top)], constant_values=-1)

    return _map_query_chunks(chunk, q_offset, CHUNK_SIZE, q, lse)


def _to_blocks(x: Array, block_size: int) -> Array:
    """[B, T, H, D] -> [B, H, NB, BS, D], zero-padded to whole blocks."""
    b, t, h, d = x.shape
    nb = -(-t // block_size)
    x = jnp.pad(x, [(0, 0), (0, nb * block_size - t), (0, 0), (0, 0)])
    return x.reshape(b, nb, block_size, h, d).transpose(0, 3, 1, 2, 4)


def selection_attention(
    q: Array,
    k: Array,
    v: Array,
    block_indices: Array,
    *,
    block_size: int,
    scale: float,
    q_offset: Offset = 0,
) -> Array:
    """One softmax over the union of the tokens of the selected blocks, causal at token level.

    Args:
        q: [B, Tq, HQ, D]; k, v: [B, Tk, H, D].
        block_indices: int [B, Tq, H, S] distinct block indices per row; -1 slots are ignored.
        block_size, scale, q_offset: as in `nsa_reference`.

    Returns:
        o [B, Tq, HQ, D] in q.dtype: query t attends keys j in the selected blocks with j <= t. A
        row with no such key gets 0 (fla's naive reference gives NaN; `select_blocks` never makes
        one).
    """
    b, tq, hq, d = q.shape
    tk, h = k.shape[1], k.shape[2]
    kb, vb = _to_blocks(k, block_size), _to_blocks(v, block_size)
    nb = kb.shape[2]
    b_ix = jnp.arange(b)[:, None, None, None]
    h_ix = jnp.arange(h)[None, None, :, None]

    def chunk(pos, qc, idx):
        safe = jnp.clip(idx, 0, nb - 1)
        kg, vg = kb[b_ix, h_ix, safe], vb[b_ix, h_ix, safe]  # [B, C, H, S, BS, D]
        c, s_ = idx.shape[1], idx.shape[3]
        kg, vg = (x.reshape(b, c, h, s_ * block_size, d) for x in (kg, vg))
        key_pos = (idx[..., None] * block_size + jnp.arange(block_size)).reshape(b, c, h, -1)
        mask = (
            (jnp.repeat(idx, block_size, axis=-1) >= 0)
            & (key_pos <= pos[None, :, None, None])
            & (key_pos < tk)
        )
        s = _dot("bchgd,bchmd->bchgm", _group(qc, h), kg) * scale
        p, _ = _masked_softmax(s, mask[:, :, :, None, :])
        return _dot("bchgm,bchmd->bchgd", p, vg).reshape(b, c, hq, d).astype(q.dtype)

    return _map_query_chunks(chunk, q_offset, SELECTION_CHUNK_SIZE, q, block_indices)


def sliding_window_attention(
    q: Array, k: Array, v: Array, *, window_size: int, scale: float, q_offset: Offset = 0
) -> Array:
    """Causal attention over the last W keys: query t sees keys j in [t-W+1, t].

    Args:
        q: [B, Tq, HQ, D]; k, v: [B, Tk, H, D].
        window_size: W >= 1.
        scale, q_offset: as in `nsa_reference`.

    Returns:
        o [B, Tq, HQ, D] in q.dtype.
    """
    b, tq, hq, d = q.shape
    tk, h = k.shape[1], k.shape[2]
    c = min(CHUNK_SIZE, tq)
    span = c + window_size - 1
    # Pad so that every chunk's key span [pos[0] - W + 1, pos[0] + C - 1] is a slice of kp.
    pad = [(0, 0), (window_size - 1, c), (0, 0), (0, 0)]
    kp, vp = jnp.pad(k, pad), jnp.pad(v, pad)

    def chunk(pos, qc):
        kw, vw = (lax.dynamic_slice_in_dim(x, pos[0], span, axis=1) for x in (kp, vp))
        key_pos = pos[0] - (window_size - 1) + jnp.arange(span)
        t = pos[:, None]
        mask = (key_pos <= t) & (key_pos > t - window_size) & (key_pos >= 0) & (key_pos < tk)
        s = _dot("bchgd,blhd->bchgl", _group(qc, h), kw) * scale
        p, _ = _masked_softmax(s, mask[None, :, None, None, :])
        return _dot("bchgl,blhd->bchgd", p, vw).reshape(b, -1, hq, d).astype(q.dtype)

    return _map_query_chunks(chunk, q_offset, c, q)


def combine(
    o_cmp: Array, o_slc: Array, o_swa: Array, g_cmp: Array, g_slc: Array, g_swa: Array
) -> Array:
    """g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa in fp32, returned in o_cmp.dtype."""
    terms = [
        g.astype(jnp.float32)[..., None] * o.astype(jnp.float32)
        for o, g in ((o_cmp, g_cmp), (o_slc, g_slc), (o_swa, g_swa))
    ]
    return (terms[0] + terms[1] + terms[2]).astype(o_cmp.dtype)


@functools.partial(
    jax.jit,
    static_argnames=("block_size", "block_count", "window_size", "scale", "return_block_indices"),
)
def nsa_reference(
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
    q_offset: Offset = 0,
    return_block_indices: bool = False,
) -> Array | tuple[Array, Array]:
    """Native Sparse Attention, variant `videonsa`.

    Args:
        q: [B, Tq, HQ, D] queries at absolute positions q_offset + i.
        k, v: [B, Tk, H, D] keys and values for positions 0..Tk-1, HQ % H == 0.
        g_cmp, g_slc, g_swa: [B, Tq, HQ] gates, already in (0, 1).
        block_size: BS, the compression and selection block size.
        block_count: S, blocks selected per query and KV head.
        window_size: W, the sliding window length.
        scale: softmax scale; D ** -0.5 if None.
        q_offset: absolute position of query row 0 (int or traced int32 scalar).
        return_block_indices: also return the selection from `select_blocks`.

    Returns:
        o [B, Tq, HQ, D] in q.dtype, and int32 block indices [B, Tq, H, S] if requested.
    """
    scale = default_scale(q.shape[-1], scale)
    kc, vc = mean_pool(k, block_size), mean_pool(v, block_size)
    o_cmp, lse = compression_attention(
        q, kc, vc, block_size=block_size, scale=scale, q_offset=q_offset
    )
    block_indices = select_blocks(
        q,
        kc,
        lse,
        block_size=block_size,
        block_count=block_count,
        scale=scale,
        q_offset=q_offset,
    )
    o_slc = selection_attention(
        q, k, v, block_indices, block_size=block_size, scale=scale, q_offset=q_offset
    )
    o_swa = sliding_window_attention(
        q, k, v, window_size=window_size, scale=scale, q_offset=q_offset
    )
    o = combine(o_cmp, o_slc, o_swa, g_cmp, g_slc, g_swa)
    return (o, block_indices) if return_block_indices else o
