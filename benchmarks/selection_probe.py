"""Where the selection kernels' time goes: diagnostic variants of the per-chunk kernels.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python3 benchmarks/selection_probe.py [T] [variant,...]

Same config as benchmarks/nsa_kernels.py (B=1, 28/4 heads, D=128, block 64, 32 blocks, bf16,
random inputs). Each variant replaces gpu_selection's forward or backward chunk kernel and is timed
whole (ms) and per device kernel (profiler); the default also prints its launch (registers,
shared memory, occupancy). Variants (timing only: q_l2 and no_store give wrong values):
    q_l2        gathers read queries of a 1024-token window: always L2 hits
    no_store    the per-(token, slot) partial output (fwd) / dq (bwd) is not written
    evict       partial stores marked evict_first, row gathers evict_last (keep queries in L2)
    split       steps whose rows all see the whole block skip the causal mask (a second loop)
    no_mask     no step masks (timing only: the bound for selections without the own block)
    warps8, warps8_rows128, stages2, stages1   other launches (num_warps, rows per step, num_stages)
Without a variant list, then the forward for inputs drawn with other seeds (the selections'
dependence on the data). Register prefetch and per-step K/V re-reads lost (RESULTS.md, 2026-11-25)
and were dropped.
"""

from __future__ import annotations

import functools
import gzip
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import bench  # noqa: E402
from benchmarks.nsa_kernels import BS, SCALE, S, branch_fns, device_kernels, inputs  # noqa: E402
from pallas_kernels.nsa import gpu_selection as gs  # noqa: E402
from pallas_kernels.nsa import reference  # noqa: E402
from pallas_kernels.nsa.gpu import BranchConfig, flash_forward  # noqa: E402
from pallas_kernels.nsa.gpu_common import (  # noqa: E402
    LOG2E,
    NEG,
    dot,
    load_block,
    load_grad_rows,
    load_rows,
    next_pow2,
)
from pallas_kernels.nsa.gpu_topk import select_blocks  # noqa: E402


def _item(refs, part_shape, rows, g, bs, q_l2):
    """What both chunk kernels derive from their program ids. refs: (off, c0, q, k, v, ent, blk,
    start, end); part_shape: the partial output's shape [B, C, S, ...]. Returns the work item's
    fields, kv() -> its K and V block, fetch(it) -> (valid, loc, slot, tok, tok_load) of step it,
    its step count and masked() -> how many leading steps need the mask (the split variant)."""
    off_ref, c0_ref, q_ref, k_ref, v_ref, ent_ref, blk_ref, start_ref, end_ref = refs
    w, bh = pl.program_id(0), pl.program_id(1)
    tq, tk, h_kv = q_ref.shape[1], k_ref.shape[1], k_ref.shape[2]
    chunk, s_count = part_shape[1], part_shape[2]
    b, h = bh // h_kv, bh % h_kv
    n, e0, e1 = blk_ref[b, h, w], start_ref[b, h, w], end_ref[b, h, w]
    j0, per = n * bs, rows // g
    r = jnp.arange(rows, dtype=jnp.int32)

    def fetch(it):
        step = gs.step_rows(ent_ref, b, h, e0, e1, it, r, g, c0_ref[0], tq, chunk, s_count)
        valid, tok = step[0], step[3]
        return *step, (jnp.where(valid, tok % 1024, tq) if q_l2 else tok)

    pos0 = off_ref[0] + c0_ref[0]
    return SimpleNamespace(
        b=b,
        index=(b, h, w),
        block=n,
        off=off_ref[0],
        tk=tk,
        head=h * g + r % g,
        j=(j0 + jnp.arange(bs, dtype=jnp.int32))[None, :],
        dd=jnp.arange(q_ref.shape[-1], dtype=jnp.int32)[None, :],
        masked=lambda: _masked_steps(ent_ref, (b, h, e0, e1), (j0, bs, tk), pos0, s_count, per),
        steps=(e1 - e0 + per - 1) // per,
        kv=lambda: (load_block(k_ref, b, j0, bs, h, tk), load_block(v_ref, b, j0, bs, h, tk)),
        fetch=fetch,
    )


