"""NSA Mosaic TPU kernels: values, block indices and gradients vs the plain-JAX reference under
the TPU interpreter with race detection, and a TPU (Mosaic) export of every kernel, fwd and bwd.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.nsa import reference
from pallas_kernels.nsa.tpu import nsa_tpu

INTERPRET = pltpu.InterpretParams(detect_races=True)
SMALL = dict(block_size=8, block_count=4, window_size=16)


@pytest.fixture
def race_log(monkeypatch):
    """Records whether any interpreted kernel saw a race (the interpreter resets per kernel).

    Hooks a private jax module; where it has moved, races are still printed by the interpreter.
    """
    found = []
    try:
        from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret
    except ImportError:
        return found

    class Recording(tpu_interpret.RaceDetectionState):
        @property
        def races_found(self):
            return bool(found)

        @races_found.setter
        def races_found(self, value):
            if value:
                found.append(True)

    monkeypatch.setattr(tpu_interpret, "RaceDetectionState", Recording)
    return found


def _inputs(seed, b, tq, tk, h, g, d, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    q = jax.random.normal(ks[0], (b, tq, h * g, d), dtype)
    k = jax.random.normal(ks[1], (b, tk, h, d), dtype)
    v = jax.random.normal(ks[2], (b, tk, h, d), dtype)
    gates = [jax.nn.sigmoid(jax.random.normal(kk, (b, tq, h * g), dtype)) for kk in ks[3:6]]
    cotangent = jax.random.normal(ks[6], (b, tq, h * g, d), jnp.float32)
    return (q, k, v, *gates), cotangent


def _value_and_grads(fn, args, cotangent, q_offset, **kw):
    """(o, block indices, grads wrt q, k, v and the three gates) of sum(o * cotangent)."""

    def loss(*a):
        o, idx = fn(*a[:6], q_offset=a[6], return_block_indices=True, **kw)
        return jnp.sum(o.astype(jnp.float32) * cotangent), (o, idx)

    run = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True))
    (_, (o, idx)), grads = run(*args, jnp.int32(q_offset))
    return o, idx, grads


def _check(args, cotangent, q_offset, kw, pallas_kw, atol=2e-5):
    o_p, idx_p, g_p = _value_and_grads(
        nsa_tpu, args, cotangent, q_offset, interpret=INTERPRET, **kw, **pallas_kw
    )
    o_r, idx_r, g_r = _value_and_grads(reference.nsa_reference, args, cotangent, q_offset, **kw)
    np.testing.assert_array_equal(np.asarray(idx_p), np.asarray(idx_r))
    np.testing.assert_allclose(np.asarray(o_p), np.asarray(o_r), atol=atol, rtol=atol)
    for name, a, b in zip(("q", "k", "v", "g_cmp", "g_slc", "g_swa"), g_p, g_r, strict=True):
        scale = float(jnp.max(jnp.abs(b))) + 1e-6
        err = float(jnp.max(jnp.abs(a - b))) / scale
        assert err < 20 * atol, f"d{name}: relative error {err}"


# (B, Tq, Tk, H, G, q_offset, pallas options): T not a multiple of the block, several query tiles,
# a key-range split of the dkv kernels, queries that start mid-sequence, NB > 128.
CASES = [
    (1, 27, 27, 2, 1, 0, {"q_tile": 16}),
    (2, 20, 37, 1, 5, 13, {}),
    (1, 24, 32, 1, 7, 8, {"q_tile": 8, "kv_split": 2}),
    (1, 19, 30, 1, 8, 11, {}),
    (1, 16, 1100, 1, 2, 1084, {}),  # NB = 138: two compressed-key chunks of 128
]


@pytest.mark.parametrize("b,tq,tk,h,g,q_offset,pallas_kw", CASES)
def test_matches_reference(race_log, b, tq, tk, h, g, q_offset, pallas_kw):
    args, cotangent = _inputs(g, b, tq, tk, h, g, 32)
    _check(args, cotangent, q_offset, SMALL, pallas_kw)
    assert not race_log, "the TPU interpreter reported a race"


@pytest.mark.slow
def test_matches_reference_2k(race_log):
    kw = dict(block_size=64, block_count=8, window_size=128)
    args, cotangent = _inputs(3, 1, 2000, 2048, 1, 7, 64)
    _check(args, cotangent, 48, kw, {}, atol=5e-5)
    assert not race_log, "the TPU interpreter reported a race"


KERNELS = {
    f"nsa_{name}"
    for name in (
        "select_blocks",
        "combine_fwd",
        "combine_bwd",
        *(f"{m}_{p}" for m in ("cmp", "slc", "swa") for p in ("fwd", "bwd_dq", "bwd_dkv")),
    )
}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_exports_for_tpu(dtype):
    """Every kernel, forward and backward, goes through the Mosaic lowering for platform "tpu"."""
    b, t, h, g, d = 1, 1000, 2, 7, 128
    q = jax.ShapeDtypeStruct((b, t, h * g, d), dtype)
    kv = jax.ShapeDtypeStruct((b, t + 24, h, d), dtype)
    gate = jax.ShapeDtypeStruct((b, t, h * g), dtype)
    kw = dict(block_size=64, block_count=8, window_size=256)

    def loss(q, k, v, g1, g2, g3, q_offset):
        return jnp.sum(nsa_tpu(q, k, v, g1, g2, g3, q_offset=q_offset, **kw).astype(jnp.float32))

    fn = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6))))
    exported = jax.export.export(fn, platforms=["tpu"])(
        q, kv, kv, gate, gate, gate, jax.ShapeDtypeStruct((), jnp.int32)
    )
    text = exported.mlir_module()
    assert text.count("stablehlo.custom_call @tpu_custom_call") == len(KERNELS)
    assert set(re.findall(r'kernel_name = "([^"]+)"', text)) == KERNELS


def test_ops_entry_point_runs_tpu_kernels_bf16():
    """`nsa(..., impl="pallas_tpu")` runs `nsa_tpu` (interpreted on CPU); bf16 ~ reference."""
    from pallas_kernels.nsa import nsa

    kw = dict(block_size=16, block_count=3, window_size=32, return_block_indices=True)
    args, _ = _inputs(0, 1, 40, 40, 1, 3, 32, jnp.bfloat16)
    out, idx = jax.jit(functools.partial(nsa, impl="pallas_tpu", **kw))(*args)
    ref, idx_ref = jax.jit(functools.partial(nsa, impl="reference", **kw))(*args)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(idx_ref))
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2, rtol=2e-2
    )
