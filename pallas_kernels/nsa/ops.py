"""`nsa`: the one entry point for Native Sparse Attention (variant `videonsa`).

    from pallas_kernels.nsa import nsa
    o = nsa(q, k, v, g_cmp, g_slc, g_swa, block_size=64, block_count=32, window_size=256)

Implementations: "reference" (plain JAX, `reference.nsa_reference`), "pallas" (Pallas GPU
kernels, `pallas_kernels.nsa.gpu.nsa_gpu`), "pallas_tpu" (Pallas TPU kernels,
`pallas_kernels.nsa.tpu.nsa_tpu`). Kernel modules are imported on first use; on a CPU backend they
run in interpret mode.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.nsa import reference

Array = jax.Array

IMPLS = ("auto", "reference", "pallas", "pallas_tpu")

# What impl="auto" runs on each backend. The GPU kernels are measured (benchmarks/RESULTS.md); the
# TPU kernels are verified in the TPU interpreter and lower for TPU but are not yet timed on one.
AUTO_IMPL = {"cpu": "reference", "gpu": "pallas", "tpu": "pallas_tpu"}


def _kernel(impl: str) -> Callable[..., Array]:
    """The Pallas entry point of `impl`, imported on first use."""
    if impl == "pallas":
        from pallas_kernels.nsa.gpu import nsa_gpu

        return nsa_gpu
    from pallas_kernels.nsa.tpu import nsa_tpu

    return nsa_tpu


def _validate(q, k, v, gates, block_size, block_count, window_size, impl) -> None:
    """Raises one ValueError listing every problem with the arguments of `nsa`."""
    problems = []
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        problems.append(
            f"q, k, v must be 4-D [B, T, heads, D]; got {q.shape}, {k.shape}, {v.shape}"
        )
    else:
        if k.shape != v.shape:
            problems.append(f"k and v shapes differ: {k.shape} vs {v.shape}")
        if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
            problems.append(f"q {q.shape} and k {k.shape} differ in batch or head dim")
        if q.shape[1] > k.shape[1]:
            problems.append(f"more queries ({q.shape[1]}) than keys ({k.shape[1]})")
        if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
            problems.append(f"query heads ({q.shape[2]}) not a multiple of KV heads ({k.shape[2]})")
        for name, g in zip(("g_cmp", "g_slc", "g_swa"), gates, strict=True):
            if g.shape != q.shape[:3]:
                problems.append(f"{name} shape {g.shape} != q.shape[:3] {q.shape[:3]}")
    if not (q.dtype == k.dtype == v.dtype) or not jnp.issubdtype(q.dtype, jnp.floating):
        problems.append(f"q, k, v need one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not all(jnp.issubdtype(g.dtype, jnp.floating) for g in gates):
        problems.append(f"gates must be floating; got {[str(g.dtype) for g in gates]}")
    for name, value in (
        ("block_size", block_size),
        ("block_count", block_count),
        ("window_size", window_size),
    ):
        if not isinstance(value, int) or value < 1:
            problems.append(f"{name} must be a positive int; got {value!r}")
    if impl not in IMPLS:
        problems.append(f"impl must be one of {IMPLS}; got {impl!r}")
    if problems:
        raise ValueError("nsa: " + "; ".join(problems))


def nsa(
    q: Array,
    k: Array,
    v: Array,
    g_cmp: Array,
    g_slc: Array,
    g_swa: Array,
    *,
    block_size: int = 64,
    block_count: int = 32,
    window_size: int = 256,
    scale: float | None = None,
    impl: str = "auto",
    return_block_indices: bool = False,
    q_offset: int | Array = 0,
) -> Array | tuple[Array, Array]:
    """Native Sparse Attention: gated sum of compression, top-k selection and sliding window.

    Args:
        q: [B, Tq, HQ, D] queries at absolute positions q_offset .. q_offset + Tq - 1.
        k, v: [B, Tk, H, D] keys and values, HQ % H == 0 (query head h reads KV head h // (HQ//H)).
        g_cmp, g_slc, g_swa: [B, Tq, HQ] branch gates in (0, 1).
        block_size: compression/selection block size BS.
        block_count: blocks S selected per query and KV head.
        window_size: sliding window length W.
        scale: softmax scale; D ** -0.5 if None.
        impl: "auto" | "reference" | "pallas" (GPU kernels) | "pallas_tpu" (TPU kernels).
        return_block_indices: also return the int32 [B, Tq, H, S] selected blocks.
        q_offset: absolute position of query row 0; an int or a traced int32 scalar (sequence
            parallelism passes `axis_index * Tq`).

    Returns:
        o [B, Tq, HQ, D] in q.dtype (and the block indices if requested).

    Raises:
        ValueError: inconsistent shapes, dtypes or hyperparameters, or an unknown impl.
    """
    gates = (g_cmp, g_slc, g_swa)
    _validate(q, k, v, gates, block_size, block_count, window_size, impl)
    kwargs = dict(
        block_size=block_size,
        block_count=block_count,
        window_size=window_size,
        scale=scale,
        return_block_indices=return_block_indices,
        q_offset=q_offset,
    )
    if impl == "auto":
        impl = AUTO_IMPL.get(jax.default_backend(), "reference")
    if impl == "reference":
        return reference.nsa_reference(q, k, v, *gates, **kwargs)
    interpret = jax.default_backend() == "cpu"
    return _kernel(impl)(q, k, v, *gates, interpret=interpret, **kwargs)
