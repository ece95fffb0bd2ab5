"""The plain-JAX NSA reference (variant `videonsa`) against fla-core's naive torch NSA on CPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import nsa_oracle as oracle  # skips this module without torch / fla-core
import numpy as np
import pytest

from pallas_kernels.nsa import nsa, ops
from pallas_kernels.nsa import reference as ref

torch = oracle.torch
TOL = dict(rtol=1e-5, atol=1e-5)

# (B, T, HQ, H, D, block_size, block_count, window_size): together they cover G in {1, 2, 5, 7, 16},
# T in {1, 37, 64, 200, 1000}, D in {64, 128}, BS in {16, 64}, T % BS != 0, NB < S and NB > S.
CASES = [
    (1, 1, 2, 2, 64, 16, 4, 8),
    (2, 37, 4, 2, 128, 16, 3, 16),
    (1, 64, 5, 1, 64, 64, 4, 32),
    (1, 200, 7, 1, 128, 16, 4, 50),
    (1, 200, 16, 1, 64, 64, 3, 64),
    (1, 1000, 4, 2, 64, 16, 8, 100),
]


def _inputs(b, t, hq, h, d, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, hq, d), np.float32)
    k = rng.standard_normal((b, t, h, d), np.float32)
    v = rng.standard_normal((b, t, h, d), np.float32)
    gates = tuple(rng.uniform(size=(b, t, hq)).astype(np.float32) for _ in range(3))
    return q, k, v, gates


@functools.cache
def _oracle(case):
    b, t, hq, h, d, bs, s, w = case
    q, k, v, gates = _inputs(b, t, hq, h, d)
    tq, tk, tv, *tg = map(oracle.to_torch, (q, k, v, *gates))
    with torch.no_grad():
        outs = oracle.nsa(
            tq, tk, tv, *tg, block_size=bs, block_count=s, window_size=w, scale=d**-0.5
        )
    return [x.numpy() for x in outs]


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "B{}-T{}-HQ{}-H{}-D{}-BS{}-S{}-W{}".format(*c)
)
def test_matches_fla_naive(case):
    b, t, hq, h, d, bs, s, w = case
    q, k, v, gates = _inputs(b, t, hq, h, d)
    scale = d**-0.5
    o_t, o_cmp_t, lse_t, idx_t, o_slc_t, _ = _oracle(case)

    kc, vc = ref.mean_pool(k, bs), ref.mean_pool(v, bs)
    np.testing.assert_allclose(kc, oracle.mean_pool(oracle.to_torch(k), bs).numpy(), **TOL)
    o_cmp, lse = ref.compression_attention(q, kc, vc, block_size=bs, scale=scale)
    np.testing.assert_allclose(o_cmp, o_cmp_t, **TOL)
    np.testing.assert_allclose(lse, lse_t, **TOL)  # -inf where no block is visible, in both

    idx = ref.select_blocks(q, kc, lse, block_size=bs, block_count=s, scale=scale)
    np.testing.assert_array_equal(idx, oracle.canonical_indices(idx_t))

    o_slc = ref.selection_attention(q, k, v, idx, block_size=bs, scale=scale)
    np.testing.assert_allclose(o_slc, o_slc_t, **TOL)

    o, idx_full = ref.nsa_reference(
        q, k, v, *gates, block_size=bs, block_count=s, window_size=w, return_block_indices=True
    )
    np.testing.assert_array_equal(idx_full, idx)
    np.testing.assert_allclose(o, o_t, **TOL)


@pytest.mark.parametrize("case", [(1, 37, 4, 2, 64, 16, 3, 20), (1, 80, 16, 1, 64, 16, 4, 24)])
def test_gradients_match_torch_autograd(case):
    b, t, hq, h, d, bs, s, w = case
    q, k, v, gates = _inputs(b, t, hq, h, d, seed=1)
    ct = np.random.default_rng(2).standard_normal((b, t, hq, d), np.float32)

    tensors = [oracle.to_torch(x).requires_grad_() for x in (q, k, v, *gates)]
    o_t = oracle.nsa(*tensors, block_size=bs, block_count=s, window_size=w, scale=d**-0.5)[0]
    (o_t * oracle.to_torch(ct)).sum().backward()

    def loss(*args):
        o = ref.nsa_reference(*args, block_size=bs, block_count=s, window_size=w)
        return jnp.sum(o * ct)

    grads = jax.grad(loss, argnums=tuple(range(6)))(q, k, v, *gates)
    for name, g, x in zip(("q", "k", "v", "g_cmp", "g_slc", "g_swa"), grads, tensors, strict=True):
        np.testing.assert_allclose(g, x.grad.numpy(), err_msg=name, **TOL)


def test_q_offset_slices_equal_full_rows():
    b, t, hq, h, d, bs, s, w = 1, 150, 6, 2, 64, 16, 4, 20
    q, k, v, gates = _inputs(b, t, hq, h, d, seed=3)
    kwargs = dict(block_size=bs, block_count=s, window_size=w, return_block_indices=True)
    o_full, idx_full = ref.nsa_reference(q, k, v, *gates, **kwargs)

    def rows(x, start, n):
        return x[:, start : start + n]

    @jax.jit
    def traced(start):  # q_offset as a traced scalar, as under shard_map
        def sl(x):
            return jax.lax.dynamic_slice_in_dim(x, start, 50, axis=1)

        return ref.nsa_reference(sl(q), k, v, *map(sl, gates), q_offset=start, **kwargs)

    for start, n in ((0, 50), (50, 50), (100, 50), (37, 13), (t - 1, 1)):
        o, idx = ref.nsa_reference(
            rows(q, start, n), k, v, *(rows(g, start, n) for g in gates), q_offset=start, **kwargs
        )
        np.testing.assert_allclose(o, rows(o_full, start, n), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(idx, rows(idx_full, start, n))
    for start in (0, 50, 100):
        o, idx = traced(jnp.int32(start))
        np.testing.assert_allclose(o, rows(o_full, start, 50), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(idx, rows(idx_full, start, 50))


def test_entry_point_dispatch_and_dtype():
    b, t, hq, h, d = 1, 70, 4, 2, 64
    q, k, v, gates = _inputs(b, t, hq, h, d, seed=4)
    kwargs = dict(block_size=16, block_count=4, window_size=32)
    assert ops.AUTO_IMPL["cpu"] == "reference"
    if jax.default_backend() != "cpu":
        pytest.skip("impl='auto' runs the kernels off the CPU; their own tests cover them")
    expected = ref.nsa_reference(q, k, v, *gates, **kwargs)
    np.testing.assert_array_equal(nsa(q, k, v, *gates, **kwargs), expected)
    np.testing.assert_array_equal(nsa(q, k, v, *gates, impl="reference", **kwargs), expected)

    bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, *gates)]
    o16 = nsa(*bf16, **kwargs)
    assert o16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(o16, np.float32), expected, atol=5e-2)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(k_heads=4), "multiple of KV heads"),
        (dict(gate_shape=(1, 10, 5)), "g_cmp shape"),
        (dict(impl="cuda"), "impl must be one of"),
        (dict(block_size=0), "block_size must be a positive int"),
        (dict(k_dim=32), "batch or head dim"),
        (dict(k_dtype=jnp.bfloat16), "one floating dtype"),
    ],
)
def test_bad_input_raises(change, message):
    q = jnp.zeros((1, 10, 6, 64))
    k = jnp.zeros((1, 10, change.get("k_heads", 2), change.get("k_dim", 64)), change.get("k_dtype"))
    g = jnp.zeros(change.get("gate_shape", (1, 10, 6)))
    kwargs = dict(impl=change.get("impl", "auto"), block_size=change.get("block_size", 16))
    with pytest.raises(ValueError, match=message):
        nsa(q, k, k, g, jnp.zeros((1, 10, 6)), jnp.zeros((1, 10, 6)), **kwargs)
