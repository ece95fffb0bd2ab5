"""Sequence (context) parallelism: activations split along the sequence over the `context` axis.

The decoder's activations [B, T, hidden] are sharded [batch, context, -]; every per-token op (norms,
projections, MLP, gates, RoPE) then runs on each device's T / context rows without communication.
Attention is the one op that mixes rows; `hybrid_attention` (VideoNSA) and `dense_attention` wrap it
in a `shard_map` over the whole mesh:

    1. all-gather K and V (and the key validity) over `context`: every shard sees all keys;
    2. NSA for the shard's own queries through `pallas_kernels.nsa.nsa` with
       `q_offset = axis_index("context") * T_local`: block indices, causal limits and the sliding
       window's left halo are global positions, and the halo comes from the gathered K/V. The
       compressed KV is the mean pool of the gathered K/V: the same values as pooling each shard
       locally and all-gathering (shards are block aligned), without a second collective;
    3. text rows (dense branch): each shard contributes its text rows' queries (an all-gather of
       [B, n, HQ, D]), computes dense attention over the gathered K/V for 1/context of the text
       rows, and the outputs are all-gathered back and written into the rows each shard owns.

No [T, T] array is built. The backward pass of each all-gather is a reduce-scatter (autodiff).
Batch axes (`data`, `fsdp`) and heads (`tensor`, when the KV heads divide) stay split inside.

Sequence length: the shards must have equal length, so `pad_inputs` right-pads the decoder inputs
on the device to a multiple of context * block_size (padded tokens have attention_mask 0, so they
are invalid keys for the dense rows, and they come after every real token, so causal NSA never
reads them for a real query) and the model slices the output back. Pick `data.max_length` as such
a multiple to make the padding a no-op.

The vision tower's attention groups (windows, frames) are independent: `shard_leading` splits its
patch rows and its groups over the non-tensor mesh axes.

The mesh is found through JAX's abstract mesh (`use_mesh` / `with_mesh` set it while a step is
traced); without one, or with context = 1, every function here is the identity or the plain path.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.nsa import nsa
from videonsa_jax.model import attention as attention_lib

CONTEXT = "context"
BATCH_AXES = ("data", "fsdp")
TENSOR = "tensor"

Array = jax.Array


# -- the mesh --------------------------------------------------------------------------------------


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh) -> Iterator[None]:
    """Makes `mesh` the abstract mesh of everything traced inside (jit tracing included)."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        yield


def with_mesh(fn: Callable[..., Any], mesh: jax.sharding.Mesh) -> Callable[..., Any]:
    """`fn` traced under `use_mesh(mesh)`: wrap a step function before `jax.jit`."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with use_mesh(mesh):
            return fn(*args, **kwargs)

    return wrapped


def current_mesh() -> jax.sharding.AbstractMesh | None:
    """The abstract mesh being traced under, or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def context_size() -> int:
    """Size of the `context` axis of the current mesh (1 without a mesh)."""
    mesh = current_mesh()
    return 1 if mesh is None else dict(mesh.shape).get(CONTEXT, 1)


def _axes_dividing(mesh, names: Sequence[str], size: int) -> tuple[str, ...] | None:
    """The axes of `names` larger than 1 whose product divides `size` (dropped from the end)."""
    axes = [a for a in names if dict(mesh.shape).get(a, 1) > 1]
    while axes and size % math.prod(mesh.shape[a] for a in axes):
        axes.pop()
    return tuple(axes) or None


def _head_axis(mesh, num_heads: int, num_kv_heads: int) -> str | None:
    tensor = dict(mesh.shape).get(TENSOR, 1)
    ok = tensor > 1 and num_heads % tensor == 0 and num_kv_heads % tensor == 0
    return TENSOR if ok else None


def per_device(
    fn: Callable[..., Any],
    args: Sequence[Any],
    roles: Sequence[str],
    out_roles: Any,
    heads: tuple[int, int],
) -> Any:
    """fn(*args) on each device's shard of the current mesh (plain fn(*args) without one).

    XLA does not partition custom calls such as the Pallas kernels: under a sharded jit it would
    all-gather their operands and every device would compute the whole batch. Here each array is
    split over its batch dim (the `data` / `fsdp` axes that divide args[0]'s leading dim) and its
    heads dim (`tensor`, when it divides both `heads` = (query heads, KV heads)).

    roles: one string per arg (and the same tree as fn's result for out_roles), one letter per
    dim: "b" batch, "h" heads, any other letter unsplit; "" for a replicated scalar.
    """
    mesh = current_mesh()
    if mesh is None or math.prod(dict(mesh.shape).values()) == 1:
        return fn(*args)
    batch = _axes_dividing(mesh, BATCH_AXES, args[0].shape[0])
    head = _head_axis(mesh, *heads)

    def spec(role: str) -> P:
        return P(*(batch if c == "b" else head if c == "h" else None for c in role))

    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=tuple(spec(r) for r in roles),
        out_specs=jax.tree.map(spec, out_roles),
        check_vma=False,
    )(*args)


