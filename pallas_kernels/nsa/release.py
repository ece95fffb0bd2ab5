"""Variant `videonsa_release`: NSA exactly as the released VideoNSA checkpoint computes it.

The released model (see shared/research/qwen25vl_videonsa_spec.md §5.4-§5.5) runs NSA on 64 query
slots [28 heads | the same 28 heads | 8 zero heads] over 4 KV heads (slot j reads KV head j // 16)
and differs from the `videonsa` variant (`reference.py`) in four places:
  * compression mask t <= (n+1)*BS - 1: each query sees the current and all later blocks;
  * top-k (fla's old kernel): candidates are the complete past blocks plus the current block, forced
    to probability 1.0 (no forced first block); importance is the *sum* over the G slots of
    exp(s - lse_used), where lse_used is the compression lse read from a [B, HQ, T] buffer as if
    it were [B, T, HQ]; ties are broken by fla's bitonic sorting network (ported below); S is
    rounded up to a power of two;
  * scores for top-k and selection use q pre-scaled and rounded to q.dtype;
  * the gated sum is taken in q.dtype.
Selection and the sliding window are otherwise the `videonsa` ones. The model (not this module)
zeroes text rows of q, k, v, zeroes text-row gate logits and adds the dense branch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.nsa import reference
from pallas_kernels.nsa.reference import _dot, _group, _map_query_chunks, _masked_softmax

Array = jax.Array

NUM_SLOTS = 64


def pad_heads(x: Array, num_slots: int = NUM_SLOTS) -> Array:
    """[B, T, N, ...] -> [B, T, num_slots, ...] laid out as [x | x | zeros] along axis 2."""
    n = x.shape[2]
    zeros = jnp.zeros((*x.shape[:2], num_slots - 2 * n, *x.shape[3:]), x.dtype)
    return jnp.concatenate([x, x, zeros], axis=2)


def merge_heads(o: Array, num_heads: int) -> Array:
    """[B, T, slots, D] -> [B, T, num_heads, D]: 0.5 * (slot h + slot num_heads + h), in o.dtype."""
    return (o[:, :, :num_heads] + o[:, :, num_heads : 2 * num_heads]) * jnp.asarray(0.5, o.dtype)


def compression_attention(
    q: Array, kc: Array, vc: Array, *, block_size: int, scale: float
) -> tuple[Array, Array]:
    """Attention over compressed blocks with the released anti-causal mask t <= (n+1)*BS - 1.

    Query t sees blocks n >= t // BS (always at least one).

    Args:
        q: [B, T, HQ, D]; kc, vc: [B, NB, H, D] from `reference.mean_pool`.

    Returns:
        o [B, T, HQ, D] in q.dtype and the true lse [B, T, HQ] fp32 (natural log).
    """
    b, t, hq, d = q.shape
    nb, h = kc.shape[1], kc.shape[2]
    blocks = jnp.arange(nb)

    def chunk(pos, qc):
        s = _dot("bchgd,bnhd->bchgn", _group(qc, h), kc) * scale
        visible = pos[:, None] <= (blocks + 1) * block_size - 1
        p, lse = _masked_softmax(s, visible[None, :, None, None, :])
        o = _dot("bchgn,bnhd->bchgd", p, vc)
        return o.reshape(b, -1, hq, d).astype(q.dtype), lse.reshape(b, -1, hq)

    return _map_query_chunks(chunk, 0, reference.CHUNK_SIZE, q)


def misread_lse(lse: Array) -> Array:
    """The lse values the released top-k kernel reads (both [B, T, HQ]).

    The compression kernel writes lse as a contiguous [B, HQ, T] buffer; the top-k kernel indexes it
    as [B, T, HQ]: lse_used[b, i, j] = lse[b].T.reshape(-1)[i * HQ + j].
    """
    b, t, hq = lse.shape
    return jnp.transpose(lse, (0, 2, 1)).reshape(b, t, hq)


def _compare_and_swap(x: Array, ids: Array, flip: Array, i: int, n_dims: int):
    """fla's `_compare_and_swap` along axis 0 (2**n_dims long), bit for bit.

    Pairs elements whose positions differ in bit n_dims-i-1; swaps a pair (values and ids) where
    (left > right) != flip. Left/right are the kernel's masked sums (a*1 + b*0, a*0 + b*1) and the
    swap is the kernel's XOR on the bit patterns, so inf/NaN behave as they do on the GPU.
    """
    shape = (2**i, 2, 2 ** (n_dims - i - 1), *x.shape[1:])

    def halves(y):
        y = y.reshape(shape)
        a, b = y[:, 0], y[:, 1]
        return tuple(jnp.stack([z, z], axis=1).reshape(x.shape) for z in (a * 1 + b * 0, a * 0 + b))

    left, right = halves(x)
    left_id, right_id = halves(ids)
    bits = functools.partial(lax.bitcast_convert_type, new_dtype=jnp.int32)
    cond = (left > right) != flip
    swapped = bits(x) ^ jnp.where(cond, bits(left) ^ bits(right), 0)
    new_ids = ids ^ jnp.where(cond, left_id ^ right_id, 0)
    return lax.bitcast_convert_type(swapped, jnp.float32), new_ids


def _bitonic_merge(x: Array, ids: Array, stage: int, order: bool | int, n_dims: int):
    """fla's `_bitonic_merge` on axis 0; order 2 alternates by bit `stage`, False/True: asc/desc."""
    if order == 2:
        flip = ((jnp.arange(2**n_dims) >> stage) & 1).astype(bool)
        flip = flip.reshape(-1, *([1] * (x.ndim - 1)))
    else:
        flip = jnp.asarray(bool(order))
    for i in range(stage):
        x, ids = _compare_and_swap(x, ids, flip, i + n_dims - stage, n_dims)
    return x, ids


