"""NSA Pallas GPU kernels vs the plain-JAX reference.

On CPU the kernels run in Pallas interpret mode at small shapes (odd lengths, T not a multiple of
the block, traced q_offset, GQA groups 1, 5, 7, 8); the `gpu` test runs them compiled.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.nsa import gpu_flash, gpu_mosaic, nsa, reference
from pallas_kernels.nsa.gpu import nsa_gpu

KW = dict(block_size=8, block_count=4, window_size=12)
# Interpret-mode tests: block 8 is below Triton's MMA minimum (16), so they run on CPU only.
cpu_only = pytest.mark.skipif(jax.default_backend() != "cpu", reason="interpret-mode test")


def _inputs(tq, tk, h, g, d, seed, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (1, tq, h * g, d), dtype)
    k = jax.random.normal(ks[1], (1, tk, h, d), dtype)
    v = jax.random.normal(ks[2], (1, tk, h, d), dtype)
    gates = [jax.nn.sigmoid(jax.random.normal(ks[3 + i], (1, tq, h * g))) for i in range(3)]
    return q, k, v, gates


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@cpu_only
def test_values_and_grads_traced_offset():
    """G=7, 37 queries at offset 24 of 61 keys (traced): output, block indices, all six grads."""
    q, k, v, gates = _inputs(37, 61, 1, 7, 16, seed=0)

    def loss(impl, off, *args):
        o, idx = nsa(*args, impl=impl, q_offset=off, return_block_indices=True, **KW)
        return jnp.sum(o * jnp.cos(o)), (o, idx)

    grad = jax.grad(loss, argnums=tuple(range(2, 8)), has_aux=True)
    got, (o, idx) = jax.jit(functools.partial(grad, "pallas"))(jnp.int32(24), q, k, v, *gates)
    want, (ro, ridx) = grad("reference", 24, q, k, v, *gates)
    assert _rel(o, ro) < 1e-5
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ridx))
    for name, a, b in zip(("q", "k", "v", "g_cmp", "g_slc", "g_swa"), got, want, strict=True):
        assert _rel(a, b) < 1e-5, name


@cpu_only
@pytest.mark.parametrize(
    "h,g,tq,tk,off", [(2, 1, 45, 45, 0), (1, 5, 29, 53, 24), (1, 8, 19, 19, 0)]
)
def test_values_and_indices_groups(h, g, tq, tk, off):
    q, k, v, gates = _inputs(tq, tk, h, g, 16, seed=g)
    o, idx = nsa_gpu(q, k, v, *gates, q_offset=off, return_block_indices=True, interpret=True, **KW)
    ro, ridx = reference.nsa_reference(
        q, k, v, *gates, q_offset=off, return_block_indices=True, **KW
    )
    assert _rel(o, ro) < 1e-5
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ridx))


@pytest.mark.gpu
def test_gpu_bf16_against_reference():
    """Compiled, 24 blocks: static and traced query offsets (their top-k paths differ) against the
    reference and each other."""
    kw = dict(block_size=64, block_count=16, window_size=128, return_block_indices=True)
    q, k, v, gates = _inputs(1500, 1500, 2, 7, 128, seed=3, dtype=jnp.bfloat16)
    o, idx = jax.jit(functools.partial(nsa_gpu, **kw))(q, k, v, *gates)
    traced = jax.jit(lambda off, *a: nsa_gpu(*a, q_offset=off, **kw))
    o_t, idx_t = traced(jnp.int32(0), q, k, v, *gates)
    ro, _ = reference.nsa_reference(q, k, v, *gates, **kw)
    assert _rel(o, ro) < 1e-2
    assert _rel(o_t, ro) < 1e-2
    assert idx.shape == (1, 1500, 2, 16)
    np.testing.assert_array_equal(np.asarray(idx_t), np.asarray(idx))


@cpu_only
def test_top_k_exact_ties(g=7):
    """Equal importances (zero compressed keys): ties go to the lowest block index, like top_k."""
    from pallas_kernels.nsa.gpu_topk import select_blocks

    q, k, _, _ = _inputs(70, 70, 1, g, 16, seed=5)
    kc = jnp.zeros_like(reference.mean_pool(k, 8))
    _, lse = reference.compression_attention(q, kc, kc, block_size=8, scale=0.25)
    want = reference.select_blocks(q, kc, lse, block_size=8, block_count=4, scale=0.25)
    got = select_blocks(
        q,
        kc,
        lse,
        jnp.zeros((1,), jnp.int32),
        block_size=8,
        block_count=4,
        scale=0.25,
        interpret=True,
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@cpu_only
@pytest.mark.parametrize("static", [True, False])
def test_top_k_row_widths(static, monkeypatch, g=5):
    """Offset 24, 300 queries, block 8 (40 blocks): a static offset runs the select on rows of
    width 16, 32 and 64, a traced one on full rows of 64; both match the reference. The score
    kernel walks the blocks in tiles of 16 (patched from 128)."""
    from pallas_kernels.nsa import gpu_topk
    from pallas_kernels.nsa.gpu_topk import _row_widths, select_blocks

    monkeypatch.setattr(gpu_topk, "SCORE_BLOCKS", 16)

    widths = [w for _, _, w in _row_widths(300, 40, 8, 24 if static else None)]
    assert widths == ([16, 32, 64] if static else [64])
    q, k, _, _ = _inputs(300, 324, 1, g, 16, seed=6)
    kc = reference.mean_pool(k, 8)
    kw = dict(block_size=8, block_count=4, scale=0.25)
    _, lse = reference.compression_attention(q, kc, kc, block_size=8, scale=0.25, q_offset=24)
    want = reference.select_blocks(q, kc, lse, q_offset=24, **kw)
    off = jnp.full((1,), 24, jnp.int32)
    got = select_blocks(q, kc, lse, off, interpret=True, static_offset=24 if static else None, **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@cpu_only
@pytest.mark.parametrize("g,chunk,item", [(1, 16, 1024), (5, 8, 1024), (7, 64, 1024), (8, 8, 4)])
def test_selection_chunks_values_and_grads(g, chunk, item, monkeypatch):
    """KV-block-major selection forward and backward (fused dK/dV + per-slot dq partials).

    21 queries at offset 24 of 45 keys, random cotangents; chunk 8 or 16 splits the queries into
    several chunks (the last one padded), 64 keeps one; the backward runs on the forward's chunks
    and inverse indices; work items of 4 entries cut every block's entries into several items.
    Output and q/k/v grads vs the reference.
    """
    from pallas_kernels.nsa import gpu_selection

    monkeypatch.setattr(gpu_selection, "ITEM", item)

    q, k, v, _ = _inputs(21, 45, 1, g, 16, seed=10 + g)
    do = jax.random.normal(jax.random.PRNGKey(g), q.shape)
    scale = 0.25
    kc = reference.mean_pool(k, 8)
    _, lse = reference.compression_attention(q, kc, kc, block_size=8, scale=scale, q_offset=24)
    idx = reference.select_blocks(q, kc, lse, block_size=8, block_count=4, scale=scale, q_offset=24)
    off = jnp.full((1,), 24, jnp.int32)
    kw = dict(scale=scale, block_size=8, interpret=True)

    @jax.jit
    def ours(q, k, v):
        o, lse_s, index = gpu_selection.selection_fwd(q, k, v, idx, off, chunk=chunk, **kw)
        return o, gpu_selection.selection_bwd(q, k, v, idx, index, o, lse_s, do, off, **kw)

    def ref(q, k, v):
        return reference.selection_attention(q, k, v, idx, block_size=8, scale=scale, q_offset=24)

    o, grads = ours(q, k, v)
    ro, vjp = jax.vjp(ref, q, k, v)
    assert _rel(o, ro) < 1e-5
    for name, a, b in zip("qkv", grads, vjp(do), strict=True):
        assert _rel(a, b) < 1e-5, name


@cpu_only
@pytest.mark.parametrize(
    "mode,g,tq,nk,off,bs,w",
    [
        ("cmp", 7, 150, 120, 150, 2, 0),  # compressed keys, the last key tile partial
        ("cmp", 1, 200, 200, 0, 1, 0),  # block 1: causal attention
        ("swa", 7, 160, 300, 140, 1, 150),
        ("swa", 5, 200, 200, 0, 1, 200),
    ],
)
def test_flash_whole_and_boundary_tiles(mode, g, tq, nk, off, bs, w, monkeypatch):
    """The flash branches at lengths where the walks meet whole (unmasked) tiles of 64 keys / query
    rows as well as boundary tiles: o, lse, dq, dk, dv against the reference. The "cmp" dk/dv
    pass cuts its query range into several splits (one per 2 query tiles here)."""
    monkeypatch.setattr(gpu_flash, "SPLIT_TILES", 2)
    q, k, v, _ = _inputs(tq, nk, 1, g, 32, seed=tq)
    do = jax.random.normal(jax.random.PRNGKey(1), q.shape)
    kw = dict(mode=mode, scale=0.3, block_size=bs, window=w, interpret=True)
    offset = jnp.full((1,), off, jnp.int32)
    o, lse = gpu_flash.flash_fwd(q, k, v, offset, **kw)
    dq, dk, dv = gpu_flash.flash_bwd(q, k, v, o, lse, do, offset, **kw)

    def ref(q, k, v):
        if mode == "cmp":
            return reference.compression_attention(q, k, v, block_size=bs, scale=0.3, q_offset=off)
        return reference.sliding_window_attention(q, k, v, window_size=w, scale=0.3, q_offset=off)

    if mode == "cmp":
        (ro, rlse), pull = jax.vjp(ref, q, k, v)
        np.testing.assert_allclose(np.asarray(lse), np.asarray(rlse), rtol=1e-5, atol=1e-5)
        grads = pull((do, jnp.zeros_like(rlse)))
    else:
        ro, pull = jax.vjp(ref, q, k, v)
        grads = pull(do)
    for name, a, b in zip(("o", "dq", "dk", "dv"), (o, dq, dk, dv), (ro, *grads), strict=True):
        assert _rel(a, b) < 1e-5, name


@pytest.mark.gpu
@pytest.mark.parametrize(
    "mode,batch,h,g,tq,off,d,dtype",
    [
        ("cmp", 1, 4, 7, 1000, 0, 128, jnp.bfloat16),
        ("cmp", 2, 2, 5, 700, 300, 128, jnp.bfloat16),
        ("cmp", 1, 1, 8, 300, 5000, 64, jnp.float16),
        ("swa", 2, 4, 7, 1000, 0, 128, jnp.bfloat16),
        ("swa", 1, 2, 5, 700, 300, 128, jnp.bfloat16),
        ("swa", 1, 4, 1, 777, 0, 64, jnp.float16),
    ],
)
def test_mosaic_flash_forward(mode, batch, h, g, tq, off, d, dtype):
    """The Mosaic-GPU forward (Hopper only) against the fp32 reference on the same inputs, and
    against the Triton forward it replaces: o and lse (-inf pattern included)."""
    rows = [_inputs(tq, tq + off, h, g, d, seed=tq + i, dtype=dtype)[:3] for i in range(batch)]
    q, k, v = (jnp.concatenate(x, axis=0) for x in zip(*rows, strict=True))
    if not gpu_mosaic.available(q, interpret=False):
        pytest.skip("Mosaic-GPU forward needs a Hopper GPU")
    bs, w = 64, 256
    if mode == "cmp":
        k, v = reference.mean_pool(k, bs), reference.mean_pool(v, bs)
    kw = dict(mode=mode, scale=d**-0.5, block_size=bs, window=w)
    o, lse = jax.jit(functools.partial(gpu_mosaic.flash_fwd, q_offset=off, **kw))(q, k, v)
    to, tlse = gpu_flash.flash_fwd(q, k, v, jnp.full((1,), off, jnp.int32), interpret=False, **kw)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    if mode == "cmp":
        ro, rlse = reference.compression_attention(*f32, block_size=bs, scale=d**-0.5, q_offset=off)
        np.testing.assert_array_equal(np.isinf(np.asarray(lse)), np.isinf(np.asarray(rlse)))
        fin = np.isfinite(np.asarray(rlse))
        np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(rlse)[fin], atol=1e-3)
    else:
        ro = reference.sliding_window_attention(*f32, window_size=w, scale=d**-0.5, q_offset=off)
    assert _rel(o.astype(jnp.float32), ro) < 5e-3
    assert _rel(o.astype(jnp.float32), to.astype(jnp.float32)) < 5e-3
    np.testing.assert_allclose(np.asarray(lse), np.asarray(tlse), atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "batch,h,g,tq,off,d",
    [
        (1, 4, 7, 1000, 0, 128),
        (2, 2, 5, 700, 300, 128),
        (1, 1, 1, 777, 5000, 64),
        (1, 2, 12, 300, 64, 64),
    ],
)
def test_mosaic_importance(batch, h, g, tq, off, d):
    """The Mosaic-GPU top-k importance (Hopper, static offset) against the Triton score kernel on
    every entry the select reads (blocks n <= cur of each token), and the selections of both."""
    from pallas_kernels.nsa import gpu_mosaic_score, gpu_topk

    bs = 64
    rows = [
        _inputs(tq, tq + off, h, g, d, seed=tq + i, dtype=jnp.bfloat16)[:2] for i in range(batch)
    ]
    q, k = (jnp.concatenate(x, axis=0) for x in zip(*rows, strict=True))
    kc = reference.mean_pool(k, bs)
    if not gpu_mosaic_score.available(q, kc, interpret=False):
        pytest.skip("Mosaic-GPU importance needs a Hopper GPU")
    offset = jnp.full((1,), off, jnp.int32)
    kw = dict(scale=d**-0.5, block_size=bs, interpret=False)
    _, lse = gpu_flash.flash_fwd(q, kc, kc, offset, mode="cmp", window=0, **kw)
    got = jax.jit(functools.partial(gpu_topk.importance, static_offset=off, **kw))(
        q, kc, lse, offset
    )
    want = gpu_topk.importance(q, kc, lse, offset, **kw)
    nb = kc.shape[1]
    assert got.shape[2] >= tq and got.shape[3] >= nb
    got, want = np.asarray(got)[:, :, :tq, :nb], np.asarray(want)
    read = np.arange(nb)[None, :] <= ((off + np.arange(tq)) // bs)[:, None]
    np.testing.assert_allclose(got[..., read], want[..., read], rtol=1e-4, atol=1e-6)
    sel = dict(block_size=bs, block_count=8, scale=d**-0.5, interpret=False)
    static = gpu_topk.select_blocks(q, kc, lse, offset, static_offset=off, **sel)
    traced = gpu_topk.select_blocks(q, kc, lse, offset, **sel)
    np.testing.assert_array_equal(np.asarray(static), np.asarray(traced))


def test_multi_item_slots():
    """Which backward work items add to their block in place: a block's only item does; the items
    of a block cut into several get consecutive partial slots, each slot knows its block, unused
    slots point at the discarded row nb."""
    from pallas_kernels.nsa.gpu_selection import _multi_item_slots

    blk = jnp.array([[[0, 0, 0, 1, 2, 2, 3, -1, -1]]], jnp.int32)
    single, pslot, seg = _multi_item_slots(blk, n_multi=6, nb=4)
    np.testing.assert_array_equal(single[0, 0], [0, 0, 0, 1, 0, 0, 1, 0, 0])
    multi = np.asarray(blk[0, 0] >= 0) & (np.asarray(single[0, 0]) == 0)
    np.testing.assert_array_equal(np.asarray(pslot[0, 0])[multi], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(seg[0, 0], [0, 0, 0, 2, 2, 4])


def test_selection_rejects_too_many_heads():
    """The merge and dq-sum kernels hold all query heads of a token in one program: more than
    MERGE_ROWS heads is refused with a clear error, before any kernel runs."""
    from pallas_kernels.nsa import gpu_selection

    hq = gpu_selection.MERGE_ROWS + 1
    q = jnp.zeros((1, 8, hq, 16))
    k = jnp.zeros((1, 8, 1, 16))
    idx = jnp.zeros((1, 8, 1, 1), jnp.int32)
    off = jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="query heads"):
        gpu_selection.selection_fwd(q, k, k, idx, off, scale=0.25, block_size=8, interpret=True)
