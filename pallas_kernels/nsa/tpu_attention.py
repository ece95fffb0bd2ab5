"""Block-sparse attention on TPU (Mosaic): the compression, selection and sliding-window branches.

One kernel family serves all three NSA attention branches. A grid step owns a query tile of TQ
tokens of one KV head; its M = TQ*G rows are (token, query head of the group) pairs, token-major,
so the group's heads and TQ tokens share one MXU matmul (M = 224 for G = 7, TQ = 32; any G, no head
padding). The step walks a list of key tiles of KB rows with an online softmax (fp32 statistics):

    mode  keys              key tile KB        list of key tiles for the query tile
    cmp   mean-pooled kc    min(128, NBp)      0 .. last compressed block complete for its last row
    slc   k                 BS                 union of the tile's selected blocks (SMEM, streamed)
    swa   k                 BS                 blocks overlapping [t_first - W + 1, t_last]

Per row the mask is: cmp `(n+1)*BS-1 <= t`; slc `block selected by the row's token and j <= t`;
swa `t-W < j <= t`; always `j < num_keys`. Selection membership comes from the tile's block indices
[TQ, S] (VMEM) expanded to rows by a 0/1 matmul E[M, TQ] @ hit[TQ, KB], so no per-row index copy.

Layouts (built by `tpu.py`): q, dO [B, H, Tqp*G, D]; k, v [B, H, Tkp, D]; lse, delta
[B, H, Tqp*G, 1] fp32; block indices [B, H, Tqp, S] int32; union lists [B, H, nqt, 1, U] int32,
count in slot 0 (a (1, U) block goes to SMEM each step); q_offset is a scalar-prefetch int32[1].

Kernels and grids:
    fwd      grid (B, H, nqt)            q tile [M, D]; whole K/V head in VMEM, single-buffered
                                         (its block index only changes with the head) -> o, lse.
    bwd_dq   grid (B, H, nqt)            as fwd -> dq tile.
    bwd_dkv  grid (B, H, nsplit, nqt)    K/V key range [Tk/nsplit, D] in VMEM, single-buffered;
                                         dk, dv fp32 output blocks stay resident over the q tiles
                                         ("arbitrary" axis) and accumulate; nsplit keeps the
                                         range inside VMEM.

VMEM at T = 128K, D = 128, bf16, G = 7 (TQ = 32, M = 224); v5e / v6e have 128 MiB, v5p 64 MiB per
TensorCore:
    fwd / bwd_dq (slc, swa)  K + V head 2 * 32 MiB = 64 MiB + tiles (< 1 MiB): fits v5e and v6e;
                             on v5p it fits up to T ~ 96K (128K on v5p needs a key-range split of
                             the forward with an lse merge: not implemented).
    fwd / bwd_dq (cmp)       kc + vc 2 * 512 KiB.
    bwd_dkv                  per key token 2*2 B (K, V) + 2*2*4 B (dk, dv double-buffered fp32)
                             = 20 B * D = 2.5 KiB; the wrapper picks the smallest nsplit within
                             its VMEM budget (default 48 MiB, any chip): nsplit = 8, 40 MiB per
                             range; a 100 MiB budget on v5e / v6e gives nsplit = 4 (80 MiB).

Roofline at T = 128K, HQ = 28, H = 4, D = 128, BS = 64, S = 32, W = 256 (forward FLOPs 4*D per
visible (row, key) pair; backward 2.5x). MXU peaks: v5e 197, v5p 459 (chip), v6e 920 TFLOP/s; HBM
0.82 / 2.46 / 1.64 TB/s.
    slc fwd  3.85 TFLOP useful; the union of a tile's blocks multiplies it by u = |union| / S
             (u = 1 when the tile's tokens agree, <= TQ worst case). Bytes: q, o 2 * 0.9 GB + K/V
             head loads 0.27 GB -> compute-bound: 19.5 ms (v5e), 8.4 ms (v5p), 4.2 ms (v6e) at
             u = 1 and full MXU use; with BS = 64 key tiles the MXU N dim is 64 (half of v5e's
             128, a quarter of v6e's 256), so expect ~2x / ~4x that.
    swa fwd  0.48 TFLOP useful, ~(W + TQ + BS) / W = 1.4x computed: 3.4 / 1.5 / 0.7 ms.
    cmp fwd  1.92 TFLOP useful, ~1.1x computed (tile granularity of the causal bound):
             10.7 / 4.6 / 2.3 ms.
    slc also pays the membership matmul E @ hit, TQ / D = 1/4 of its QK^T FLOPs.
    bwd      2.5x the forward FLOPs plus one recompute of S = QK^T in the separate dq kernel
             (~3x in total); dkv streams q and dO once per key range: nsplit * 1.8 GB = 14.7 GB
             at nsplit = 8 (18 / 6 / 9 ms), under the selection backward's compute time.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

Array = jax.Array
MODES = ("cmp", "slc", "swa")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static description of one branch's kernel.

    mode: "cmp", "slc" or "swa". group: G query heads per KV head. q_tile: TQ tokens per step.
    key_tile: KB key rows per inner step. block_size: BS. window: W (swa). num_keys: true key count
    (NB for cmp, Tk otherwise). scale: softmax scale. nsplit: key ranges of the dkv kernel.
    """

    mode: str
    group: int
    q_tile: int
    key_tile: int
    block_size: int
    window: int
    num_keys: int
    scale: float
    nsplit: int = 1

    @property
    def rows(self) -> int:
        return self.q_tile * self.group


