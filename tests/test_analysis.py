"""Analysis tools on arrays: gate statistics, branch attention maps (checked against the NSA
reference), sink ratios, selection maps, attention budgets; tables and PNGs."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.nsa import reference
from videonsa_jax import analysis

BS, S, W = 4, 2, 6


def _random_case(t=19, hq=4, h=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, t, n, d)).astype(np.float32) for n in (hq, h, h))
    gates = rng.uniform(0.1, 0.9, (1, t, hq, 3)).astype(np.float32)
    return q, k, v, gates


def test_branch_attention_reproduces_the_nsa_reference():
    q, k, v, gates = _random_case()
    g = [jnp.asarray(gates[..., i]) for i in range(3)]
    o, idx = reference.nsa_reference(
        jnp.asarray(q),
        jnp.asarray(k),
        jnp.asarray(v),
        *g,
        block_size=BS,
        block_count=S,
        window_size=W,
        return_block_indices=True,
    )
    o, idx = np.asarray(o)[0], np.asarray(idx)[0]
    group = q.shape[2] // k.shape[2]
    for head in range(q.shape[2]):
        kv = head // group
        maps = analysis.branch_attention(
            q[0, :, head], k[0, :, kv], idx[:, kv], block_size=BS, window_size=W
        )
        values = v[0, :, kv].astype(np.float64)
        outs = [
            maps["compression"] @ analysis.block_means(values, BS),
            maps["selection"] @ values,
            maps["sliding_window"] @ values,
        ]
        expected = sum(gates[0, :, head, i : i + 1] * outs[i] for i in range(3))
        np.testing.assert_allclose(expected, o[:, head], atol=2e-5)
        # Spreading a block's weight over its tokens gives the same compression output.
        tokens = analysis.expand_blocks(maps["compression"], BS, q.shape[1])
        np.testing.assert_allclose(tokens @ values, outs[0], atol=1e-6)


def test_gate_statistics_and_plot(tmp_path):
    gates = np.zeros((3, 2, 5, 4, 3))
    gates[..., 0] = 0.8
    gates[1, ..., 1] = np.linspace(0, 1, 4)  # Layer 1: the selection gate rises with the head.
    gates[:, 0, 0] = 0.0  # A text row, masked out.
    mask = np.ones((2, 5), bool)
    mask[0, 0] = False
    stats = analysis.gate_statistics(gates, mask)
    assert stats.num_tokens == 9 and stats.mean.shape == (3, 4, 3)
    np.testing.assert_allclose(stats.mean[..., 0], 0.8)
    np.testing.assert_allclose(stats.mean[1, :, 1], np.linspace(0, 1, 4))
    table = analysis.gate_table(stats)
    assert table.splitlines()[2].startswith("| 0 | 0.800 ± 0.000 | 0.000 ± 0.000 |")
    analysis.plot_gate_statistics(stats, str(tmp_path / "gates.png"))
    assert (tmp_path / "gates.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no vision tokens"):
        analysis.gate_statistics(gates, np.zeros((2, 5), bool))


def test_sink_ratios():
    t, d = 16, 8
    q, k, v, gates = _random_case(t=t, d=d)
    q, k, v, gates = q[0], k[0], v[0], gates[0]
    # Key 0 is a sink: every query aligns with it, and its value is small.
    k[0] = 0.0
    k[0, :, 0] = 30.0
    q[..., 0] = 1.0
    v[0] *= 0.01
    _, idx = reference.nsa_reference(
        *map(jnp.asarray, (q[None], k[None], v[None])),
        *(jnp.asarray(gates[None, ..., i]) for i in range(3)),
        block_size=BS,
        block_count=S,
        window_size=W,
        return_block_indices=True,
    )
    internals = dict(
        q=q[None],
        k=k[None],
        v=v[None],
        gates=gates[None],
        block_indices=np.asarray(idx),
        vision_mask=np.ones(t, bool),
    )
    args = [internals[n] for n in ("q", "k", "v", "gates", "block_indices", "vision_mask")]
    ratios = analysis.sink_ratios(*args, block_size=BS, window_size=W, eps=0.3)
    assert set(ratios) == {"compression", "selection", "sliding_window", "combined"}
    # Key 0 sinks every head in the token branches that keep it (selection forces block 0).
    assert ratios["selection"][0] == pytest.approx(1 / t)
    assert ratios["combined"][0] >= 1 / t
    assert ratios["sliding_window"][0] >= 1 / t  # Key 0 while inside the window, and more.
    none = analysis.sink_ratios(*args, block_size=BS, window_size=W, eps=1.0)
    assert all(r.sum() == 0 for r in none.values())
    low_norm = analysis.sink_ratios(*args, block_size=BS, window_size=W, value_norm_quantile=0.1)
    assert low_norm["selection"][0] == pytest.approx(1 / t)
    assert "| mean |" in analysis.sink_table(ratios)


def test_selection_map():
    idx = np.array([[[0, -1]], [[0, 1]], [[1, 0]], [[2, 0]]])  # [T=4, H=1, S=2]
    per_query, per_block = analysis.selection_map(idx, num_blocks=3)
    np.testing.assert_array_equal(per_query, [[1, 0, 0], [1, 1, 0], [1, 1, 0], [1, 0, 1]])
    # Block 1 could be chosen by the three queries at block >= 1 and was by two.
    np.testing.assert_allclose(per_block, [1.0, 2 / 3, 1.0])
    assert analysis.selection_table(per_block, top=2).splitlines()[2] == "| 0 | 100.00 |"


def test_budget_sweep_and_internals_report(tmp_path):
    assert analysis.attention_budget(256, 64, 32, 256) == 1.0
    long = analysis.attention_budget(131072, 64, 32, 256)
    assert 0.02 < long < 0.2
    calls = []

    def run(block_count, window_size):
        calls.append((block_count, window_size))
        return block_count / 100 + window_size / 1000

    accuracy = analysis.budget_sweep(run, [8, 16], [64, 128, 256])
    assert calls[0] == (8, 64) and accuracy.shape == (2, 3)
    assert accuracy[1, 2] == pytest.approx(0.416)
    table = analysis.sweep_table(accuracy, [8, 16], [64, 128, 256], length=4096, block_size=64)
    assert "| 16 | 256 |" in table
    analysis.plot_sweep(accuracy, [8, 16], [64, 128, 256], str(tmp_path / "sweep.png"))

    q, k, v, gates = _random_case(t=12)
    _, idx = reference.nsa_reference(
        *map(jnp.asarray, (q, k, v)),
        *(jnp.asarray(gates[..., i]) for i in range(3)),
        block_size=BS,
        block_count=S,
        window_size=W,
        return_block_indices=True,
    )
    internals = dict(
        q=np.stack([q[0]] * 2),
        k=np.stack([k[0]] * 2),
        v=np.stack([v[0]] * 2),
        gates=np.stack([gates[0]] * 2),
        block_indices=np.stack([idx[0]] * 2),
        vision_mask=np.arange(12) >= 2,
    )
    tables = analysis.analyze_internals(
        internals, str(tmp_path / "out"), block_size=BS, window_size=W
    )
    assert set(tables) == {"gates", "sinks", "selection"}
    for name in ("gates", "sinks", "selection"):
        assert os.path.getsize(tmp_path / "out" / f"{name}.png") > 1000
        assert (tmp_path / "out" / f"{name}.md").read_text() == tables[name]
