"""Torch oracles for the NSA tests: fla-core's naive NSA pieces plus plain-torch helpers.

fla's `mean_pooling` and its sliding window call GPU code, so those two are written here in plain
torch. Importing this module skips the calling test module when torch or fla-core is missing.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    fla_naive = pytest.importorskip("fla.ops.nsa.naive")


def to_torch(x) -> torch.Tensor:
    """A float32 torch tensor with a copy of `x`'s values."""
    return torch.from_numpy(np.array(x, dtype=np.float32))


def mean_pool(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, T, H, D] -> [B, ceil(T/BS), H, D]; the last partial block divided by its length."""
    t = x.shape[1]
    blocks = [x[:, i : i + block_size].mean(dim=1) for i in range(0, t, block_size)]
    return torch.stack(blocks, dim=1)


def sliding_window(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: int, scale: float
) -> torch.Tensor:
    """Dense causal attention restricted to keys j in [t-W+1, t]; GQA by repeating k and v."""
    g = q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(g, dim=2) for x in (k, v))
    s = torch.einsum("bthd,bjhd->bhtj", q, k) * scale
    t = torch.arange(q.shape[1])[:, None]
    j = torch.arange(k.shape[1])[None, :]
    allowed = (j <= t) & (j > t - window_size)
    p = s.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhtj,bjhd->bthd", p, v)


def nsa(q, k, v, g_cmp, g_slc, g_swa, *, block_size, block_count, window_size, scale):
    """The `videonsa` composition from fla's naive pieces.

    Returns (o, o_cmp, lse, block_indices, o_slc, o_swa); o is differentiable w.r.t. all inputs.
    """
    kc, vc = mean_pool(k, block_size), mean_pool(v, block_size)
    o_cmp, lse = fla_naive.naive_nsa_compression(q, kc, vc, block_size, scale)
    with torch.no_grad():
        idx = fla_naive.naive_nsa_topk(q, kc, block_count, block_size, scale)
    o_slc = fla_naive.naive_nsa_selection(q, k, v, idx, block_size, scale)
    o_swa = sliding_window(q, k, v, window_size, scale)
    o = g_cmp[..., None] * o_cmp + g_slc[..., None] * o_slc + g_swa[..., None] * o_swa
    return o, o_cmp, lse, idx, o_slc, o_swa


def canonical_indices(idx) -> np.ndarray:
    """Block indices sorted ascending per row with -1 padding last (`select_blocks`' order)."""
    idx = np.asarray(idx).astype(np.int64)
    big = np.iinfo(np.int64).max
    idx = np.sort(np.where(idx < 0, big, idx), axis=-1)
    return np.where(idx == big, -1, idx)


def release_compression(q, kc, vc, block_size: int, scale: float):
    """Released compression branch: anti-causal mask t <= (n+1)*BS - 1, lse as flex returns it.

    Returns o [B, T, HQ, D] and lse [B, HQ, T] (natural log, the layout of the released buffer).
    """
    g = q.shape[2] // kc.shape[2]
    kc, vc = (x.repeat_interleave(g, dim=2) for x in (kc, vc))
    s = torch.einsum("bthd,bnhd->bhtn", q, kc) * scale
    t = torch.arange(q.shape[1])[:, None]
    n = torch.arange(kc.shape[1])[None, :]
    s = s.masked_fill(~(t <= (n + 1) * block_size - 1), float("-inf"))
    o = torch.einsum("bhtn,bnhd->bthd", s.softmax(dim=-1), vc)
    return o, torch.logsumexp(s, dim=-1)


def release_importance(q, kc, lse_bht, block_size: int, scale: float):
    """Released top-k importance [B, T, H, NB], reading the [B, HQ, T] lse buffer as [B, T, HQ]."""
    b, t, hq, _ = q.shape
    h = kc.shape[2]
    lse_used = lse_bht.reshape(b, t, hq)  # the released kernel's indexing, no transpose
    s = torch.einsum("bthd,bnhd->bthn", q * scale, kc.repeat_interleave(hq // h, dim=2))
    cur = torch.arange(t)[:, None] // block_size
    n = torch.arange(kc.shape[1])[None, :]
    p = torch.exp(s - lse_used[..., None]).masked_fill(~(n < cur)[None, :, None, :], 0.0)
    p = torch.where((n == cur)[None, :, None, :], torch.ones_like(p), p)
    return p.reshape(b, t, h, hq // h, -1).sum(dim=3)


def release_topk(importance, block_size: int, num_selected: int):
    """Top blocks among n <= t // BS by decreasing importance, -1 padded: [B, T, H, S].

    This equals the released bitonic network's output whenever the importances have no ties.
    """
    t, nb = importance.shape[1], importance.shape[-1]
    cur = torch.arange(t)[:, None] // block_size
    valid = (torch.arange(nb)[None, :] <= cur)[None, :, None, :]
    masked = importance.masked_fill(~valid, float("-inf"))
    k = min(num_selected, nb)
    values, idx = torch.topk(masked, k, dim=-1)
    idx = torch.where(torch.isinf(values), -1, idx)
    pad = torch.full((*idx.shape[:-1], num_selected - k), -1, dtype=idx.dtype)
    return torch.cat([idx, pad], dim=-1)


def release_nsa(q, k, v, g_cmp, g_slc, g_swa, *, block_size, block_count, window_size, scale):
    """The released NSA on padded slots; returns (o, block_indices)."""
    num_selected = 1 << (block_count - 1).bit_length()
    kc, vc = mean_pool(k, block_size), mean_pool(v, block_size)
    o_cmp, lse = release_compression(q, kc, vc, block_size, scale)
    imp = release_importance(q, kc, lse, block_size, scale)
    idx = release_topk(imp, block_size, num_selected)
    o_slc = fla_naive.naive_nsa_selection(q, k, v, idx, block_size, scale)
    o_swa = sliding_window(q, k, v, window_size, scale)
    o = g_cmp[..., None] * o_cmp + g_slc[..., None] * o_slc + g_swa[..., None] * o_swa
    return o, idx