def _dot(a: Array, b: Array, contract: tuple[int, int]) -> Array:
    """fp32-accumulated matmul contracting a's dim contract[0] with b's dim contract[1]."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(
        a,
        b,
        ((((contract[0],), (contract[1],))), ((), ())),
        preferred_element_type=jnp.float32,
        precision=precision,
    )


def row_tokens(rows: int, group: int) -> Array:
    """Token index r // G of each row as int32 [rows, 1] (exact float division, no vector idiv)."""
    r = lax.broadcasted_iota(jnp.int32, (rows, 1), 0).astype(jnp.float32)
    return jnp.floor((r + 0.5) * (1.0 / group)).astype(jnp.int32)


def expand_matrix(plan: Plan, tok: Array) -> Array:
    """E [M, TQ] fp32 with E[r, t] = 1 iff row r belongs to token t."""
    cols = lax.broadcasted_iota(jnp.int32, (plan.rows, plan.q_tile), 1)
    return (cols == tok).astype(jnp.float32)


def tile_key_range(plan: Plan, t_first: Array, t_last: Array) -> tuple[Array, Array]:
    """First and last key tile (inclusive) a query tile with positions [t_first, t_last] may see.

    cmp and swa only; the range is empty (last < first) when no key is visible.
    """
    kb, bs = plan.key_tile, plan.block_size
    # Divisions of non-negative scalars: lax.div (jnp's // lowers through sign, see tpu.py).
    if plan.mode == "cmp":
        last_block = jnp.minimum(lax.div(jnp.maximum(t_last + 1, 0), bs) - 1, plan.num_keys - 1)
        return jnp.int32(0), jnp.where(last_block >= 0, lax.div(jnp.maximum(last_block, 0), kb), -1)
    first_key = jnp.maximum(t_first - plan.window + 1, 0)
    last_key = jnp.minimum(t_last, plan.num_keys - 1)
    last = jnp.where(last_key >= 0, lax.div(jnp.maximum(last_key, 0), kb), -1)
    return lax.div(first_key, kb), last


def key_mask(plan: Plan, pos: Array, n: Array, member: Array | None) -> Array:
    """Visibility [M, KB] of key tile n for rows at absolute positions pos [M, 1]."""
    j = n * plan.key_tile + lax.broadcasted_iota(jnp.int32, (1, plan.key_tile), 1)
    mask = j < plan.num_keys
    if plan.mode == "cmp":
        return mask & ((j + 1) * plan.block_size - 1 <= pos)
    mask = mask & (j <= pos)
    if plan.mode == "swa":
        return mask & (j > pos - plan.window)
    return mask & member