# -- decoder inputs --------------------------------------------------------------------------------


def padded_length(length: int, block_size: int) -> int:
    """`length` rounded up to a multiple of context * block_size (unchanged without context)."""
    cp = context_size()
    if cp == 1:
        return length
    multiple = cp * block_size
    return -(-length // multiple) * multiple


def pad_inputs(
    embeds: Array, positions: Array, mask: Array, vision_mask: Array, text_rows: Array | None,
    length: int,
) -> tuple[Array, Array, Array, Array, Array | None]:  # fmt: skip
    """Right-pads the decoder inputs to `length` tokens and splits them along the sequence.

    Args:
        embeds: [B, T, hidden]; positions: [3, B, T]; mask: [B, T] bool key validity;
        vision_mask: [B, T] bool; text_rows: [B, n] rows padded with T, or None.
        length: the padded length T' >= T (`padded_length`).

    Returns:
        The same arrays with T' tokens: padded tokens are invalid (mask False), not vision, at
        positions 0; text_rows padding becomes T'. embeds are constrained to [batch, context, -].
    """
    b, t, _ = embeds.shape
    pad = length - t
    if pad:
        embeds = jnp.pad(embeds, ((0, 0), (0, pad), (0, 0)))
        positions = jnp.pad(positions, ((0, 0), (0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
        vision_mask = jnp.pad(vision_mask, ((0, 0), (0, pad)))
        if text_rows is not None:
            text_rows = jnp.where(text_rows >= t, length, text_rows)
    return shard_sequence(embeds), positions, mask, vision_mask, text_rows


def shard_sequence(x: Array) -> Array:
    """Constrains x [B, T, ...] to batch over (data, fsdp) and sequence over context."""
    mesh = current_mesh()
    if mesh is None or context_size() == 1:
        return x
    spec = P(_axes_dividing(mesh, BATCH_AXES, x.shape[0]), CONTEXT)
    return lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def shard_leading(x: Array) -> Array:
    """Constrains the leading axis of x (ViT patch rows or attention groups) over the non-tensor
    mesh axes that divide it; the identity without a mesh."""
    mesh = current_mesh()
    if mesh is None:
        return x
    axes = _axes_dividing(mesh, (*BATCH_AXES, CONTEXT), x.shape[0])
    if axes is None:
        return x
    return lax.with_sharding_constraint(x, NamedSharding(mesh, P(axes)))


# -- attention -------------------------------------------------------------------------------------


def _gather(x: Array) -> Array:
    return lax.all_gather(x, CONTEXT, axis=1, tiled=True)


def _text_rows_attention(
    q: Array, k: Array, v: Array, kv_valid: Array, rows: Array, offset: Array, cp: int
) -> tuple[Array, Array]:
    """Inside the shard_map: dense attention of the text rows, split over the context shards.

    Args:
        q: [B, Tl, HQ, D] local queries; k, v: [B, T, H, D] gathered; kv_valid [B, T] gathered.
        rows: [B, n] global text rows (n a multiple of context; >= T is padding).
        offset: global position of local row 0; cp: the context size.

    Returns:
        ([B, n, HQ, D] dense outputs of all text rows, [B, n] their local row or Tl if not here).
    """
    tl = q.shape[1]
    local = rows - offset
    here = (local >= 0) & (local < tl)
    local = jnp.where(here, local, tl)
    q_sel = jnp.take_along_axis(q, jnp.minimum(local, tl - 1)[:, :, None, None], axis=1)
    q_sel = jnp.where(here[:, :, None, None], q_sel, jnp.zeros_like(q_sel))
    q_text = jnp.sum(lax.all_gather(q_sel, CONTEXT, axis=0), axis=0)  # every text row's query
    share = rows.shape[1] // cp
    start = lax.axis_index(CONTEXT) * share
    q_mine = lax.dynamic_slice_in_dim(q_text, start, share, axis=1)
    rows_mine = lax.dynamic_slice_in_dim(rows, start, share, axis=1)
    out = attention_lib.rows_attention(q_mine, k, v, rows_mine, kv_valid)
    return _gather(out), local


def _scatter(out: Array, rows: Array, values: Array) -> Array:
    """out[b, rows[b, i]] = values[b, i]; rows >= out.shape[1] are dropped."""
    b_ix = jnp.arange(out.shape[0])[:, None]
    return out.at[b_ix, rows].set(values.astype(out.dtype), mode="drop")


def _check(q: Array, k: Array) -> int:
    cp = context_size()
    if q.shape[1] != k.shape[1] or q.shape[1] % cp:
        raise ValueError(
            f"context parallelism needs T queries = T keys, a multiple of context={cp}; got "
            f"{q.shape[1]} queries, {k.shape[1]} keys (pad with `pad_inputs`; no KV cache)"
        )
    return cp


def hybrid_attention(
    q: Array,
    k: Array,
    v: Array,
    gates: Array,
    text_rows: Array,
    kv_valid: Array,
    *,
    block_size: int,
    block_count: int,
    window_size: int,
    impl: str = "auto",
) -> tuple[Array, Array]:
    """VideoNSA attention ("videonsa" kind) with the sequence split over `context`.

    Every row gets NSA; the rows in `text_rows` are then replaced by dense causal attention.

    Args:
        q: [B, T, HQ, D]; k, v: [B, T, H, D] (post-RoPE, no KV cache).
        gates: [B, T, HQ, 3] branch gates (cmp, slc, swa) in (0, 1).
        text_rows: int [B, n] dense-branch rows, padded with values >= T.
        kv_valid: [B, T] bool key validity.
        block_size, block_count, window_size, impl: the NSA hyperparameters (`nsa`).

    Returns:
        (o [B, T, HQ, D] in q.dtype, int32 block indices [B, T, H, block_count]).
    """
    mesh = current_mesh()
    cp = _check(q, k)
    b, t, hq, _ = q.shape
    batch = _axes_dividing(mesh, BATCH_AXES, b)
    head = _head_axis(mesh, hq, k.shape[2])
    n = text_rows.shape[1]
    text_rows = jnp.pad(text_rows, ((0, 0), (0, -(-n // cp) * cp - n)), constant_values=t)

    def body(q, k, v, gates, rows, valid):
        offset = lax.axis_index(CONTEXT) * q.shape[1]
        k, v, valid = _gather(k), _gather(v), _gather(valid)
        o, block_indices = nsa(
            q, k, v, gates[..., 0], gates[..., 1], gates[..., 2],
            block_size=block_size, block_count=block_count, window_size=window_size,
            impl=impl, return_block_indices=True, q_offset=offset,
        )  # fmt: skip
        dense, local = _text_rows_attention(q, k, v, valid, rows, offset, cp)
        return _scatter(o, local, dense), block_indices

    rows_spec = P(batch, CONTEXT, head, None)
    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(rows_spec,) * 4 + (P(batch, None), P(batch, CONTEXT)),
        out_specs=(rows_spec, rows_spec),
        check_vma=False,
    )
    return fn(q, k, v, gates, text_rows, kv_valid)


def dense_attention(q: Array, k: Array, v: Array, kv_valid: Array) -> Array:
    """Causal GQA ("dense" kind) with the sequence split over `context`: q [B, T, HQ, D],
    k, v [B, T, H, D], kv_valid [B, T] -> [B, T, HQ, D].

    Each shard's queries (rows offset .. offset + T/c - 1) attend the gathered keys through
    `rows_attention`: the Pallas flash kernel on GPU (cuDNN takes no query offset), the chunked XLA
    attention elsewhere."""
    mesh = current_mesh()
    _check(q, k)
    batch = _axes_dividing(mesh, BATCH_AXES, q.shape[0])
    rows_spec = P(batch, CONTEXT, _head_axis(mesh, q.shape[2], k.shape[2]), None)

    def body(q, k, v, valid):
        b, tl = q.shape[:2]
        q_index = lax.axis_index(CONTEXT) * tl + jnp.arange(tl, dtype=jnp.int32)
        q_index = jnp.broadcast_to(q_index, (b, tl))
        return attention_lib.rows_attention(q, _gather(k), _gather(v), q_index, _gather(valid))

    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(rows_spec,) * 3 + (P(batch, CONTEXT),),
        out_specs=rows_spec,
        check_vma=False,
    )
    return fn(q, k, v, kv_valid)
