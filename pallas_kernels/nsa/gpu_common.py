"""Shared pieces of the NSA Pallas-Triton kernels: packed GQA rows and launch helpers.

Packed GQA rows: the G query heads of one KV head h are stacked with the tokens, row r of a tile
being (token tile_start + r // G, query head h*G + r % G). A tile of R rows (R a power of two) holds
R // G whole tokens, so no head is padded and only R % G rows of a tile idle. Rows are read and
written straight from/to the [B, T, HQ, D] arrays with gathered (row-wise contiguous) addresses, so
no transpose is needed. Pallas switches the address arithmetic to int64 when an array exceeds 4 GiB.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

Array = jax.Array

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
NEG = -1e30  # finite "minus infinity" for masked scores


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def packed_rows(tile: Array, rows: int, g: int, tq: int, h: Array) -> tuple[Array, Array, Array]:
    """Rows of one packed tile: (query index [R], query head [R], valid [R]).

    Invalid rows get query index `tq` (out of bounds: masked loads skip it, interpret-mode gathers
    clamp it and scatters drop it).
    """
    tokens = rows // g
    r = jnp.arange(rows, dtype=jnp.int32)
    tok = tile * tokens + r // g
    valid = (r < tokens * g) & (tok < tq)
    return jnp.where(valid, tok, tq), h * g + r % g, valid


def load_rows(ref, b: Array, tok: Array, head: Array, valid: Array, other=0.0) -> Array:
    """Gathers rows ref[b, tok[r], head[r], :] -> [R, D] (masked rows = `other`)."""
    d = jnp.arange(ref.shape[-1], dtype=jnp.int32)
    return plgpu.load(
        ref.at[b, tok[:, None], head[:, None], d[None, :]], mask=valid[:, None], other=other
    )


def store_rows(ref, b: Array, tok: Array, head: Array, valid: Array, x: Array) -> None:
    """Scatters x [R, D] to ref[b, tok[r], head[r], :] for valid rows."""
    d = jnp.arange(ref.shape[-1], dtype=jnp.int32)
    plgpu.store(
        ref.at[b, tok[:, None], head[:, None], d[None, :]], x.astype(ref.dtype), mask=valid[:, None]
    )


def load_stat(ref, b: Array, tok: Array, head: Array, valid: Array) -> Array:
    """Gathers a per-row fp32 statistic ref[b, tok[r], head[r]] -> [R]."""
    return plgpu.load(ref.at[b, tok, head], mask=valid, other=0.0)


def load_grad_rows(
    q_ref, do_ref, lse_ref, dl_ref, b: Array, tok: Array, head: Array, valid: Array
) -> tuple[Array, Array, Array, Array]:
    """What a backward step gathers per packed row: q, do [R, D]; lse in log2 units and
    delta = rowsum(o * do), [R, 1] fp32 (masked rows: zeros)."""
    q = load_rows(q_ref, b, tok, head, valid)
    do = load_rows(do_ref, b, tok, head, valid)
    lse2 = (load_stat(lse_ref, b, tok, head, valid) * LOG2E)[:, None]
    delta = load_stat(dl_ref, b, tok, head, valid)[:, None]
    return q, do, lse2, delta


def store_stat(ref, b: Array, tok: Array, head: Array, valid: Array, x: Array) -> None:
    plgpu.store(ref.at[b, tok, head], x.astype(ref.dtype), mask=valid)


def load_block(ref, b: Array, start: Array, size: int, h: Array, n_valid: Array | None) -> Array:
    """ref[b, start:start+size, h, :] with rows outside [0, n_valid) read as 0 -> [size, D];
    n_valid None: the caller guarantees all rows are in bounds (no mask)."""
    if n_valid is None:
        return plgpu.load(ref.at[b, pl.ds(start, size), h, :])
    pos = start + jnp.arange(size, dtype=jnp.int32)
    mask = (pos >= 0) & (pos < n_valid)
    return plgpu.load(ref.at[b, pl.ds(start, size), h, :], mask=mask[:, None], other=0.0)


def call(
    kernel,
    grid,
    out_shape,
    interpret: bool,
    num_warps: int,
    num_stages: int,
    *args,
    aliases: dict[int, int] | None = None,
):
    """pallas_call with whole-array refs (the kernels index them themselves); aliases: input
    index -> output index updated in place."""
    return pl.pallas_call(
        kernel,
        grid=grid,
        out_shape=out_shape,
        interpret=interpret,
        input_output_aliases=aliases or {},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    )(*args)


def dot(a: Array, b: Array, trans_a: bool = False, trans_b: bool = False) -> Array:
    """fp32-accumulated dot; fp32 operands use full fp32 precision (no tf32)."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)
