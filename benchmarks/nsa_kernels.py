"""NSA Pallas GPU kernels: correctness vs the plain-JAX reference, then the timing table.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python3 benchmarks/nsa_kernels.py [--seqs 8192,32768,...]
        [--check-seqs 8192,32768] [--no-check] [--no-time] [--no-dense] [--profile 8192,131072]

Config: B=1, 28 query / 4 KV heads, D=128, block 64, 32 blocks, window 256, bf16, random inputs.
Checks: bf16 outputs (and fwd+bwd at the smallest check length) vs `nsa_reference`; block indices
on fp32 inputs vs `reference.select_blocks` (rows that differ are reported with their importance
gap, to tell near-ties from bugs). Timings: median of jitted calls (block_until_ready), ours fwd and
fwd+bwd, per branch fwd/bwd with effective TFLOP/s (useful matmul FLOPs only), cuDNN dense causal
fwd/fwd+bwd, peak extra memory of our fwd+bwd. Prints markdown tables. --profile: device time per
kernel of each branch (JAX profiler trace). Imports only jax/numpy.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gzip
import json
import sys
import tempfile
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import bench  # noqa: E402
from pallas_kernels.nsa import gpu_flash, gpu_mosaic, gpu_selection, reference  # noqa: E402
from pallas_kernels.nsa import gpu_topk as select_module  # noqa: E402
from pallas_kernels.nsa.gpu import BranchConfig, flash_forward, nsa_branches, nsa_gpu  # noqa: E402
from pallas_kernels.nsa.gpu_topk import select_blocks  # noqa: E402

HQ, H, D, BS, S, W = 28, 4, 128, 64, 32, 256
KW = dict(block_size=BS, block_count=S, window_size=W)
SCALE = D**-0.5

# Anchors measured on an H100 (../shared/anchors/README.md), fwd+bwd ms at 28/4 heads (fla runs
# padded 64/4); both without the window branch, so the cuDNN SWA fwd+bwd is added. The ratio
# columns compare against them only on that device kind.
ANCHOR_DEVICE = "H100"
ANCHOR_FWDBWD = {  # T: (fla 64/4 + cuDNN SWA, mdy666 flash_nsa + cuDNN SWA)
    8192: (27.8 + 1.67, None),
    32768: (127.9 + 3.37, 46.5),
    65536: (284.7 + 6.22, 100.6),
    131072: (676.1 + 12.31, 229.3),
}
ANCHOR_FWD = {
    8192: (5.83 + 0.32, None),
    32768: (30.51 + 0.72, 17.8 + 0.72),
    65536: (78.57 + 1.11, 39.2 + 1.11),
    131072: (231.43 + 2.22, 90.6 + 2.22),
}


def inputs(t: int, dtype, seed: int = 0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    q = jax.random.normal(ks[0], (1, t, HQ, D), dtype)
    k = jax.random.normal(ks[1], (1, t, H, D), dtype)
    v = jax.random.normal(ks[2], (1, t, H, D), dtype)
    gates = [
        jax.nn.sigmoid(jax.random.normal(ks[3 + i], (1, t, HQ))).astype(dtype) for i in range(3)
    ]
    do = jax.random.normal(ks[6], (1, t, HQ, D), dtype)
    return q, k, v, gates, do


def rel(a, b) -> float:
    """||a - b|| / ||b||; equal infinities (lse of a query that sees nothing) count as 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    same_inf = (a == b) & np.isinf(b)
    a, b = np.where(same_inf, 0.0, a), np.where(same_inf, 0.0, b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def flops(t: int) -> dict[str, float]:
    """Useful forward matmul FLOPs per branch (4*D per (query head, key) pair; scoring 2*D)."""
    pairs_cmp = sum(max(0, (i + 1) // BS) for i in range(0, t, BS)) * BS  # sum_t visible blocks
    pairs_slc = sum(min(S * BS, (i // BS + 1) * BS) for i in range(0, t, BS)) * BS
    pairs_swa = sum(min(W, i + 1) for i in range(t))
    return {
        "cmp": 4 * D * HQ * pairs_cmp,
        "topk": 2 * D * HQ * pairs_cmp,
        "slc": 4 * D * HQ * pairs_slc,
        "swa": 4 * D * HQ * pairs_swa,
    }


def check(t: int, grads: bool) -> None:
    q, k, v, gates, do = inputs(t, jnp.bfloat16, seed=1)
    ours = jax.jit(functools.partial(nsa_gpu, return_block_indices=True, **KW))
    ref = functools.partial(reference.nsa_reference, return_block_indices=True, **KW)
    (o, _), (ro, _) = ours(q, k, v, *gates), ref(q, k, v, *gates)
    line = f"check T={t} bf16: o rel err {rel(o, ro):.2e}"
    if grads:

        def loss(f, *a):
            return jnp.sum(f(*a, **KW).astype(jnp.float32) * do.astype(jnp.float32))

        g_ours = jax.jit(jax.grad(functools.partial(loss, nsa_gpu), argnums=tuple(range(6))))
        g_ref = jax.jit(
            jax.grad(functools.partial(loss, reference.nsa_reference), argnums=tuple(range(6)))
        )
        up = [x.astype(jnp.float32) for x in (q, k, v, *gates)]
        with jax.default_matmul_precision("highest"):
            g32 = g_ref(*up)
        for name, fn in (("ours", g_ours), ("reference bf16", g_ref)):
            errs = " ".join(
                f"{rel(a, b):.2e}" for a, b in zip(fn(q, k, v, *gates), g32, strict=True)
            )
            line += f"\n   grads (q,k,v,g_cmp,g_slc,g_swa) {name} vs fp32 reference: {errs}"
    print(line, flush=True)
    # Block indices on fp32 inputs: our whole path (lse + top-k) vs the reference's.
    q, k, v, gates, _ = inputs(t, jnp.float32, seed=2)
    with jax.default_matmul_precision("highest"):
        _, _, _, idx = jax.jit(functools.partial(nsa_branches, **KW))(q, k, v)
        kc = reference.mean_pool(k, BS)
        _, lse = jax.jit(
            functools.partial(reference.compression_attention, block_size=BS, scale=SCALE)
        )(q, kc, kc)
        ridx = jax.jit(
            functools.partial(reference.select_blocks, block_size=BS, block_count=S, scale=SCALE)
        )(q, kc, lse)
    idx, ridx = np.asarray(idx), np.asarray(ridx)
    bad = np.argwhere((idx != ridx).any(-1))
    print(
        f"check T={t} fp32 block indices: {len(bad)} of {idx.shape[1] * H} (token, kv head) rows "
        f"differ",
        flush=True,
    )
    for b_, i, h in bad[:3]:
        print(
            f"   row t={i} h={h}: ours-only {sorted(set(idx[b_, i, h]) - set(ridx[b_, i, h]))} "
            f"ref-only {sorted(set(ridx[b_, i, h]) - set(idx[b_, i, h]))}"
        )


def branch_fns(t: int) -> tuple[dict, dict]:
    """Jitted per-branch functions at length t and their arguments: name -> fn, name -> args."""
    q, k, v, _, do = inputs(t, jnp.bfloat16)
    off = jnp.zeros((1,), jnp.int32)
    kc, vc = reference.mean_pool(k, BS), reference.mean_pool(v, BS)
    fl = dict(scale=SCALE, block_size=BS, window=W, interpret=False)
    sl = dict(scale=SCALE, block_size=BS, interpret=False)
    cmp_cfg = BranchConfig("cmp", SCALE, BS, W, interpret=False, static_offset=0)
    fns = {
        "cmp": jax.jit(functools.partial(flash_forward, cfg=cmp_cfg)),
        "topk": jax.jit(
            functools.partial(
                select_blocks,
                block_size=BS,
                block_count=S,
                scale=SCALE,
                interpret=False,
                static_offset=0,
            )
        ),
        "slc": jax.jit(lambda *xs: gpu_selection.selection_fwd(*xs, **sl)[:2]),
        "swa": jax.jit(functools.partial(flash_forward, cfg=cmp_cfg._replace(mode="swa"))),
        "cmp_bwd": jax.jit(functools.partial(gpu_flash.flash_bwd, mode="cmp", **fl)),
        "slc_bwd": jax.jit(functools.partial(gpu_selection.selection_bwd, **sl)),  # fwd's index
        "swa_bwd": jax.jit(functools.partial(gpu_flash.flash_bwd, mode="swa", **fl)),
    }
    o_c, lse_c = fns["cmp"](q, kc, vc, off)
    idx = fns["topk"](q, kc, lse_c, off)
    o_s, lse_s, index = jax.jit(functools.partial(gpu_selection.selection_fwd, **sl))(
        q, k, v, idx, off
    )
    o_w, lse_w = fns["swa"](q, k, v, off)
    args = {
        "cmp": (q, kc, vc, off),
        "topk": (q, kc, lse_c, off),
        "slc": (q, k, v, idx, off),
        "swa": (q, k, v, off),
        "cmp_bwd": (q, kc, vc, o_c, lse_c, do, off),
        "slc_bwd": (q, k, v, idx, index, o_s, lse_s, do, off),
        "swa_bwd": (q, k, v, o_w, lse_w, do, off),
    }
    return fns, args


def branch_times(t: int) -> dict[str, float]:
    """Per-branch forward and backward times (ms)."""
    fns, args = branch_fns(t)
    return {n: bench(f, *args[n], reps=5 if n.endswith("_bwd") else 10) for n, f in fns.items()}


def timings(seqs: list[int], dense: bool) -> None:
    """The timing tables, shortest length first: the peak-memory column reads the process-wide
    peak, which a longer length run earlier would already have raised."""
    dev = jax.devices()[0]
    rows, split_rows = [], []
    for t in sorted(seqs):
        try:
            one_length(t, dev, dense, rows, split_rows)
        except Exception:
            traceback.print_exc()
    print_tables(rows, split_rows)


def one_length(t: int, dev, dense: bool, rows: list[str], split_rows: list[str]) -> None:
    q, k, v, gates, do = inputs(t, jnp.bfloat16)
    fwd = jax.jit(functools.partial(nsa_gpu, **KW))

    def loss(q, k, v, a, b, c):
        return jnp.sum(nsa_gpu(q, k, v, a, b, c, **KW).astype(jnp.float32) * do.astype(jnp.float32))

    fwdbwd = jax.jit(jax.grad(loss, argnums=tuple(range(6))))
    base = dev.memory_stats()["bytes_in_use"]
    t_f = bench(fwd, q, k, v, *gates)
    t_fb = bench(fwdbwd, q, k, v, *gates, reps=5)
    peak = (dev.memory_stats()["peak_bytes_in_use"] - base) / 2**30
    br = branch_times(t)
    fl = flops(t)
    tf = {n: fl[n] / br[n] / 1e9 for n in fl}
    tfb = {n: 2.5 * fl[n] / br[n + "_bwd"] / 1e9 for n in ("cmp", "slc", "swa")}
    split_rows.append(
        f"| {t // 1024}K | {br['cmp']:.2f} ({tf['cmp']:.0f}) | {br['topk']:.2f} ({tf['topk']:.0f})"
        f" | {br['slc']:.2f} ({tf['slc']:.0f}) | {br['swa']:.2f} ({tf['swa']:.0f})"
        f" | {br['cmp_bwd']:.2f} ({tfb['cmp']:.0f}) | {br['slc_bwd']:.2f} ({tfb['slc']:.0f})"
        f" | {br['swa_bwd']:.2f} ({tfb['swa']:.0f}) |"
    )
    d_f = d_fb = float("nan")
    if dense:

        def dpa(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

        d_f = bench(jax.jit(dpa), q, k, v, reps=5)
        d_fb = bench(
            jax.jit(
                jax.grad(
                    lambda q, k, v: jnp.sum(
                        dpa(q, k, v).astype(jnp.float32) * do.astype(jnp.float32)
                    ),
                    argnums=(0, 1, 2),
                )
            ),
            q,
            k,
            v,
            reps=3,
        )
    a_f, a_fb = ANCHOR_FWD.get(t, (None, None)), ANCHOR_FWDBWD.get(t, (None, None))
    if ANCHOR_DEVICE not in dev.device_kind:
        a_f = a_fb = (None, None)

    def ratio(x, ours):
        return f"{x / ours:.1f}x" if x else "-"

    rows.append(
        f"| {t // 1024}K | {t_f:.2f} | {t_fb:.2f} | {peak:.2f} | {d_f:.2f} | {d_fb:.2f} | "
        f"{d_fb / t_fb:.1f}x | {ratio(a_fb[0], t_fb)} | {ratio(a_fb[1], t_fb)} | "
        f"{ratio(a_f[1], t_f)} |"
    )
    print(rows[-1], flush=True)
    print(split_rows[-1], flush=True)


def print_tables(rows: list[str], split_rows: list[str]) -> None:
    kind = jax.devices()[0].device_kind
    if ANCHOR_DEVICE not in kind:
        print(f"\nThe anchors were measured on an {ANCHOR_DEVICE}, not on this {kind}: no ratios.")
    print(
        "\n| T | ours fwd ms | ours fwd+bwd ms | peak extra GiB (fwd+bwd) | cuDNN dense fwd | "
        "cuDNN dense fwd+bwd | speedup vs cuDNN (fwd+bwd) | vs fla 64/4 + SWA (fwd+bwd) | "
        "vs mdy666 + SWA (fwd+bwd) | vs mdy666 + SWA (fwd) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nPer branch, ms (effective TFLOP/s):\n")
    print("| T | cmp fwd | top-k | slc fwd | swa fwd | cmp bwd | slc bwd | swa bwd |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(split_rows))


def device_kernels(fn, *args, calls: int = 3) -> list[tuple[str, float]]:
    """Per-kernel device time (ms per call) of a jitted fn, read from a JAX profiler trace."""
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
        (path,) = Path(d).glob("**/perfetto_trace.json.gz")
        events = json.load(gzip.open(path))["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("name") == "thread_name"
    }
    gpu = {key: n for key, n in threads.items() if "GPU" in procs.get(key[0], "")}
    streams = {key for key, n in gpu.items() if "Stream" in n} or set(gpu)  # kernel lines
    total: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in streams:
            total[e["name"]] += e["dur"] / 1e3 / calls
    return sorted(total.items(), key=lambda x: -x[1])


def profile(t: int) -> None:
    """Device time per kernel of each branch (and of the whole fwd+bwd) at length t."""
    fns, args = branch_fns(t)
    q, k, v, gates, do = inputs(t, jnp.bfloat16)

    def loss(q, k, v, a, b, c):
        return jnp.sum(nsa_gpu(q, k, v, a, b, c, **KW).astype(jnp.float32) * do.astype(jnp.float32))

    fns["nsa fwd+bwd"] = jax.jit(jax.grad(loss, argnums=tuple(range(6))))
    args["nsa fwd+bwd"] = (q, k, v, *gates)
    for name, fn in fns.items():
        kernels = device_kernels(fn, *args[name])
        shown = 40 if name == "nsa fwd+bwd" else 12
        top = "; ".join(f"{n[:60]} {ms:.2f}" for n, ms in kernels[:shown])
        print(f"profile T={t} {name}: sum {sum(ms for _, ms in kernels):.2f} ms: {top}", flush=True)


MOSAIC_FWD = [  # the first variant is the default (the Mosaic-GPU forward runs on Hopper)
    {},
    {"BK": 64},
    {"BK": 64, "STAGES": 3},
]
FLASH_BWD = [
    {},
    {"DQ_ROWS": 128, "DQ_LAUNCH": (8, 2)},
    {"DQ_LAUNCH": (4, 3)},
    {"DQ_KEYS": 128},
    {"BWD_LAUNCH": (4, 3)},
    {"BWD_ROWS": 128, "BWD_LAUNCH": (8, 2)},
]
SWEEP = {  # branch -> (module, variants of its tile / launch constants; the first is the default)
    "cmp": (gpu_mosaic, MOSAIC_FWD),
    "swa": (gpu_mosaic, MOSAIC_FWD),
    "cmp_bwd": (gpu_flash, FLASH_BWD),
    "swa_bwd": (gpu_flash, FLASH_BWD),
    "slc": (
        gpu_selection,
        [
            {},
            {"ITEM": 2048},
            {"ITEM": 512},
            {"PARTIAL_BYTES": 8 * 2**30},
            {"FWD_LAUNCH": (4, 2)},
            {"MERGE_LAUNCH": (4, 2)},
            {"MERGE_LAUNCH": (8, 3)},
            {"MERGE_ROWS": 256, "MERGE_LAUNCH": (8, 3)},
        ],
    ),
    "slc_bwd": (
        gpu_selection,
        [
            {},  # on the forward's chunks and work items: its index is an argument
            {"BWD_LAUNCH": (4, 2)},
        ],
    ),
    "topk": (
        select_module,
        [
            {},  # the score runs in gpu_mosaic_score on Hopper: the select's variants
            {"SELECT_ELEMS": 4096, "SELECT_WARPS": 4},
            {"SELECT_ELEMS": 1024},
            {"SELECT_WARPS": 1},
            {"SELECT_ELEMS": 1024, "SELECT_WARPS": 1},
        ],
    ),
}


def sweep(t: int, branches: list[str]) -> None:
    """Tile / launch variants of the flash kernels, chunk sizes of the selection kernels and
    variants of the top-k score kernel at length t: ms, the difference vs the default (rel.
    error; top-k: rows that differ) and the five longest device kernels (ms)."""
    fns, args = branch_fns(t)
    for name in branches:
        module, variants = SWEEP[name]
        first = None
        for var in variants:
            saved = {key: getattr(module, key) for key in var}
            for key, val in var.items():
                setattr(module, key, val)
            try:
                # A fresh function: jax.jit of the same function object would reuse the trace
                # made with the default constants.
                f = jax.jit(lambda *xs, _fn=fns[name].__wrapped__: _fn(*xs))
                out = jax.tree.leaves(f(*args[name]))
                first = first or out
                if name == "topk":
                    diff = f"{int(np.sum(np.any(out[0] != first[0], axis=-1)))} rows differ"
                else:
                    diff = " ".join(f"{rel(a, b):.1e}" for a, b in zip(out, first, strict=True))
                ms = bench(f, *args[name], reps=5)
                top = "; ".join(
                    f"{n[:24]} {x:.2f}" for n, x in device_kernels(f, *args[name], calls=1)[:5]
                )
                print(f"sweep T={t} {name} {var}: {ms:.2f} ms ({diff}) | {top}", flush=True)
            except Exception as e:
                print(f"sweep T={t} {name} {var}: FAILED {e!r}"[:400], flush=True)
            finally:
                for key, val in saved.items():
                    setattr(module, key, val)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="8192,32768,65536,131072")
    ap.add_argument("--check-seqs", default="8192,32768")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--sweep", default="", help="sweep launch parameters at these T (a,b,...)")
    ap.add_argument("--sweep-branches", default=",".join(SWEEP), help="of " + ",".join(SWEEP))
    ap.add_argument("--profile", default="", help="device time per kernel at these T (a,b,...)")
    a = ap.parse_args()
    print("jax", jax.__version__, jax.devices(), flush=True)
    if not a.no_check:
        for i, t in enumerate(int(x) for x in a.check_seqs.split(",")):
            try:
                check(t, grads=i == 0)
            except Exception as e:  # keep going: the timings still come back
                print(f"check T={t} FAILED: {e!r}"[:2000], flush=True)
    if not a.no_time:
        timings([int(x) for x in a.seqs.split(",")], dense=not a.no_dense)
    for t in [int(x) for x in a.sweep.split(",") if x]:  # after the timings (process-wide peak)
        sweep(t, a.sweep_branches.split(","))
    for t in [int(x) for x in a.profile.split(",") if x]:
        profile(t)


if __name__ == "__main__":
    main()