def bitonic_topk(importance: Array, cur: Array, *, num_selected: int, chunk_size: int) -> Array:
    """The released top-k: fla's chunked bitonic sort over block importances, ported exactly.

    Blocks are visited in chunks of `chunk_size` (= block_size in the kernel) up to the chunk that
    holds block `cur`; each chunk is sorted, its top half merged with the running top half, and the
    first `num_selected` ids of the final descending order are returned. Blocks n > cur carry id -1.

    Args:
        importance: fp32 [..., NB] importance per block, as the kernel computes it (0 for n > cur).
        cur: int [...] the query's block t // BS.
        num_selected: S, a power of two <= chunk_size.
        chunk_size: BC, a power of two.

    Returns:
        int32 [..., S] block indices in the network's order; -1 for unused slots.
    """
    nb = importance.shape[-1]
    n_dims = chunk_size.bit_length() - 1
    n_chunks = -(-nb // chunk_size)
    # Network axis first, then the rows: [n_chunks, BC, ...]; ops then run over contiguous rows.
    importance = jnp.pad(
        importance.astype(jnp.float32),
        [(0, 0)] * (importance.ndim - 1) + [(0, n_chunks * chunk_size - nb)],
    )
    importance = jnp.moveaxis(
        importance.reshape(*cur.shape, n_chunks, chunk_size), (-2, -1), (0, 1)
    )
    top_half = (jnp.arange(chunk_size) < chunk_size // 2).reshape(-1, *([1] * cur.ndim))
    lane = jnp.arange(chunk_size).reshape(top_half.shape)

    def sort_chunk(c, b_i):
        blocks = c * chunk_size + lane
        o_i = jnp.where(blocks <= cur, blocks + 1, 0).astype(jnp.int32)
        for stage in range(1, n_dims):
            b_i, o_i = _bitonic_merge(b_i, o_i, stage, 2, n_dims)
        return b_i, o_i

    def merge_chunk(state, xs):
        c, b_i = xs
        b_prev, o_prev = state
        b_i, o_i = sort_chunk(c, b_i)
        b_i, o_i = _bitonic_merge(b_i, o_i, n_dims, False, n_dims)
        b_i = b_prev * top_half + b_i * (1 - top_half)
        o_i = o_prev * top_half + o_i * (1 - top_half)
        b_i, o_i = _bitonic_merge(b_i, o_i, n_dims, True, n_dims)
        active = c * chunk_size <= cur  # the kernel loops over range(0, cur + 1, BC)
        return (jnp.where(active, b_i, b_prev), jnp.where(active, o_i, o_prev)), None

    state = _bitonic_merge(*sort_chunk(0, importance[0]), n_dims, True, n_dims)
    (_, o_i), _ = lax.scan(merge_chunk, state, (jnp.arange(1, n_chunks), importance[1:]))
    return jnp.moveaxis(o_i[:num_selected] - 1, 0, -1)


def select_blocks(
    q: Array, kc: Array, lse_used: Array, *, block_size: int, block_count: int, scale: float
) -> Array:
    """The released top-k selection (fla's old `parallel_nsa_topk` kernel).

    For query t, KV head g, cur = t // BS: p_h(n) = 1 for n == cur, exp(s_h(n) - lse_used[t, h]) for
    n < cur, 0 for n > cur; importance(n) = sum of p_h over the G heads of g, with
    s = (q * scale rounded to q.dtype) . kc in fp32. The top S' = next_pow2(block_count) blocks are
    chosen by `bitonic_topk`.

    Args:
        q: [B, T, HQ, D]; kc: [B, NB, H, D]; lse_used: [B, T, HQ] (`misread_lse` of the true lse).
        block_size: BS, also the kernel's chunk width; a power of two >= S'.

    Returns:
        int32 [B, T, H, S'] block indices (network order, -1 for unused slots). No gradient.
    """
    num_selected = 1 << (block_count - 1).bit_length()
    if block_size & (block_size - 1) or block_size < num_selected:
        raise ValueError(
            f"block_size ({block_size}) must be a power of two >= next_pow2(block_count) "
            f"({num_selected})"
        )
    q, kc, lse_used = (lax.stop_gradient(x) for x in (q, kc, lse_used))
    qs = (q * scale).astype(q.dtype)
    nb, h = kc.shape[1], kc.shape[2]
    blocks = jnp.arange(nb)

    def chunk(pos, qc, lsec):
        s = _dot("bchgd,bnhd->bchgn", _group(qc, h), kc)
        cur = (pos // block_size)[None, :, None]
        past = (blocks < pos[:, None] // block_size)[None, :, None, None, :]
        current = (blocks == pos[:, None] // block_size)[None, :, None, None, :]
        p = jnp.where(
            current, 1.0, jnp.exp(jnp.where(past, s, -jnp.inf) - _group(lsec[..., None], h))
        )
        importance = jnp.sum(p, axis=3)  # [B, C, H, NB]
        cur = jnp.broadcast_to(cur, importance.shape[:-1])
        return bitonic_topk(importance, cur, num_selected=num_selected, chunk_size=block_size)

    return _map_query_chunks(chunk, 0, reference.CHUNK_SIZE, qs, lse_used)


@functools.partial(
    jax.jit,
    static_argnames=("block_size", "block_count", "window_size", "scale", "return_block_indices"),
)
def videonsa_release_nsa(
    q64: Array,
    k: Array,
    v: Array,
    g_cmp64: Array,
    g_slc64: Array,
    g_swa64: Array,
    *,
    block_size: int,
    block_count: int,
    window_size: int,
    scale: float | None = None,
    return_block_indices: bool = False,
) -> Array | tuple[Array, Array]:
    """The released model's NSA on padded query slots (the `nsa_func` call of a VideoNSA layer).

    Args:
        q64: [B, T, HQ, D] query slots (HQ = 64 in the release, from `pad_heads`); slot j reads KV
            head j // (HQ // H).
        k, v: [B, T, H, D].
        g_cmp64, g_slc64, g_swa64: [B, T, HQ] gates (from `pad_heads`).
        block_size, block_count, window_size: 64, 32, 256 in the release.
        scale: D ** -0.5 if None (the release always uses the default).
        return_block_indices: also return the int32 [B, T, H, next_pow2(block_count)] selection.

    Returns:
        o [B, T, HQ, D] in q64.dtype (use `merge_heads` to get the real heads back).
    """
    scale = reference.default_scale(q64.shape[-1], scale)
    kc, vc = reference.mean_pool(k, block_size), reference.mean_pool(v, block_size)
    o_cmp, lse = compression_attention(q64, kc, vc, block_size=block_size, scale=scale)
    block_indices = select_blocks(
        q64, kc, misread_lse(lse), block_size=block_size, block_count=block_count, scale=scale
    )
    qs = (q64 * scale).astype(q64.dtype)
    o_slc = reference.selection_attention(qs, k, v, block_indices, block_size=block_size, scale=1.0)
    o_swa = reference.sliding_window_attention(q64, k, v, window_size=window_size, scale=scale)
    dtype = q64.dtype
    o = (
        o_cmp * g_cmp64.astype(dtype)[..., None]
        + o_slc * g_slc64.astype(dtype)[..., None]
        + o_swa * g_swa64.astype(dtype)[..., None]
    )
    return (o, block_indices) if return_block_indices else o
