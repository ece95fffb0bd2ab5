"""Dense text rows of a VideoNSA layer: chunked XLA `dense_attention` vs Pallas `rows_attention`.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python3 benchmarks/rows_attention.py [--seqs 32768,132096]
        [--rows 1024] [--prefix 16] [--sweep 256,1024,4096] [--cudnn] [--reps 10]

Config: B=1, 28 query / 4 KV heads, D=128, bf16, random inputs, all keys valid; the rows are the
configs/long128k.py layout: `prefix` rows at the start, the rest at the end of the T keys. Times:
median of jitted calls (block_until_ready) of the forward and of forward+backward (o and the
grads of q, k, v for a random output cotangent), both paths fed the same gathered rows. Effective
TFLOP/s count useful matmul FLOPs only: 4 * HQ * D per visible (row, key) pair forward, 3.5x that
forward+backward. Checks: max |Pallas - XLA| over max |XLA| of o, dq, dk, dv. --sweep times the
Pallas path at other TARGET_PROGRAMS (key splits of the forward / dq walks). Prints markdown tables.

`--prefix 0 --rows T/c` is the last shard of context-parallel dense attention
(`context.dense_attention`: T/c contiguous rows over all T keys, the slowest shard); `--cudnn` adds
cuDNN causal attention over all T rows, the one-GPU dense path, for comparison.
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
from pallas_kernels.nsa import gpu_rows  # noqa: E402
from videonsa_jax.model import attention  # noqa: E402

HQ, H, D = 28, 4, 128


def pallas_rows(q, k, v, q_index, kv_valid):
    return gpu_rows.rows_attention(q, k, v, q_index, kv_valid)


def inputs(t: int, rows: int, prefix: int, seed: int = 0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (1, rows, HQ, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, t, H, D), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, t, H, D), jnp.bfloat16)
    do = jax.random.normal(ks[3], q.shape, jnp.bfloat16)
    q_index = jnp.concatenate([jnp.arange(prefix), jnp.arange(t - rows + prefix, t)])
    return q, k, v, q_index[None].astype(jnp.int32), jnp.ones((1, t), bool), do


def programs(fn):
    """(jitted fwd, jitted fwd+bwd) of a rows-attention function, traced afresh."""

    def fwd(q, k, v, q_index, kv_valid):
        return fn(q, k, v, q_index, kv_valid)

    def fwd_bwd(q, k, v, q_index, kv_valid, do):
        o, pull = jax.vjp(lambda q, k, v: fn(q, k, v, q_index, kv_valid), q, k, v)
        return o, *pull(do)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def cudnn_full(q, k, v, q_index, kv_valid):
    """One-GPU dense attention of all T rows (`attention.cudnn_causal_attention`; q_index is
    arange(T) implicitly)."""
    return attention.cudnn_causal_attention(q, k, v, kv_valid)


def max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", default="32768,132096")
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--prefix", type=int, default=16)
    p.add_argument("--sweep", default="", help="TARGET_PROGRAMS values to time, e.g. 256,4096")
    p.add_argument("--cudnn", action="store_true", help="also time cuDNN over all T rows")
    p.add_argument("--reps", type=int, default=10, help="timed calls per measurement")
    args = p.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    table, sweep, full = [], [], []
    for t in (int(x) for x in args.seqs.split(",")):
        q, k, v, q_index, kv_valid, do = inputs(t, args.rows, args.prefix)
        gflop = 4 * HQ * D * float(np.minimum(np.asarray(q_index, np.int64) + 1, t).sum()) / 1e9
        got = {}
        for name, fn in (("xla", attention.xla_rows_attention), ("pallas", pallas_rows)):
            fwd, fwd_bwd = programs(fn)
            got[name] = jax.device_get(fwd_bwd(q, k, v, q_index, kv_valid, do))
            ms = (
                bench(fwd, q, k, v, q_index, kv_valid, reps=args.reps),
                bench(fwd_bwd, q, k, v, q_index, kv_valid, do, reps=args.reps),
            )
            got[name + "_ms"] = ms
            print(f"T={t} {name}: fwd {ms[0]:.2f} ms, fwd+bwd {ms[1]:.2f} ms", flush=True)
        diffs = [max_rel(a, b) for a, b in zip(got["pallas"], got["xla"], strict=True)]
        (xf, xb), (pf, pb) = got["xla_ms"], got["pallas_ms"]
        table.append(
            f"| {t:,} | {args.rows:,} | {xf:.2f} | {pf:.2f} | {xf / pf:.1f}x | {xb:.2f} | {pb:.2f} "
            f"| {xb / pb:.1f}x | {gflop / pf:.0f} / {3.5 * gflop / pb:.0f} | "
            + " / ".join(f"{x:.1e}" for x in diffs)
            + " |"
        )
        default = gpu_rows.TARGET_PROGRAMS
        for target in (int(x) for x in args.sweep.split(",") if x):
            gpu_rows.TARGET_PROGRAMS = target
            fwd, fwd_bwd = programs(pallas_rows)  # the constant is read when tracing
            ms = (
                bench(fwd, q, k, v, q_index, kv_valid, reps=args.reps),
                bench(fwd_bwd, q, k, v, q_index, kv_valid, do, reps=args.reps),
            )
            sweep.append(f"| {t:,} | {target} | {ms[0]:.2f} | {ms[1]:.2f} |")
            print(sweep[-1], flush=True)
        gpu_rows.TARGET_PROGRAMS = default
        if args.cudnn:
            qf, *_, dof = inputs(t, t, 0)
            fwd, fwd_bwd = programs(cudnn_full)
            ms = (
                bench(fwd, qf, k, v, None, kv_valid, reps=args.reps),
                bench(fwd_bwd, qf, k, v, None, kv_valid, dof, reps=args.reps),
            )
            full.append(
                f"| {t:,} | {ms[0]:.2f} | {ms[1]:.2f} | {pf / ms[0]:.2f} | {pb / ms[1]:.2f} |"
            )
            print(full[-1], flush=True)
    print(
        "\n| T | rows | XLA fwd ms | Pallas fwd ms | speedup | XLA fwd+bwd ms | Pallas fwd+bwd ms "
        "| speedup | Pallas TFLOP/s fwd / fwd+bwd | max diff / max XLA: o / dq / dk / dv |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(table))
    if full:
        print(
            "\n| T | cuDNN all T rows fwd ms | fwd+bwd ms | Pallas rows / cuDNN fwd "
            "| fwd+bwd |\n|---|---|---|---|---|"
        )
        print("\n".join(full))
    if sweep:
        print("\n| T | TARGET_PROGRAMS | Pallas fwd ms | Pallas fwd+bwd ms |\n|---|---|---|---|")
        print("\n".join(sweep))


if __name__ == "__main__":
    main()
