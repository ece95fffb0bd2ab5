"""Pallas `gpu_rows.rows_attention` vs `attention.dense_attention` on the same query rows.

On CPU the kernels run in Pallas interpret mode at small, odd shapes (GQA groups 1, 5, 7, 8; key
splits 1 and 3; padding rows with arbitrary q_index; invalid keys; rows and whole batch rows that
see no valid key); the `gpu` test runs them compiled in bf16 at the VideoNSA text-row layout.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.nsa.gpu_rows import rows_attention
from videonsa_jax.model import attention

cpu_only = pytest.mark.skipif(jax.default_backend() != "cpu", reason="interpret-mode test")


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _loss(fn, q, k, v, q_index, kv_valid, w):
    o = fn(q, k, v, q_index, kv_valid)
    return jnp.sum(o.astype(jnp.float32) * w), o


def _values_and_grads(fn, *args):
    grad = jax.grad(_loss, argnums=(1, 2, 3), has_aux=True)
    (dq, dk, dv), o = jax.jit(grad, static_argnums=0)(fn, *args)
    return o, dq, dk, dv


# Key tiles start at 0, 64, 128: limits on and next to tile starts catch off-by-one walks.
LIMITS = np.array([0, 1, 30, 49, 63, 64, 64, 65, 127, 128, 128, 129])


@cpu_only
@pytest.mark.parametrize(
    "b,n,s,h,g,dead",
    [
        (2, 7, 130, 1, 7, True),
        (1, 33, 50, 2, 1, False),
        (1, 33, 130, 1, 5, False),
        (2, 1, 50, 1, 8, False),
        (1, 33, 130, 1, 8, False),
    ],
)
def test_values_and_grads(b, n, s, h, g, dead, d=16):
    """fp32: o, dq, dk, dv; batch row 0 has rising limits, row 1 falling ones (or no valid key)."""
    rng = np.random.default_rng(n * s + g)
    ks = jax.random.split(jax.random.PRNGKey(g), 4)
    q = jax.random.normal(ks[0], (b, n, h * g, d), jnp.float32)
    k = jax.random.normal(ks[1], (b, s, h, d), jnp.float32)
    v = jax.random.normal(ks[2], (b, s, h, d), jnp.float32)
    w = jax.random.normal(ks[3], q.shape, jnp.float32)
    q_index = np.sort(rng.choice(LIMITS[LIMITS < s], (b, n)), axis=1)
    q_index[1:] = q_index[1:, ::-1]
    kv_valid = rng.random((b, s)) > 0.2
    kv_valid[0, :5] = False  # rows with q_index < 5 in batch row 0 see no valid key
    if dead:
        kv_valid[1] = False  # a whole padding batch row
    pad = n // 4  # padding rows: any q_index, zero incoming gradient
    if pad:
        q_index[:, -pad:] = np.resize([2**30, s, -7, s // 2], (b, pad))
        w = w.at[:, -pad:].set(0.0)
    args = (q, k, v, jnp.asarray(q_index, jnp.int32), jnp.asarray(kv_valid), w)
    got = _values_and_grads(functools.partial(rows_attention, interpret=True), *args)
    want = _values_and_grads(attention.xla_rows_attention, *args)
    assert np.isfinite(np.asarray(got[0])).all()
    for name, a, r in zip(("o", "dq", "dk", "dv"), got, want, strict=True):
        assert _rel(a, r) < 1e-5, name
    if pad:  # padding rows add nothing to dk / dv: same as without them
        real = (q[:, :-pad], k, v, args[3][:, :-pad], args[4], w[:, :-pad])
        _, _, dk, dv = _values_and_grads(attention.xla_rows_attention, *real)
        assert _rel(got[2], dk) < 1e-5 and _rel(got[3], dv) < 1e-5


@pytest.mark.gpu
def test_gpu_bf16_text_rows():
    """T = 8192, 1,024 rows (16 at the start, 1,008 at the end), 28 / 4 heads, D = 128, bf16,
    right-padded keys; output and grads vs the XLA path on fp32 inputs."""
    t, hq, h, d = 8192, 28, 4, 128
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(ks[0], (1, 1024, hq, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, t, h, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, t, h, d), jnp.bfloat16)
    w = jax.random.normal(ks[3], q.shape, jnp.float32)
    q_index = jnp.concatenate([jnp.arange(16), jnp.arange(t - 1008, t)])[None].astype(jnp.int32)
    kv_valid = (jnp.arange(t) < t - 100)[None]
    got = _values_and_grads(rows_attention, q, k, v, q_index, kv_valid, w)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    with jax.default_matmul_precision("highest"):
        want = _values_and_grads(attention.xla_rows_attention, *f32, q_index, kv_valid, w)
    tols = (1e-2, 2e-2, 2e-2, 2e-2)  # bf16 operands of the p @ v and ds matmuls
    for name, a, r, tol in zip(("o", "dq", "dk", "dv"), got, want, tols, strict=True):
        assert _rel(a, r) < tol, name