def _masked_steps(ent_ref, item, block, pos0, s_count: int, per: int) -> jax.Array:
    """How many leading steps of a work item need the causal mask. item: (b, h, e0, e1), its
    entries in ascending token order; block: (j0, bs, tk), its first key, size and the key count;
    pos0: position of chunk token 0. Only tokens t with pos0 + t < j0 + bs - 1 (the block's own,
    forced, at most bs - 1 entries, all at the front) see part of the block; the other steps skip
    the mask (their padding rows read zero q / do and are not stored). Every step when the block
    runs past the keys."""
    b, h, e0, e1 = item
    j0, bs, tk = block
    e = e0 + jnp.arange(next_pow2(bs), dtype=jnp.int32)
    ok = e < e1
    ent = plgpu.load(ent_ref.at[b, h, jnp.where(ok, e, 0)], mask=ok, other=0)
    own = jnp.sum((ok & (pos0 + ent // s_count < j0 + bs - 1)).astype(jnp.int32))
    steps = (e1 - e0 + per - 1) // per
    return jnp.where(j0 + bs <= tk, jnp.minimum((own + per - 1) // per, steps), steps)


def _gather(ref, b, tok, head, valid, evict):
    """load_rows, optionally asking L2 to keep the gathered rows (evict_last)."""
    if not evict:
        return load_rows(ref, b, tok, head, valid)
    d = jnp.arange(ref.shape[-1], dtype=jnp.int32)
    at = ref.at[b, tok[:, None], head[:, None], d[None, :]]
    return plgpu.load(at, mask=valid[:, None], other=0.0, eviction_policy="evict_last")


def make_fwd(q_l2=False, store=True, evict=False, split=False, no_mask=False):
    def kern(off_ref, c0_ref, q_ref, k_ref, v_ref, ent_ref, blk_ref, start_ref, end_ref,
             po_ref, pls_ref, *, g, scale, bs):  # fmt: skip
        refs = (off_ref, c0_ref, q_ref, k_ref, v_ref, ent_ref, blk_ref, start_ref, end_ref)
        it_ = _item(refs, po_ref.shape, gs.FWD_ROWS, g, bs, q_l2)
        b, head, j, dd, tk, off = it_.b, it_.head, it_.j, it_.dd, it_.tk, it_.off
        k, v = it_.kv()

        def step(it, carry, masked):
            valid, loc, slot, tok, tok_load = it_.fetch(it)
            q = _gather(q_ref, b, tok_load, head, valid, evict)
            sc = dot(q, k, trans_b=True) * scale * LOG2E
            if masked:
                last = jnp.where(valid, jnp.minimum(off + tok, tk - 1), -1)
                sc = jnp.where(j <= last[:, None], sc, NEG)
            m = jnp.max(sc, axis=1)
            p = jnp.exp2(sc - m[:, None])
            den = jnp.sum(p, axis=1)
            o = dot(p.astype(v.dtype), v) * (1.0 / den)[:, None]
            if store:
                plgpu.store(po_ref.at[b, loc[:, None], slot[:, None], head[:, None], dd],
                            o.astype(po_ref.dtype), mask=valid[:, None],
                            eviction_policy="evict_first" if evict else None)  # fmt: skip
            plgpu.store(pls_ref.at[b, loc, slot, head], m + jnp.log2(den), mask=valid)
            return carry

        if no_mask:
            lax.fori_loop(0, it_.steps, functools.partial(step, masked=False), jnp.int32(0))
            return
        cut = it_.masked() if split else it_.steps
        lax.fori_loop(0, cut, functools.partial(step, masked=True), jnp.int32(0))
        lax.fori_loop(cut, it_.steps, functools.partial(step, masked=False), jnp.int32(0))

    return kern


def make_bwd(q_l2=False, store=True, evict=False, split=False, no_mask=False):
    def kern(off_ref, c0_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, ent_ref, blk_ref,
             start_ref, end_ref, single_ref, pslot_ref, _dk_in, _dv_in, dk_ref, dv_ref,
             dk_part_ref, dv_part_ref, dqp_ref, *, g, scale, bs):  # fmt: skip
        refs = (off_ref, c0_ref, q_ref, k_ref, v_ref, ent_ref, blk_ref, start_ref, end_ref)
        it_ = _item(refs, dqp_ref.shape, gs.BWD_ROWS, g, bs, q_l2)
        b, head, j, dd, tk, off = it_.b, it_.head, it_.j, it_.dd, it_.tk, it_.off
        k, v = it_.kv()

        def step(it, carry, masked):
            dk, dv = carry
            valid, loc, slot, tok, tok_load = it_.fetch(it)
            if evict:
                q, do = (_gather(x, b, tok_load, head, valid, True) for x in (q_ref, do_ref))
                lse2 = plgpu.load(lse_ref.at[b, tok_load, head], mask=valid, other=0.0) * LOG2E
                delta = plgpu.load(dl_ref.at[b, tok_load, head], mask=valid, other=0.0)
                lse2, delta = lse2[:, None], delta[:, None]
            else:
                rows = load_grad_rows(q_ref, do_ref, lse_ref, dl_ref, b, tok_load, head, valid)
                q, do, lse2, delta = rows
            p = jnp.exp2(dot(q, k, trans_b=True) * scale * LOG2E - lse2)
            if masked:
                last = jnp.where(valid, jnp.minimum(off + tok, tk - 1), -1)
                p = jnp.where(j <= last[:, None], p, 0.0)
            dv = dv + dot(p.astype(do.dtype), do, trans_a=True)
            ds = (p * (dot(do, v, trans_b=True) - delta)).astype(q.dtype)
            dk = dk + dot(ds, q, trans_a=True)
            if store:
                dq = (dot(ds, k) * scale).astype(dqp_ref.dtype)
                at = dqp_ref.at[b, loc[:, None], slot[:, None], head[:, None], dd]
                policy = "evict_first" if evict else None
                plgpu.store(at, dq, mask=valid[:, None], eviction_policy=policy)
            return dk, dv

        zeros = jnp.zeros((bs, q_ref.shape[-1]), jnp.float32)
        if no_mask:
            masked_part = (zeros, zeros)
            cut = 0
        else:
            cut = it_.masked() if split else it_.steps
            masked_part = lax.fori_loop(
                0, cut, functools.partial(step, masked=True), (zeros, zeros)
            )
        dk, dv = lax.fori_loop(cut, it_.steps, functools.partial(step, masked=False), masked_part)
        grads = (dk_ref, dv_ref, dk_part_ref, dv_part_ref, single_ref, pslot_ref)
        gs.add_block_grads(grads, it_.index, it_.block, dk * scale, dv)

    return kern


VARIANTS = {
    "_fwd_chunk_kernel": ("slc", make_fwd),
    "_bwd_chunk_kernel": ("slc_bwd", make_bwd),
}
VARIANT_FLAGS = {  # name -> flags; "warps" / "stages" / "rows" patch FWD_ or BWD_LAUNCH / _ROWS
    "default": {},
    "q_l2": {"q_l2": True},
    "no_store": {"store": False},
    "evict": {"evict": True},
    "split": {"split": True},
    "split_no_store": {"split": True, "store": False},
    "no_mask": {"no_mask": True},
    "no_mask_no_store": {"no_mask": True, "store": False},
    "warps8": {"warps": 8},
    "warps8_rows128": {"warps": 8, "rows": 128},
    "stages2": {"stages": 2},
    "stages1": {"stages": 1},
}


def launch_info(fn, *args) -> None:
    """Prints the profiler's launch details (registers, shared memory, occupancy) of the kernels."""
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            jax.block_until_ready(fn(*args))
        (path,) = Path(d).glob("**/perfetto_trace.json.gz")
        events = json.load(gzip.open(path))["traceEvents"]
    details = {
        e["name"]: e.get("args", {}).get("kernel_details")
        for e in events
        if "kern" in e.get("name", "")
    }
    for name, detail in details.items():
        print(f"launch {name}: {detail}", flush=True)


def input_dependence(t: int) -> None:
    """The Triton selection forward on the selections of inputs drawn with three seeds."""
    cfg = BranchConfig("cmp", SCALE, BS, 0, interpret=False, static_offset=0)
    off = jnp.zeros((1,), jnp.int32)
    fwd = jax.jit(functools.partial(gs.selection_fwd, scale=SCALE, block_size=BS, interpret=False))
    for seed in (0, 1, 2):
        q, k, v, _, _ = inputs(t, jnp.bfloat16, seed)
        kc, vc = reference.mean_pool(k, BS), reference.mean_pool(v, BS)
        lse = flash_forward(q, kc, vc, off, cfg)[1]
        idx = select_blocks(q, kc, lse, off, block_size=BS, block_count=S, scale=SCALE,
                            interpret=False, static_offset=0)  # fmt: skip
        ms = bench(fwd, q, k, v, idx, off, reps=5)
        kernel = dict(device_kernels(fwd, q, k, v, idx, off, calls=2)).get("_fwd_chunk_kernel")
        unused = int(jnp.sum(idx < 0))
        print(f"seed {seed}: unused slots {unused}, slc fwd {ms:.2f} ms, kernel {kernel} ms")


def main() -> None:
    t = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else list(VARIANT_FLAGS)
    print("jax", jax.__version__, jax.devices(), flush=True)
    fns, args = branch_fns(t)
    for attr, (name, make) in VARIANTS.items():
        default = getattr(gs, attr)
        prefix = "FWD" if name == "slc" else "BWD"
        saved = {f"{prefix}_{x}": getattr(gs, f"{prefix}_{x}") for x in ("LAUNCH", "ROWS")}
        for variant in names:
            flags = dict(VARIANT_FLAGS[variant])
            warps, stages = saved[f"{prefix}_LAUNCH"]
            setattr(
                gs, f"{prefix}_LAUNCH", (flags.pop("warps", warps), flags.pop("stages", stages))
            )
            setattr(gs, f"{prefix}_ROWS", flags.pop("rows", saved[f"{prefix}_ROWS"]))
            setattr(gs, attr, make(**flags))
            try:
                f = jax.jit(lambda *xs, _fn=fns[name].__wrapped__: _fn(*xs))
                ms = bench(f, *args[name], reps=5)
                top = "; ".join(
                    f"{n[:30]} {x:.2f}" for n, x in device_kernels(f, *args[name], calls=2)[:4]
                )
                print(f"probe T={t} {name} {variant}: {ms:.2f} ms | {top}", flush=True)
                if variant == "default":
                    launch_info(f, *args[name])
            except Exception as e:  # e.g. a launch that exceeds shared memory
                print(f"probe T={t} {name} {variant}: failed {type(e).__name__}: {str(e)[:300]}")
            finally:
                setattr(gs, attr, default)
                for key, value in saved.items():
                    setattr(gs, key, value)
    if len(sys.argv) <= 2:
        input_dependence(t)


if __name__ == "__main__":
    main()