def membership(plan: Plan, idx: Array, expand: Array, n: Array) -> Array:
    """Rows [M, KB] whose token selected block n; idx [TQ, S] int32 (-1 = empty slot)."""
    hit = jnp.max(jnp.where(idx == n, 1.0, 0.0), axis=1, keepdims=True)  # [TQ, 1]
    hit = jnp.broadcast_to(hit, (plan.q_tile, plan.key_tile))
    return _dot(expand, hit, (1, 0)) > 0.5


class TileContext:
    """Per-step quantities shared by the kernels: row positions and the key-tile list."""

    def __init__(self, plan: Plan, q_offset: Array, tile: Array, idx_ref, list_ref):
        self.plan = plan
        t_first = q_offset + tile * plan.q_tile
        tok = row_tokens(plan.rows, plan.group)
        self.pos = t_first + tok
        self.idx = idx_ref[...] if idx_ref is not None else None
        self.expand = expand_matrix(plan, tok) if idx_ref is not None else None
        self.list_ref = list_ref
        if plan.mode == "slc":
            self.first, self.count = jnp.int32(1), list_ref[0, 0]
        else:
            first, last = tile_key_range(plan, t_first, t_first + plan.q_tile - 1)
            self.first, self.count = first, jnp.maximum(last - first + 1, 0)

    def tile_at(self, u: Array) -> Array:
        """Key-tile index of list entry u (0 <= u < count)."""
        if self.plan.mode == "slc":
            return self.list_ref[0, self.first + u]
        return self.first + u

    def mask(self, n: Array) -> Array:
        member = None
        if self.plan.mode == "slc":
            member = membership(self.plan, self.idx, self.expand, n)
        return key_mask(self.plan, self.pos, n, member)

    def probs(self, q: Array, kt: Array, n: Array, lse: Array) -> tuple[Array, Array]:
        """(p, mask): p = exp(q.kt*scale - lse) on visible keys, 0 elsewhere; [M, KB] fp32."""
        mask = self.mask(n)
        s = _dot(q, kt, (1, 1)) * self.plan.scale
        return jnp.where(mask, jnp.exp(s - lse), 0.0), mask


def _split_refs(plan: Plan, refs: tuple) -> tuple[object, object, tuple]:
    """(idx_ref, list_ref, rest) from the trailing refs; idx and list exist only for slc."""
    if plan.mode == "slc":
        return refs[0], refs[1], refs[2:]
    return None, None, refs


