"""Planned device memory of one NSA fwd+bwd (`nsa_gpu`) from XLA's compiled memory analysis.

    python benchmarks/compiled_memory.py [--seq 4096] [--chunks 4] [--blocks 16]

Compiles (does not run) the gradient of sum(nsa_gpu(...) * do) for B=1, 28/4 heads, D=128,
block 64, window 256, bf16, and prints XLA's temp buffer size. On a CPU the kernels compile in
Pallas interpret mode, so the numbers are XLA's buffer plan around them, not a GPU's; that is
enough to see whether a change keeps several query chunks' selection partials live at once.
--chunks sets the selection partial budget so that the forward runs that many query chunks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.nsa_kernels import BS, HQ, D, H, W  # noqa: E402
from pallas_kernels.nsa import gpu_selection  # noqa: E402
from pallas_kernels.nsa.gpu import nsa_gpu  # noqa: E402


def temp_bytes(t: int, chunks: int, blocks: int) -> int:
    """XLA's temp buffer bytes for the NSA fwd+bwd at length t with `chunks` selection chunks."""
    per_token = gpu_selection.partial_bytes_per_query(blocks, HQ, D, jnp.bfloat16)
    gpu_selection.PARTIAL_BYTES = -(-t * per_token // chunks)
    interpret = jax.devices()[0].platform == "cpu"
    kw = dict(block_size=BS, block_count=blocks, window_size=W, interpret=interpret)
    q = jax.ShapeDtypeStruct((1, t, HQ, D), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, t, H, D), jnp.bfloat16)
    gate = jax.ShapeDtypeStruct((1, t, HQ), jnp.float32)

    def loss(q, k, v, do, a, b, c):
        o = nsa_gpu(q, k, v, a, b, c, **kw)
        return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 4, 5, 6)))
    compiled = grad.lower(q, kv, kv, q, gate, gate, gate).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--blocks", type=int, default=16, help="selected blocks per query")
    a = ap.parse_args()
    per_token = gpu_selection.partial_bytes_per_query(a.blocks, HQ, D, jnp.bfloat16)
    partials = a.seq * per_token / a.chunks / 2**20
    temp = temp_bytes(a.seq, a.chunks, a.blocks) / 2**20
    print(
        f"{jax.devices()[0].device_kind}: T={a.seq}, {a.chunks} chunks, {a.blocks} blocks: "
        f"temp {temp:.1f} MiB (one chunk's forward partials {partials:.1f} MiB)"
    )


if __name__ == "__main__":
    main()
