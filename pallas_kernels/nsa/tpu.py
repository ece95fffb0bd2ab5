"""NSA on TPU (Mosaic Pallas): entry point `nsa_tpu` and the custom_vjp wiring.

Pipeline (q [B, Tq, HQ, D], k/v [B, Tk, H, D], G = HQ // H, any G):
    1. Layout: q -> [B, H, Tqp*G, D] (rows = (token, head of the group), token-major; Tq padded to
       a multiple of the query tile TQ), k, v -> [B, H, Tkp, D] padded to whole blocks.
    2. kc, vc = mean_pool(k, v) (XLA, the reference's function), padded to NBp compressed keys.
    3. Compression attention kernel -> o_cmp, lse (`tpu_attention`, mode "cmp").
    4. Top-S kernel on the stop-gradient scores -> block indices [B, H, Tqp, S] (`tpu_topk`),
       then per-tile union lists (XLA sort).
    5. Selection and sliding-window kernels (`tpu_attention`, modes "slc", "swa").
    6. Gated combine (`tpu_combine`), back to [B, Tq, HQ, D].
Each attention kernel has a `jax.custom_vjp` whose backward runs the dq and dkv kernels; the top-S
has no gradient (as in the reference) and the lse output is only consumed under stop_gradient.
Padding rows and keys are masked in the kernels and sliced off here.

`interpret=True` runs every kernel under the TPU interpreter with race detection
(`pltpu.InterpretParams(detect_races=True)`); an `InterpretParams` is passed through as given.

Lowering: every kernel (forward and backward, f32 and bf16) exports for platform "tpu" with
`jax.export` on a CPU host under jax 0.10.2 (see tests/test_nsa_pallas_tpu.py). Two things the
lowering rejected on the way, kept here as notes: `jnp` floor division of scalars lowers through
`sign`, which asks for the TPU generation and fails on a CPU host ("Unsupported TPU device kind:
cpu"), hence `lax.div` on non-negative scalars; and a 1-D SMEM block of the union list fails the
last-two-dims rule, hence the [.., 1, U] list layout. The export runs the Pallas-to-Mosaic
lowering only; Mosaic's own passes (layout inference, vector relayouts, VMEM allocation) run when a
TPU compiles the module, so problems of that stage would first show on a TPU.

Limits: the forward kernels keep a whole K/V head in VMEM (64 MiB at 128K, bf16, D = 128): fine on
v5e / v6e, too large for v5p beyond ~96K (needs a key-range split with an lse merge). The selection
cost grows with the union of a query tile's blocks (`tpu_attention` docstring).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.nsa import tpu_attention as att
from pallas_kernels.nsa import tpu_combine, tpu_topk
from pallas_kernels.nsa.reference import default_scale, mean_pool

Array = jax.Array

# Bytes of VMEM the kernels may plan for: under v5p's 64 MiB per core, leaving headroom.
DEFAULT_VMEM_BUDGET = 48 * 1024 * 1024
# Target rows (TQ * G) of a query tile: fills a 256-wide v6e MXU pass, two 128-wide v5e/v5p passes.
TARGET_ROWS = 256


@dataclasses.dataclass(frozen=True)
class Config:
    """Static kernel configuration derived from the shapes (hashable for custom_vjp)."""

    cmp: att.Plan
    slc: att.Plan
    swa: att.Plan
    topk: tpu_topk.TopkPlan
    interpret: object
    vmem_limit_bytes: int | None


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def default_q_tile(group: int, tq: int) -> int:
    """TQ: a multiple of 8 with TQ * G <= TARGET_ROWS, at most Tq rounded up to 8."""
    return max(8, min(TARGET_ROWS // group // 8 * 8, _round_up(tq, 8)))


def default_kv_split(key_rows: int, key_tile: int, d: int, itemsize: int, budget: int) -> int:
    """Smallest number of key ranges whose dkv working set (K, V + 2x fp32 dk, dv) fits budget."""
    tiles = key_rows // key_tile
    per_row = d * (2 * itemsize + 2 * 2 * 4)
    for n in range(1, tiles + 1):
        if tiles % n == 0 and key_rows // n * per_row <= budget:
            return n
    return tiles


def _to_rows(x: Array, h: int, tqp: int) -> Array:
    """[B, Tq, HQ, ...] -> [B, H, Tqp*G, ...], Tq zero-padded to tqp."""
    b, tq, hq = x.shape[:3]
    x = jnp.pad(x, [(0, 0), (0, tqp - tq)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(b, tqp, h, hq // h, *x.shape[3:])
    x = jnp.moveaxis(x, 1, 2)
    return x.reshape(b, h, tqp * (hq // h), *x.shape[4:])


def _heads_last(x: Array, tqp: int, tq: int) -> Array:
    """[B, H, Tqp*G, D] -> [B, Tq, H*G, D]."""
    b, h, rows, d = x.shape
    g = rows // tqp
    x = jnp.moveaxis(x.reshape(b, h, tqp, g, d), 2, 1)
    return x.reshape(b, tqp, h * g, d)[:, :tq]


def _kv_layout(x: Array, rows: int) -> Array:
    """[B, T, H, D] -> [B, H, rows, D], zero-padded."""
    x = jnp.pad(x, [(0, 0), (0, rows - x.shape[1]), (0, 0), (0, 0)])
    return jnp.moveaxis(x, 2, 1)


def _float0(x: Array | None):
    return None if x is None else np.zeros(x.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(plan, cfg, q_offset, q, k, v, idx, lists):
    """(o, lse) of one branch; see `tpu_attention.attention_fwd`."""
    return att.attention_fwd(
        plan,
        q_offset,
        q,
        k,
        v,
        idx,
        lists,
        interpret=cfg.interpret,
        vmem_limit_bytes=cfg.vmem_limit_bytes,
    )


def _attention_fwd(plan, cfg, q_offset, q, k, v, idx, lists):
    o, lse = _attention(plan, cfg, q_offset, q, k, v, idx, lists)
    return (o, lse), (q_offset, q, k, v, idx, lists, o, lse)


def _attention_bwd(plan, cfg, res, cts):
    q_offset, q, k, v, idx, lists, o, lse = res
    do, _ = cts  # the lse only feeds the stop-gradient top-S selection
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
    dq, dk, dv = att.attention_bwd(
        plan,
        q_offset,
        q,
        k,
        v,
        do.astype(q.dtype),
        lse,
        delta,
        idx,
        lists,
        interpret=cfg.interpret,
        vmem_limit_bytes=cfg.vmem_limit_bytes,
    )
    return (
        _float0(q_offset),
        dq,
        dk.astype(k.dtype),
        dv.astype(v.dtype),
        _float0(idx),
        _float0(lists),
    )


_attention.defvjp(_attention_fwd, _attention_bwd)


def _interpret_params(interpret):
    if interpret is True:
        return pltpu.InterpretParams(detect_races=True)
    return interpret


def make_config(
    q_shape: tuple[int, ...],
    k_shape: tuple[int, ...],
    dtype,
    *,
    block_size: int,
    block_count: int,
    window_size: int,
    scale: float,
    interpret,
    q_tile: int | None = None,
    kv_split: int | None = None,
    vmem_budget_bytes: int = DEFAULT_VMEM_BUDGET,
) -> Config:
    """Kernel plans for q [B, Tq, HQ, D] and k [B, Tk, H, D]."""
    _, tq, hq, d = q_shape
    _, tk, h, _ = k_shape
    if hq % h:
        raise ValueError(f"HQ={hq} is not a multiple of H={h}")
    itemsize = jnp.dtype(dtype).itemsize
    if block_size % (32 // itemsize):
        raise ValueError(
            f"block_size={block_size} must be a multiple of {32 // itemsize} for {dtype} "
            "(one packed TPU sublane tile)"
        )
    g = hq // h
    tq_tile = q_tile or default_q_tile(g, tq)
    if tq_tile % 8:
        raise ValueError(f"q_tile={tq_tile} must be a multiple of 8")
    nb = -(-tk // block_size)
    kc_tile = min(128, _round_up(nb, 8))  # one tile below 128 blocks: slices start at 0 or 128k
    key_rows = nb * block_size
    split = kv_split or default_kv_split(key_rows, block_size, d, itemsize, vmem_budget_bytes)
    if nb % split:
        raise ValueError(f"kv_split={split} must divide the number of key blocks {nb}")
    common = dict(group=g, q_tile=tq_tile, block_size=block_size, window=window_size, scale=scale)
    resident = 2 * nb * block_size * d * itemsize + 16 * 1024 * 1024
    return Config(
        cmp=att.Plan("cmp", key_tile=kc_tile, num_keys=nb, **common),
        slc=att.Plan("slc", key_tile=block_size, num_keys=tk, nsplit=split, **common),
        swa=att.Plan("swa", key_tile=block_size, num_keys=tk, nsplit=split, **common),
        topk=tpu_topk.TopkPlan(g, tq_tile, kc_tile, block_size, nb, block_count, scale),
        interpret=_interpret_params(interpret),
        vmem_limit_bytes=None if interpret else max(resident, 32 * 1024 * 1024),
    )


def nsa_tpu(
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
    q_offset: int | Array = 0,
    return_block_indices: bool = False,
    interpret=False,
    q_tile: int | None = None,
    kv_split: int | None = None,
) -> Array | tuple[Array, Array]:
    """Native Sparse Attention (variant `videonsa`) with Mosaic TPU kernels.

    Args:
        q: [B, Tq, HQ, D] queries at absolute positions q_offset + i.
        k, v: [B, Tk, H, D], HQ % H == 0 (query head h reads KV head h // G).
        g_cmp, g_slc, g_swa: [B, Tq, HQ] gates in (0, 1).
        block_size, block_count, window_size, scale, q_offset, return_block_indices: as in
            `reference.nsa_reference` (q_offset may be a traced int32 scalar).
        interpret: False on TPU; True runs the TPU interpreter with race detection; or an
            `pltpu.InterpretParams`.
        q_tile: tokens per query tile (multiple of 8); default fills ~256 MXU rows.
        kv_split: key ranges of the dkv backward kernels; default from the VMEM budget.

    Returns:
        o [B, Tq, HQ, D] in q.dtype, and int32 block indices [B, Tq, H, S] (ascending, -1 padded)
        if requested.
    """
    tq, d, h = q.shape[1], q.shape[3], k.shape[2]
    scale = default_scale(d, scale)
    cfg = make_config(
        q.shape,
        k.shape,
        q.dtype,
        block_size=block_size,
        block_count=block_count,
        window_size=window_size,
        scale=scale,
        interpret=interpret,
        q_tile=q_tile,
        kv_split=kv_split,
    )
    tq_tile, nb = cfg.slc.q_tile, cfg.topk.num_blocks
    tqp = _round_up(tq, tq_tile)
    offset = jnp.asarray(q_offset, jnp.int32).reshape(1)

    qr = _to_rows(q, h, tqp)
    kr, vr = _kv_layout(k, nb * block_size), _kv_layout(v, nb * block_size)
    nbp = _round_up(nb, cfg.cmp.key_tile)
    kc, vc = (_kv_layout(mean_pool(x, block_size), nbp) for x in (k, v))

    o_cmp, lse = _attention(cfg.cmp, cfg, offset, qr, kc, vc, None, None)
    sg = jax.lax.stop_gradient
    idx = tpu_topk.select_blocks(
        cfg.topk,
        offset,
        sg(qr),
        sg(kc),
        sg(lse),
        interpret=cfg.interpret,
        vmem_limit_bytes=cfg.vmem_limit_bytes,
    )
    lists = tpu_topk.union_lists(idx, tq_tile, nb)
    o_slc, _ = _attention(cfg.slc, cfg, offset, qr, kr, vr, idx, lists)
    o_swa, _ = _attention(cfg.swa, cfg, offset, qr, kr, vr, None, None)

    gates = [_to_rows(gt[..., None], h, tqp) for gt in (g_cmp, g_slc, g_swa)]
    o = tpu_combine.combine(
        o_cmp, o_slc, o_swa, *gates, row_tile=cfg.slc.rows, interpret=cfg.interpret
    )
    o = _heads_last(o, tqp, tq)
    if not return_block_indices:
        return o
    sel = jnp.sort(jnp.where(idx < 0, nb, idx), axis=-1)
    sel = jnp.where(sel < nb, sel, -1)
    return o, jnp.moveaxis(sel, 1, 2)[:, :tq]