def _fwd_kernel(plan: Plan, off_ref, q_ref, k_ref, v_ref, *refs):
    idx_ref, list_ref, (o_ref, lse_ref) = _split_refs(plan, refs)
    ctx = TileContext(plan, off_ref[0], pl.program_id(2), idx_ref, list_ref)
    q = q_ref[...]
    kb = plan.key_tile

    def body(u, carry):
        m, denom, acc = carry
        n = ctx.tile_at(u)
        start = pl.multiple_of(n * kb, kb)
        kt, vt = k_ref[pl.ds(start, kb), :], v_ref[pl.ds(start, kb), :]
        mask = ctx.mask(n)
        s = jnp.where(mask, _dot(q, kt, (1, 1)) * plan.scale, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.where(mask, jnp.exp(s - m_safe), 0.0)
        alpha = jnp.exp(m - m_safe)
        denom = alpha * denom + jnp.sum(p, axis=1, keepdims=True)
        acc = alpha * acc + _dot(p.astype(vt.dtype), vt, (1, 0))
        return m_new, denom, acc

    m0 = jnp.full((plan.rows, 1), -jnp.inf, jnp.float32)
    l0 = jnp.zeros((plan.rows, 1), jnp.float32)
    acc0 = jnp.zeros((plan.rows, q.shape[1]), jnp.float32)
    m, denom, acc = lax.fori_loop(0, ctx.count, body, (m0, l0, acc0))
    nonempty = denom > 0.0
    l_safe = jnp.where(nonempty, denom, 1.0)
    o_ref[...] = (acc / l_safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(nonempty, m + jnp.log(l_safe), -jnp.inf)


def _bwd_dq_kernel(plan: Plan, off_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, *refs):
    idx_ref, list_ref, (dq_ref,) = _split_refs(plan, refs)
    ctx = TileContext(plan, off_ref[0], pl.program_id(2), idx_ref, list_ref)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], dl_ref[...]
    kb = plan.key_tile

    def body(u, dq):
        n = ctx.tile_at(u)
        start = pl.multiple_of(n * kb, kb)
        kt, vt = k_ref[pl.ds(start, kb), :], v_ref[pl.ds(start, kb), :]
        p, _ = ctx.probs(q, kt, n, lse)
        ds = p * (_dot(do, vt, (1, 1)) - delta)
        return dq + _dot(ds.astype(kt.dtype), kt, (1, 0))

    dq = lax.fori_loop(0, ctx.count, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * plan.scale).astype(dq_ref.dtype)


def _bwd_dkv_kernel(plan: Plan, off_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, *refs):
    idx_ref, list_ref, (dk_ref, dv_ref) = _split_refs(plan, refs)
    c, i = pl.program_id(2), pl.program_id(3)
    kb = plan.key_tile
    range_tiles = k_ref.shape[0] // kb
    lo = c * range_tiles

    @pl.when(i == 0)
    def _init():
        dk_ref[...] = jnp.zeros(dk_ref.shape, dk_ref.dtype)
        dv_ref[...] = jnp.zeros(dv_ref.shape, dv_ref.dtype)

    ctx = TileContext(plan, off_ref[0], i, idx_ref, list_ref)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], dl_ref[...]

    def update(n):
        start = pl.multiple_of((n - lo) * kb, kb)
        kt, vt = k_ref[pl.ds(start, kb), :], v_ref[pl.ds(start, kb), :]
        p, _ = ctx.probs(q, kt, n, lse)
        ds = p * (_dot(do, vt, (1, 1)) - delta)
        dv_ref[pl.ds(start, kb), :] += _dot(p.astype(do.dtype), do, (0, 0))
        dk_ref[pl.ds(start, kb), :] += _dot(ds.astype(q.dtype), q, (0, 0)) * plan.scale

    if plan.mode == "slc":

        def body(u, carry):
            n = ctx.tile_at(u)
            pl.when((n >= lo) & (n < lo + range_tiles))(lambda: update(n))
            return carry

        lax.fori_loop(0, ctx.count, body, 0)
    else:
        first = jnp.maximum(ctx.first, lo)
        last = jnp.minimum(ctx.first + ctx.count, lo + range_tiles)
        lax.fori_loop(first, jnp.maximum(last, first), lambda n, carry: (update(n), carry)[1], 0)


def _specs(plan: Plan, d: int, s: int | None, u: int | None, bwd_dkv: bool = False) -> dict:
    """BlockSpecs keyed by operand name for the grid of the kernel."""
    m, tq = plan.rows, plan.q_tile
    if bwd_dkv:
        qmap = lambda b, h, c, i, off: (b, h, i, 0)
        idx_map = lambda b, h, c, i, off: (b, h, i, 0)
        list_map = lambda b, h, c, i, off: (b, h, i, 0, 0)
        kv_map = lambda b, h, c, i, off: (b, h, c, 0)
    else:
        qmap = idx_map = lambda b, h, i, off: (b, h, i, 0)
        list_map = lambda b, h, i, off: (b, h, i, 0, 0)
        kv_map = lambda b, h, i, off: (b, h, 0, 0)
    specs = {
        "q": pl.BlockSpec((None, None, m, d), qmap),
        "row": pl.BlockSpec((None, None, m, 1), qmap),
        "kv": lambda rows: pl.BlockSpec(
            (None, None, rows, d), kv_map, pipeline_mode=pl.Buffered(1)
        ),
        "dkv_out": lambda rows: pl.BlockSpec((None, None, rows, d), kv_map),
    }
    if plan.mode == "slc":
        specs["idx"] = pl.BlockSpec((None, None, tq, s), idx_map)
        specs["list"] = pl.BlockSpec((None, None, None, 1, u), list_map, memory_space=pltpu.SMEM)
    return specs


