"""NSA Pallas GPU kernels: correctness vs the plain-JAX reference, then the timing table.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python3 benchmarks/nsa_kernels.py [--seqs 8192,32768,...]
        [--check-seqs 8192,32768] [--no-check] [--no-time] [--no-dense]

Config: B=1, 28 query / 4 KV heads, D=128, block 64, 32 blocks, window 256, bf16, random inputs.
Checks: bf16 outputs (and fwd+bwd at the smallest check length) vs `nsa_reference`; block indices
on fp32 inputs vs `reference.select_blocks` (rows that differ are reported with their importance
gap, to tell near-ties from bugs). Timings: median of jitted calls (block_until_ready), ours fwd and
fwd+bwd, per branch fwd/bwd with effective TFLOP/s (useful matmul FLOPs only), cuDNN dense causal
fwd/fwd+bwd, peak extra memory of our fwd+bwd. Prints markdown tables. Imports only jax/numpy.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pallas_kernels.nsa import gpu_flash, gpu_selection, reference  # noqa: E402
from pallas_kernels.nsa.gpu import nsa_branches, nsa_gpu  # noqa: E402
from pallas_kernels.nsa.gpu_topk import select_blocks  # noqa: E402

HQ, H, D, BS, S, W = 28, 4, 128, 64, 32, 256
KW = dict(block_size=BS, block_count=S, window_size=W)
SCALE = D**-0.5

# Anchors measured on the same H100 kind (../shared/anchors/README.md), fwd+bwd ms at 28/4 heads
# (fla runs padded 64/4); both without the window branch, so the cuDNN SWA fwd+bwd is added.
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


def bench(fn, *args, n: int = 10) -> float:
    """Median wall time (ms) of a jitted call, after one warm-up."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


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
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
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


def branch_times(t: int) -> dict[str, float]:
    """Per-branch forward and backward times (ms)."""
    q, k, v, _, do = inputs(t, jnp.bfloat16)
    off = jnp.zeros((1,), jnp.int32)
    kc, vc = reference.mean_pool(k, BS), reference.mean_pool(v, BS)
    fl = dict(scale=SCALE, block_size=BS, window=W, interpret=False)
    cmp_f = jax.jit(functools.partial(gpu_flash.flash_fwd, mode="cmp", **fl))
    swa_f = jax.jit(functools.partial(gpu_flash.flash_fwd, mode="swa", **fl))
    topk = jax.jit(
        functools.partial(select_blocks, block_size=BS, block_count=S, scale=SCALE, interpret=False)
    )
    sl = dict(scale=SCALE, block_size=BS, interpret=False)
    slc_f = jax.jit(functools.partial(gpu_selection.selection_fwd, **sl))
    cmp_b = jax.jit(functools.partial(gpu_flash.flash_bwd, mode="cmp", **fl))
    swa_b = jax.jit(functools.partial(gpu_flash.flash_bwd, mode="swa", **fl))
    slc_b = jax.jit(functools.partial(gpu_selection.selection_bwd, **sl))
    out = {}
    o_c, lse_c = cmp_f(q, kc, vc, off)
    out["cmp"] = bench(cmp_f, q, kc, vc, off)
    idx = topk(q, kc, lse_c, off)
    out["topk"] = bench(topk, q, kc, lse_c, off)
    o_s, lse_s = slc_f(q, k, v, idx, off)
    out["slc"] = bench(slc_f, q, k, v, idx, off)
    o_w, lse_w = swa_f(q, k, v, off)
    out["swa"] = bench(swa_f, q, k, v, off)
    out["cmp_bwd"] = bench(cmp_b, q, kc, vc, o_c, lse_c, do, off, n=5)
    out["slc_bwd"] = bench(slc_b, q, k, v, idx, o_s, lse_s, do, off, n=5)
    out["swa_bwd"] = bench(swa_b, q, k, v, o_w, lse_w, do, off, n=5)
    return out


def timings(seqs: list[int], dense: bool) -> None:
    dev = jax.devices()[0]
    rows, split_rows = [], []
    for t in seqs:
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
    t_fb = bench(fwdbwd, q, k, v, *gates, n=5)
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

        d_f = bench(jax.jit(dpa), q, k, v, n=5)
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
            n=3,
        )
    a_f, a_fb = ANCHOR_FWD.get(t, (None, None)), ANCHOR_FWDBWD.get(t, (None, None))

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


def sweep(t: int) -> None:
    """Selection backward at one length over query-chunk sizes (max differences vs the first)."""
    q, k, v, _, do = inputs(t, jnp.bfloat16)
    off = jnp.zeros((1,), jnp.int32)
    kc = reference.mean_pool(k, BS)
    _, lse = jax.jit(
        functools.partial(
            gpu_flash.flash_fwd, mode="cmp", scale=SCALE, block_size=BS, window=W, interpret=False
        )
    )(q, kc, kc, off)
    idx = jax.jit(
        functools.partial(select_blocks, block_size=BS, block_count=S, scale=SCALE, interpret=False)
    )(q, kc, lse, off)
    sl = dict(scale=SCALE, block_size=BS, interpret=False)
    o, lse_s = jax.jit(functools.partial(gpu_selection.selection_fwd, **sl))(q, k, v, idx, off)
    args = (q, k, v, idx, o, lse_s, do, off)
    first = None
    for chunk in (16384, 13120, 10944):
        f = jax.jit(functools.partial(gpu_selection.selection_bwd, chunk=chunk, **sl))
        new = f(*args)
        first = first or new
        diff = " ".join(f"{n} {rel(a, b):.1e}" for n, a, b in zip("qkv", new, first, strict=True))
        ms = bench(f, *args, n=5)
        print(f"sweep T={t}: selection bwd chunk {chunk}: {ms:.2f} ms ({diff})", flush=True)
        del f, new


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="8192,32768,65536,131072")
    ap.add_argument("--check-seqs", default="8192,32768")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--sweep", type=int, default=0, help="sweep launch parameters at this T")
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
    if a.sweep:  # after the timings: the peak-memory counter is process-wide
        sweep(a.sweep)


if __name__ == "__main__":
    main()
