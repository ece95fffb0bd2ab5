"""The `videonsa_release` NSA against a torch composition of the released behaviour (fp32, CPU)."""

from __future__ import annotations

import jax.numpy as jnp
import nsa_oracle as oracle  # skips this module without torch / fla-core
import numpy as np
import pytest

from pallas_kernels.nsa import reference as ref
from pallas_kernels.nsa import release as rel

torch = oracle.torch
TOL = dict(rtol=1e-5, atol=1e-5)
HEADS, SLOTS, KV_HEADS = 28, 64, 4


def _inputs(t, d, seed):
    """Random real heads padded to the released 64-slot layout."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, t, HEADS, d), np.float32)
    k = rng.standard_normal((1, t, KV_HEADS, d), np.float32)
    v = rng.standard_normal((1, t, KV_HEADS, d), np.float32)
    gates = [rng.uniform(size=(1, t, HEADS)).astype(np.float32) for _ in range(3)]
    return np.asarray(rel.pad_heads(q)), k, v, [np.asarray(rel.pad_heads(g)) for g in gates]


def test_pad_and_merge_heads():
    x = jnp.arange(2 * 3 * HEADS * 5, dtype=jnp.float32).reshape(2, 3, HEADS, 5)
    x64 = rel.pad_heads(x)
    assert x64.shape == (2, 3, SLOTS, 5)
    np.testing.assert_array_equal(x64[:, :, HEADS : 2 * HEADS], x)
    np.testing.assert_array_equal(x64[:, :, 2 * HEADS :], 0)
    np.testing.assert_array_equal(rel.merge_heads(x64, HEADS), x)


@pytest.mark.parametrize(
    "t, d, block_size, block_count, window_size",
    [
        (200, 32, 64, 32, 256),  # T <= 2048: every block 0..cur is selected
        (600, 16, 16, 6, 40),  # top-k active over 3 chunks of the network, S rounded up to 8
    ],
)
def test_matches_torch_composition(t, d, block_size, block_count, window_size):
    q, k, v, gates = _inputs(t, d, seed=t)
    scale = d**-0.5
    with torch.no_grad():
        o_t, idx_t = oracle.release_nsa(
            *map(oracle.to_torch, (q, k, v, *gates)),
            block_size=block_size,
            block_count=block_count,
            window_size=window_size,
            scale=scale,
        )
    o, idx = rel.videonsa_release_nsa(
        q,
        k,
        v,
        *gates,
        block_size=block_size,
        block_count=block_count,
        window_size=window_size,
        return_block_indices=True,
    )
    np.testing.assert_array_equal(idx, idx_t.numpy())
    np.testing.assert_allclose(o, o_t.numpy(), **TOL)
    if t // block_size < block_count:  # every block 0..cur is selected
        selected = [sorted(r[r >= 0].tolist()) for r in np.asarray(idx)[0, :, 0]]
        assert selected == [list(range(i // block_size + 1)) for i in range(t)]


@pytest.mark.slow  # ~100 s of CPU; the T=600 case above covers multi-chunk merges by default
def test_topk_above_2048_matches_sorted_importance():
    """Released config (BS 64, S 32) at T = 4200: 66 blocks, two chunks of the bitonic merge."""
    t, d, block_size, block_count = 4200, 16, 64, 32
    q, k, v, _ = _inputs(t, d, seed=5)
    scale = d**-0.5
    tq, tk = oracle.to_torch(q), oracle.to_torch(k)
    kc_t = oracle.mean_pool(tk, block_size)
    _, lse_t = oracle.release_compression(tq, kc_t, kc_t, block_size, scale)
    imp_t = oracle.release_importance(tq, kc_t, lse_t, block_size, scale)
    idx_t = oracle.release_topk(imp_t, block_size, block_count).numpy()

    kc = ref.mean_pool(k, block_size)
    _, lse = rel.compression_attention(q, kc, kc, block_size=block_size, scale=scale)
    np.testing.assert_allclose(lse, lse_t.numpy().transpose(0, 2, 1), **TOL)
    idx = np.asarray(
        rel.select_blocks(
            q,
            kc,
            rel.misread_lse(lse),
            block_size=block_size,
            block_count=block_count,
            scale=scale,
        )
    )
    assert (idx_t[:, 2048:] >= 0).all()  # top-k is active past 32 blocks
    # Same sets; the order is by decreasing importance up to rounding (near-ties may swap).
    np.testing.assert_array_equal(oracle.canonical_indices(idx), oracle.canonical_indices(idx_t))
    imp = np.take_along_axis(imp_t.numpy(), np.maximum(idx, 0), axis=-1)
    imp = np.where(idx >= 0, imp, -np.inf)
    assert (imp[..., :-1] >= imp[..., 1:] * (1 - 1e-5)).all()


@pytest.mark.parametrize(
    "cur, expected",
    [
        (40, [*range(8, 12), *range(13, 41)]),
        (63, list(range(32, 64))),
        (20, list(range(21))),
    ],
)
def test_bitonic_tie_breaking(cur, expected):
    """Past blocks tied at 0.3, current block 16.0: the network's pick, not the lowest indices."""
    importance = np.where(np.arange(64) < cur, 0.3, 0.0).astype(np.float32)
    importance[cur] = 16.0
    idx = rel.bitonic_topk(
        jnp.asarray(importance), jnp.asarray(cur), num_selected=32, chunk_size=64
    )
    assert idx[0] == cur
    assert sorted(i for i in idx.tolist() if i >= 0) == expected


def test_zero_queries_tie_through_full_selection():
    """Zero queries (text rows) give exactly tied past blocks; the selection follows the network."""
    t, d, block_size = 41 * 64, 8, 64
    q = np.zeros((1, t, SLOTS, d), np.float32)
    k = np.random.default_rng(0).standard_normal((1, t, KV_HEADS, d), np.float32)
    kc = ref.mean_pool(k, block_size)
    _, lse = rel.compression_attention(q, kc, kc, block_size=block_size, scale=d**-0.5)
    idx = np.asarray(
        rel.select_blocks(
            q, kc, rel.misread_lse(lse), block_size=block_size, block_count=32, scale=d**-0.5
        )
    )
    for row, expected in (
        (40 * 64 + 7, [*range(8, 12), *range(13, 41)]),
        (5 * 64 + 1, list(range(6))),
    ):
        for h in range(KV_HEADS):
            assert sorted(i for i in idx[0, row, h].tolist() if i >= 0) == expected