def _sparse_specs(plan: Plan, specs: dict) -> list:
    return [specs["idx"], specs["list"]] if plan.mode == "slc" else []


def _sparse_args(plan: Plan, idx: Array | None, lists: Array | None) -> list:
    return [idx, lists] if plan.mode == "slc" else []


def _params(semantics: tuple[str, ...], vmem_limit_bytes: int | None) -> pltpu.CompilerParams:
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=vmem_limit_bytes)


def attention_fwd(
    plan: Plan,
    q_offset: Array,
    q: Array,
    k: Array,
    v: Array,
    idx: Array | None = None,
    lists: Array | None = None,
    *,
    interpret=False,
    vmem_limit_bytes: int | None = None,
) -> tuple[Array, Array]:
    """Forward: q [B, H, Tqp*G, D], k/v [B, H, Tkp, D] -> o (q.dtype), lse [B, H, Tqp*G, 1] fp32."""
    b, h, rows, d = q.shape
    nqt = rows // plan.rows
    s = idx.shape[-1] if idx is not None else None
    u = lists.shape[-1] if lists is not None else None
    specs = _specs(plan, d, s, u)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, h, nqt),
        in_specs=[specs["q"], specs["kv"](k.shape[2]), specs["kv"](k.shape[2])]
        + _sparse_specs(plan, specs),
        out_specs=[specs["q"], specs["row"]],
    )
    return pl.pallas_call(
        functools.partial(_fwd_kernel, plan),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, h, rows, 1), jnp.float32),
        ],
        compiler_params=_params(("parallel", "parallel", "parallel"), vmem_limit_bytes),
        interpret=interpret,
        name=f"nsa_{plan.mode}_fwd",
    )(q_offset, q, k, v, *_sparse_args(plan, idx, lists))


def attention_bwd(
    plan: Plan,
    q_offset: Array,
    q: Array,
    k: Array,
    v: Array,
    do: Array,
    lse: Array,
    delta: Array,
    idx: Array | None = None,
    lists: Array | None = None,
    *,
    interpret=False,
    vmem_limit_bytes: int | None = None,
) -> tuple[Array, Array, Array]:
    """Backward: (dq in q.dtype, dk and dv fp32 [B, H, Tkp, D]); delta = rowsum(dO * O) fp32."""
    b, h, rows, d = q.shape
    tkp = k.shape[2]
    nqt = rows // plan.rows
    s = idx.shape[-1] if idx is not None else None
    u = lists.shape[-1] if lists is not None else None
    sparse = _sparse_args(plan, idx, lists)
    args = (q_offset, q, k, v, do, lse, delta, *sparse)

    specs = _specs(plan, d, s, u)
    dq = pl.pallas_call(
        functools.partial(_bwd_dq_kernel, plan),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, h, nqt),
            in_specs=[specs["q"], specs["kv"](tkp), specs["kv"](tkp), specs["q"]]
            + [specs["row"], specs["row"]]
            + _sparse_specs(plan, specs),
            out_specs=specs["q"],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(("parallel", "parallel", "parallel"), vmem_limit_bytes),
        interpret=interpret,
        name=f"nsa_{plan.mode}_bwd_dq",
    )(*args)

    specs = _specs(plan, d, s, u, bwd_dkv=True)
    range_rows = tkp // plan.nsplit
    dk, dv = pl.pallas_call(
        functools.partial(_bwd_dkv_kernel, plan),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, h, plan.nsplit, nqt),
            in_specs=[specs["q"], specs["kv"](range_rows), specs["kv"](range_rows), specs["q"]]
            + [specs["row"], specs["row"]]
            + _sparse_specs(plan, specs),
            out_specs=[specs["dkv_out"](range_rows), specs["dkv_out"](range_rows)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, jnp.float32)] * 2,
        compiler_params=_params(
            ("parallel", "parallel", "parallel", "arbitrary"), vmem_limit_bytes
        ),
        interpret=interpret,
        name=f"nsa_{plan.mode}_bwd_dkv",
    )(*args)
    return dq, dk, dv
