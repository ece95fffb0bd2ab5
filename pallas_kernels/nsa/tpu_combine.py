"""Gated combine of the three NSA branches on TPU (Mosaic), with its custom_vjp.

    o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa        (fp32 math, o in o_cmp.dtype)
    backward: do_x = g_x * do,  dg_x = sum_d(do * o_x)

Layout as `tpu_attention`: o_x [B, H, R, D], gates [B, H, R, 1] with R = Tqp*G rows. Grid
(B, H, R / TR), all "parallel", TR = the attention kernels' query-tile rows (a multiple of 8).
VMEM: forward 4 [TR, D] tiles + 3 [TR, 1] gates, double-buffered: ~1 MiB at TR = 256, D = 128,
bf16; backward 4 + 3 tiles in, 3 + 3 out: ~2 MiB (any T, any chip).
Roofline at T = 128K, HQ = 28, D = 128, bf16: pure HBM traffic. Forward reads 3 branch outputs and
writes o: 4 * 0.92 GB = 3.7 GB -> 4.5 / 1.5 / 2.2 ms on v5e / v5p / v6e; backward ~6.5 GB ->
7.9 / 2.6 / 4.0 ms. (Fusing it into the selection kernel's epilogue would save two of the four
streams; kept separate so that each attention kernel stays one branch.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

Array = jax.Array


def _fwd_kernel(oc_ref, os_ref, ow_ref, gc_ref, gs_ref, gw_ref, o_ref):
    acc = gc_ref[...].astype(jnp.float32) * oc_ref[...].astype(jnp.float32)
    acc += gs_ref[...].astype(jnp.float32) * os_ref[...].astype(jnp.float32)
    acc += gw_ref[...].astype(jnp.float32) * ow_ref[...].astype(jnp.float32)
    o_ref[...] = acc.astype(o_ref.dtype)


def _bwd_kernel(oc_ref, os_ref, ow_ref, gc_ref, gs_ref, gw_ref, do_ref, *out_refs):
    do = do_ref[...].astype(jnp.float32)
    for o_ref, g_ref, do_x_ref, dg_ref in zip(
        (oc_ref, os_ref, ow_ref), (gc_ref, gs_ref, gw_ref), out_refs[:3], out_refs[3:], strict=True
    ):
        do_x_ref[...] = (g_ref[...].astype(jnp.float32) * do).astype(do_x_ref.dtype)
        prod = do * o_ref[...].astype(jnp.float32)
        dg_ref[...] = jnp.sum(prod, axis=1, keepdims=True).astype(dg_ref.dtype)


def _call(kernel, args, out_shapes, row_tile: int, interpret, name: str):
    b, h, rows, _ = args[0].shape
    index = lambda b_, h_, i: (b_, h_, i, 0)
    spec = lambda x: pl.BlockSpec((None, None, row_tile, x.shape[3]), index)
    return pl.pallas_call(
        kernel,
        grid=(b, h, rows // row_tile),
        in_specs=[spec(x) for x in args],
        out_specs=[spec(x) for x in out_shapes],
        out_shape=out_shapes,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel")
        ),
        interpret=interpret,
        name=name,
    )(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _combine(o_cmp, o_slc, o_swa, g_cmp, g_slc, g_swa, row_tile, interpret):
    out = [jax.ShapeDtypeStruct(o_cmp.shape, o_cmp.dtype)]
    args = (o_cmp, o_slc, o_swa, g_cmp, g_slc, g_swa)
    return _call(_fwd_kernel, args, out, row_tile, interpret, "nsa_combine_fwd")[0]


def _combine_fwd(o_cmp, o_slc, o_swa, g_cmp, g_slc, g_swa, row_tile, interpret):
    args = (o_cmp, o_slc, o_swa, g_cmp, g_slc, g_swa)
    return _combine(*args, row_tile, interpret), args


def _combine_bwd(row_tile, interpret, args, do):
    out = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in args]
    return tuple(_call(_bwd_kernel, (*args, do), out, row_tile, interpret, "nsa_combine_bwd"))


_combine.defvjp(_combine_fwd, _combine_bwd)


def combine(
    o_cmp: Array,
    o_slc: Array,
    o_swa: Array,
    g_cmp: Array,
    g_slc: Array,
    g_swa: Array,
    *,
    row_tile: int,
    interpret=False,
) -> Array:
    """o_x [B, H, R, D], g_x [B, H, R, 1] -> o [B, H, R, D] in o_cmp.dtype; R % row_tile == 0."""
    return _combine(o_cmp, o_slc, o_swa, g_cmp, g_slc, g_swa, row_tile, interpret)
