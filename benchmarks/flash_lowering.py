"""Pallas lowerings on GPU: our Triton-lowered flash kernel vs JAX's Mosaic-GPU flash attention.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python3 benchmarks/flash_lowering.py [--seqs 32768,131072]

Both run the same attention, B=1, 28 query / 4 KV heads, D=128, fp16 (the Mosaic kernel's shared
memory buffers are fp16: bf16 inputs fail to lower in jax 0.11.2), random inputs:
    "cmp"     the compression branch's shape: T queries over T/64 keys, all visible (our
              `gpu_flash` in mode "cmp" with block_size 1 and the queries placed after the keys),
              forward and forward+backward;
    "causal"  T queries over themselves, causal (`gpu_flash` "cmp" with block_size 1, offset 0),
              forward only (the Mosaic kernel has no causal backward); cuDNN beside them.
The Mosaic-GPU kernel is `jax.experimental.pallas.ops.gpu.attention_mgpu` (warp-specialised, TMA,
wgmma), run at each of its tile configs below; the table keeps the fastest. Effective TFLOP/s count
useful matmul FLOPs: 4 * HQ * D per visible (query, key) pair forward, 3.5x that forward+backward.
Checks: max |ours - other| / max |other| of o (and dq, dk, dv). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import bench  # noqa: E402
from pallas_kernels.nsa import gpu_flash  # noqa: E402

HQ, H, D = 28, 4, 128
SCALE = D**-0.5
DTYPE = jnp.float16
MOSAIC_TILES = ((64, 64), (64, 128), (128, 64), (64, 256))  # (block_q, block_kv)


def ours(off: int):
    """(fwd, fwd+bwd) of our Triton-lowered kernel; queries sit at positions off + i."""
    kw = dict(mode="cmp", scale=SCALE, block_size=1, window=0, interpret=False)
    offset = jnp.full((1,), off, jnp.int32)

    def fwd(q, k, v):
        return gpu_flash.flash_fwd(q, k, v, offset, **kw)[0]

    def fwd_bwd(q, k, v, do):
        o, lse = gpu_flash.flash_fwd(q, k, v, offset, **kw)
        return o, *gpu_flash.flash_bwd(q, k, v, o, lse, do, offset, **kw)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def mosaic(block_q: int, block_kv: int, causal: bool):
    """(fwd, fwd+bwd) of JAX's Mosaic-GPU attention at one tile config."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu

    cfg = mgpu.TuningConfig(
        block_q=block_q,
        block_kv=block_kv,
        max_concurrent_steps=2,
        causal=causal,
        block_q_dkv=64,
        block_kv_dkv=64,
        block_q_dq=64,
        block_kv_dq=64,
    )

    def fwd(q, k, v):
        return mgpu.attention(q * SCALE, k, v, cfg)  # the kernel applies no scale

    def fwd_bwd(q, k, v, do):
        o, pull = jax.vjp(fwd, q, k, v)
        return o, *pull(do)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def cudnn_causal(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def best_mosaic(causal: bool, args: tuple, with_bwd: bool):
    """Fastest Mosaic tile config -> (tiles, fwd ms, fwd+bwd ms or None, outputs) or an error."""
    best, errors = None, []
    for tiles in MOSAIC_TILES:
        try:
            fwd, fwd_bwd = mosaic(*tiles, causal)
            ms_f = bench(fwd, *args[:3])
            ms_b = bench(fwd_bwd, *args) if with_bwd else None
        except Exception as e:  # a tile config the kernel rejects (shared memory, divisibility)
            errors.append(f"{tiles}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        print(f"  mosaic {tiles} causal={causal}: fwd {ms_f:.2f} ms, fwd+bwd {ms_b}", flush=True)
        if best is None or ms_f < best[1]:
            out = jax.device_get(fwd_bwd(*args) if with_bwd else (fwd(*args[:3]),))
            best = (tiles, ms_f, ms_b, out)
    return best, errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", default="32768,131072")
    args = p.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    rows = []
    for t in (int(x) for x in args.seqs.split(",")):
        for case in ("cmp", "causal"):
            tk = t // 64 if case == "cmp" else t
            ks = jax.random.split(jax.random.PRNGKey(t), 4)
            q = jax.random.normal(ks[0], (1, t, HQ, D), DTYPE)
            k = jax.random.normal(ks[1], (1, tk, H, D), DTYPE)
            v = jax.random.normal(ks[2], (1, tk, H, D), DTYPE)
            do = jax.random.normal(ks[3], q.shape, DTYPE)
            pairs = t * tk if case == "cmp" else t * (t + 1) / 2
            gflop = 4 * HQ * D * pairs / 1e9
            with_bwd = case == "cmp"
            fwd, fwd_bwd = ours(tk if case == "cmp" else 0)
            ms_f = bench(fwd, q, k, v)
            ms_b = bench(fwd_bwd, q, k, v, do) if with_bwd else None
            mine = jax.device_get(fwd_bwd(q, k, v, do) if with_bwd else (fwd(q, k, v),))
            print(f"T={t} {case} ours: fwd {ms_f:.2f} ms, fwd+bwd {ms_b}", flush=True)
            best, errors = best_mosaic(case == "causal", (q, k, v, do), with_bwd)
            for err in errors:
                print(f"  mosaic skipped {err}", flush=True)
            if best is None:
                mos = "failed | - | - | -"
            else:
                tiles, mf, mb, out = best
                diffs = " / ".join(f"{max_rel(a, b):.1e}" for a, b in zip(mine, out, strict=True))
                mos = f"{mf:.2f} ({gflop / mf:.0f}) | {tiles} | " + (
                    f"{mb:.2f} ({3.5 * gflop / mb:.0f}) | {diffs}" if mb else f"- | {diffs}"
                )
            cud = "-"
            if case == "causal":
                ms_c = bench(jax.jit(cudnn_causal), q, k, v)
                cud = f"{ms_c:.2f} ({gflop / ms_c:.0f})"
            ours_b = f"{ms_b:.2f} ({3.5 * gflop / ms_b:.0f})" if ms_b else "-"
            rows.append(
                f"| {t:,} | {case} | {tk:,} | {ms_f:.2f} ({gflop / ms_f:.0f}) | {ours_b} | {mos} "
                f"| {cud} |"
            )
    print(
        "\n| T | case | keys | Triton (ours) fwd ms (TFLOP/s) | Triton fwd+bwd | Mosaic-GPU fwd "
        "| Mosaic tiles | Mosaic fwd+bwd | max diff ours vs Mosaic (o / dq / dk / dv) "
        "| cuDNN fwd |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
