"""VideoNSA analysis: gate statistics, attention sinks, selected blocks, attention-budget sweeps.

Each analysis is a function on arrays, plus a markdown table and a PNG (matplotlib, Agg backend):

* `gate_statistics`: mean / std of the three branch gates (compression, selection, sliding window)
  per layer and head over the vision tokens of a prefill.
* `sink_ratios`: attention sinks per branch. Following the sink metric of Gu et al. (ICLR 2025),
  which VideoNSA's sink analysis builds on, a key k is a sink of head h in layer l when its
  importance alpha_k = mean over the queries that can see k of A[q, k] exceeds `eps` (default 0.3);
  with `value_norm_quantile`, a sink must also have a value norm at or below that quantile of the
  head's value norms (sinks attract attention but carry little value). The ratio is the fraction of
  (layer, head, key) triples that are sinks, per branch: compression (keys = compressed blocks),
  selection and sliding window (keys = tokens) and the gated combination (tokens; a compressed
  block's weight is spread evenly over its tokens, which is exact since its key/value is their
  mean). Queries are the vision tokens (the rows NSA serves). Branch maps follow the `videonsa`
  variant (shared/design/NSA_SEMANTICS.md).
* `selection_map`: how often each key block is selected, per query (a query x block image) and per
  block.
* `attention_budget` / `budget_sweep`: keys attended per query relative to dense causal attention,
  and accuracy over a (block_count x window_size) grid.

CLI (`python -m videonsa_jax.analysis`):
    prefill --model DIR --video FILE --out DIR [--question Q --fps --max_frames --max_pixels]
        gate statistics, sink ratios and selection maps of one prefill (attention "videonsa").
    sweep --config configs/eval/<task>.py --model DIR --block_counts 8,16,32 --window_sizes 64,256
        --out DIR  runs the evaluation per budget and tabulates accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from videonsa_jax.evaluation.harness import markdown_table  # noqa: E402

BRANCHES = ("compression", "selection", "sliding_window")


# -- gates -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GateStats:
    """mean, std: [L, H, 3] over vision tokens (last axis: compression, selection, window)."""

    mean: np.ndarray
    std: np.ndarray
    num_tokens: int


def gate_statistics(gates: np.ndarray, vision_mask: np.ndarray | None = None) -> GateStats:
    """Gate mean and std per layer, head and branch.

    Args:
        gates: [L, B, T, H, 3] (or [L, T, H, 3]) gate values in (0, 1).
        vision_mask: [B, T] (or [T]) bool; statistics use these rows only (default: all rows).
    """
    gates = np.asarray(gates, np.float64)
    if gates.ndim == 4:
        gates = gates[:, None]
    num_layers, b, t, h, _ = gates.shape
    mask = np.ones((b, t), bool) if vision_mask is None else np.asarray(vision_mask, bool)
    rows = gates[:, mask.reshape(b, t)]  # [L, N, H, 3]
    if rows.shape[1] == 0:
        raise ValueError("no vision tokens to take gate statistics over")
    return GateStats(mean=rows.mean(axis=1), std=rows.std(axis=1), num_tokens=rows.shape[1])


def gate_table(stats: GateStats) -> str:
    """Per layer: mean (std over heads of the per-head means) of each branch gate."""
    rows = []
    for layer in range(stats.mean.shape[0]):
        m = stats.mean[layer]
        rows.append([layer] + [f"{m[:, i].mean():.3f} ± {m[:, i].std():.3f}" for i in range(3)])
    all_mean = stats.mean.mean(axis=(0, 1))
    rows.append(["all"] + [f"{x:.3f}" for x in all_mean])
    return markdown_table(["layer", *BRANCHES], rows)


def plot_gate_statistics(stats: GateStats, path: str) -> None:
    """Three layer x head heatmaps (one per branch) and the per-layer mean of each branch."""
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.5))
    for i, (ax, name) in enumerate(zip(axes[:3], BRANCHES, strict=True)):
        image = ax.imshow(stats.mean[..., i], aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set(title=f"{name} gate", xlabel="head", ylabel="layer")
        fig.colorbar(image, ax=ax)
    layers = np.arange(stats.mean.shape[0])
    for i, name in enumerate(BRANCHES):
        axes[3].plot(layers, stats.mean[..., i].mean(axis=1), marker="o", label=name)
    axes[3].set(title="mean gate per layer", xlabel="layer", ylim=(0, 1))
    axes[3].legend()
    fig.suptitle(f"VideoNSA gates over {stats.num_tokens} vision tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- attention maps per branch and sinks -----------------------------------------------------------


def _softmax(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    scores = np.where(mask, scores, -np.inf)
    peak = np.max(scores, axis=-1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    e = np.where(mask, np.exp(scores - peak), 0.0)
    total = e.sum(axis=-1, keepdims=True)
    return e / np.where(total > 0, total, 1.0)


def branch_attention(
    q: np.ndarray,
    k: np.ndarray,
    block_indices: np.ndarray,
    *,
    block_size: int,
    window_size: int,
    scale: float | None = None,
) -> dict[str, np.ndarray]:
    """Attention probabilities of one head's queries in each NSA branch (`videonsa` rules).

    Args:
        q: [T, D] queries of one head; k: [T, D] keys of its KV head (post-RoPE).
        block_indices: [T, S] blocks selected for each query by this KV head (-1 = unused).
        block_size, window_size: BS and W.

    Returns:
        {"compression": [T, NB], "selection": [T, T], "sliding_window": [T, T]}.
    """
    t, d = q.shape
    scale = d**-0.5 if scale is None else scale
    nb = -(-t // block_size)
    pos = np.arange(t)
    kc = block_means(k, block_size)
    scores = (q @ k.T) * scale
    cmp_mask = (np.arange(nb)[None] + 1) * block_size - 1 <= pos[:, None]
    selected = np.zeros((t, nb + 1), bool)
    np.put_along_axis(selected, np.where(block_indices < 0, nb, block_indices), True, axis=1)
    slc_mask = selected[:, pos // block_size] & (pos[None] <= pos[:, None])
    swa_mask = (pos[None] <= pos[:, None]) & (pos[None] > pos[:, None] - window_size)
    return {
        "compression": _softmax((q @ kc.T) * scale, cmp_mask),
        "selection": _softmax(scores, slc_mask),
        "sliding_window": _softmax(scores, swa_mask),
    }


def block_means(x: np.ndarray, block_size: int) -> np.ndarray:
    """[T, D] -> [NB, D] means of consecutive blocks (the last one over its true length)."""
    t, d = x.shape
    nb = -(-t // block_size)
    padded = np.zeros((nb * block_size, d))
    padded[:t] = x
    counts = np.minimum(block_size, t - block_size * np.arange(nb))
    return padded.reshape(nb, block_size, d).sum(axis=1) / counts[:, None]


def expand_blocks(attn: np.ndarray, block_size: int, length: int) -> np.ndarray:
    """[T, NB] block attention -> [T, length] token attention (a block's weight spread evenly)."""
    nb = attn.shape[-1]
    counts = np.minimum(block_size, length - block_size * np.arange(nb))
    return np.repeat(attn / counts, counts, axis=-1)


def importance(attn: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """alpha_k: mean attention key k receives from the queries that can see it ([Q, K] -> [K])."""
    n = visible.sum(axis=0)
    return np.where(n > 0, (attn * visible).sum(axis=0) / np.maximum(n, 1), 0.0)


def sink_ratios(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    gates: np.ndarray,
    block_indices: np.ndarray,
    vision_mask: np.ndarray,
    *,
    block_size: int,
    window_size: int,
    eps: float = 0.3,
    value_norm_quantile: float | None = None,
) -> dict[str, np.ndarray]:
    """Fraction of keys that are attention sinks, per layer and branch (see the module docstring).

    Args:
        q: [L, T, HQ, D]; k, v: [L, T, H, D] post-RoPE (one example).
        gates: [L, T, HQ, 3]; block_indices: [L, T, H, S]; vision_mask: [T] bool.

    Returns:
        {branch or "combined": [L] sink ratio}.
    """
    num_layers, t, hq, _ = q.shape
    h = k.shape[2]
    group = hq // h
    rows = np.flatnonzero(np.asarray(vision_mask, bool))
    pos = np.arange(t)
    causal = pos[None] <= rows[:, None]
    token_visible = {
        "selection": causal,
        "sliding_window": causal & (pos[None] > rows[:, None] - window_size),
        "combined": causal,
    }
    nb = -(-t // block_size)
    block_visible = (np.arange(nb)[None] + 1) * block_size - 1 <= rows[:, None]
    out = {name: np.zeros(num_layers) for name in (*BRANCHES, "combined")}
    for layer in range(num_layers):
        counts = dict.fromkeys(out, 0)
        for head in range(hq):
            kv = head // group
            full = branch_attention(
                np.asarray(q[layer, :, head], np.float64),
                np.asarray(k[layer, :, kv], np.float64),
                np.asarray(block_indices[layer, :, kv]),
                block_size=block_size,
                window_size=window_size,
            )
            maps = {name: attn[rows] for name, attn in full.items()}
            g = gates[layer, rows, head].astype(np.float64)  # [Q, 3]
            maps["combined"] = (
                g[:, :1] * expand_blocks(maps["compression"], block_size, t)
                + g[:, 1:2] * maps["selection"]
                + g[:, 2:3] * maps["sliding_window"]
            )
            values = np.asarray(v[layer, :, kv], np.float64)
            norms = {
                "compression": np.linalg.norm(block_means(values, block_size), axis=-1),
                "token": np.linalg.norm(values, axis=-1),
            }
            for name, attn in maps.items():
                if name == "compression":
                    alpha, key_norms = importance(attn, block_visible), norms["compression"]
                else:
                    alpha, key_norms = importance(attn, token_visible[name]), norms["token"]
                sink = alpha > eps
                if value_norm_quantile is not None:
                    sink &= key_norms <= np.quantile(key_norms, value_norm_quantile)
                counts[name] += int(sink.sum())
        for name in out:
            keys = nb if name == "compression" else t
            out[name][layer] = counts[name] / (keys * hq)
    return out


def sink_table(ratios: dict[str, np.ndarray]) -> str:
    """Per layer sink ratio (%) of each branch, and the mean over layers."""
    names = list(ratios)
    num_layers = len(ratios[names[0]])
    rows = [[layer] + [100 * ratios[n][layer] for n in names] for layer in range(num_layers)]
    rows.append(["mean"] + [100 * float(np.mean(ratios[n])) for n in names])
    return markdown_table(["layer", *(f"{n} (%)" for n in names)], rows)


def plot_sink_ratios(ratios: dict[str, np.ndarray], path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in ratios.items():
        ax.plot(np.arange(len(values)), 100 * np.asarray(values), marker="o", label=name)
    ax.set(title="attention-sink ratio per layer", xlabel="layer", ylabel="sinks (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- selected blocks -------------------------------------------------------------------------------


def selection_map(
    block_indices: np.ndarray, num_blocks: int, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """How often blocks are selected.

    Args:
        block_indices: [T, H, S] (one layer, one example), -1 = unused slot.
        num_blocks: NB.
        rows: query rows to use (default all).

    Returns:
        (per_query [Q, NB]: fraction of KV heads selecting each block,
         per_block [NB]: fraction of (query, KV head) pairs that could select the block (block <=
         the query's block) and did).
    """
    idx = np.asarray(block_indices)
    if rows is not None:
        idx = idx[rows]
    q, h, _ = idx.shape
    hits = np.zeros((q, h, num_blocks + 1))
    np.put_along_axis(hits, np.where(idx < 0, num_blocks, idx), 1.0, axis=-1)
    per_query = hits[..., :num_blocks].mean(axis=1)
    query_block = np.max(np.where(idx < 0, -1, idx), axis=(1, 2))  # the current block is forced
    eligible = (np.arange(num_blocks)[None] <= query_block[:, None]).sum(axis=0)
    per_block = np.where(eligible > 0, per_query.sum(axis=0) / np.maximum(eligible, 1), 0.0)
    return per_query, per_block


def selection_table(per_block: np.ndarray, top: int = 10) -> str:
    order = np.argsort(-per_block, kind="stable")[:top]
    return markdown_table(
        ["block", "selection rate (%)"], [[int(b), 100 * per_block[b]] for b in order]
    )


def plot_selection_map(per_query: np.ndarray, per_block: np.ndarray, path: str, title: str) -> None:
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(8, 7), gridspec_kw={"height_ratios": [3, 1]}, sharex=True
    )
    image = top.imshow(per_query, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="none")
    top.set(title=title, ylabel="query (vision token)")
    fig.colorbar(image, ax=[top, bottom], label="fraction of KV heads")
    bottom.bar(np.arange(per_block.size), 100 * per_block)
    bottom.set(xlabel="key block", ylabel="selected (%)")
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- attention budget ------------------------------------------------------------------------------


def attention_budget(length: int, block_size: int, block_count: int, window_size: int) -> float:
    """Mean over query positions t of (keys an NSA query attends) / (t + 1), dense causal = 1.

    Keys attended at t: the selected blocks' tokens (<= block_count * block_size), the window
    (<= window_size) and the complete compressed blocks ((t + 1) // block_size), each capped at the
    t + 1 causal keys.
    """
    t = np.arange(length) + 1
    keys = np.minimum(t, block_count * block_size) + np.minimum(t, window_size) + t // block_size
    return float(np.mean(np.minimum(keys, t) / t)) if length else 0.0


def budget_sweep(
    run: Callable[[int, int], float],
    block_counts: Sequence[int],
    window_sizes: Sequence[int],
) -> np.ndarray:
    """accuracy[i, j] = run(block_counts[i], window_sizes[j])."""
    acc = np.zeros((len(block_counts), len(window_sizes)))
    for (i, bc), (j, ws) in itertools.product(enumerate(block_counts), enumerate(window_sizes)):
        acc[i, j] = run(bc, ws)
    return acc


def sweep_table(
    accuracy: np.ndarray,
    block_counts: Sequence[int],
    window_sizes: Sequence[int],
    *,
    length: int,
    block_size: int,
) -> str:
    rows = [
        [bc, ws, 100 * attention_budget(length, block_size, bc, ws), 100 * accuracy[i, j]]
        for (i, bc), (j, ws) in itertools.product(enumerate(block_counts), enumerate(window_sizes))
    ]
    return markdown_table(
        ["block_count", "window_size", f"budget @ {length} tokens (%)", "accuracy (%)"], rows
    )


def plot_sweep(
    accuracy: np.ndarray, block_counts: Sequence[int], window_sizes: Sequence[int], path: str
) -> None:
    fig, ax = plt.subplots(figsize=(1.4 * len(window_sizes) + 3, 1.1 * len(block_counts) + 2))
    image = ax.imshow(100 * accuracy, cmap="viridis", aspect="auto")
    for i, j in itertools.product(range(len(block_counts)), range(len(window_sizes))):
        ax.text(j, i, f"{100 * accuracy[i, j]:.1f}", ha="center", va="center", color="w")
    ax.set(
        xticks=range(len(window_sizes)),
        xticklabels=window_sizes,
        xlabel="window_size",
        yticks=range(len(block_counts)),
        yticklabels=block_counts,
        ylabel="block_count",
        title="accuracy (%) per attention budget",
    )
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- CLI -------------------------------------------------------------------------------------------


def analyze_internals(
    internals: dict[str, Any], out: str, *, block_size: int, window_size: int, eps: float = 0.3
) -> dict[str, str]:
    """Writes gates / sinks / selection tables (.md) and plots (.png) of one example to `out`.

    `internals` holds per-layer arrays of batch row 0: q [L,T,HQ,D], k, v [L,T,H,D], gates
    [L,T,HQ,3], block_indices [L,T,H,S] and vision_mask [T].
    """
    os.makedirs(out, exist_ok=True)
    mask = np.asarray(internals["vision_mask"], bool)
    stats = gate_statistics(internals["gates"], mask)
    ratios = sink_ratios(
        internals["q"],
        internals["k"],
        internals["v"],
        internals["gates"],
        internals["block_indices"],
        mask,
        block_size=block_size,
        window_size=window_size,
        eps=eps,
    )
    layer = internals["block_indices"].shape[0] - 1
    t = mask.size
    per_query, per_block = selection_map(
        internals["block_indices"][layer], -(-t // block_size), np.flatnonzero(mask)
    )
    tables = {
        "gates": gate_table(stats),
        "sinks": sink_table(ratios),
        "selection": selection_table(per_block),
    }
    for name, table in tables.items():
        with open(os.path.join(out, f"{name}.md"), "w") as f:
            f.write(table)
    plot_gate_statistics(stats, os.path.join(out, "gates.png"))
    plot_sink_ratios(ratios, os.path.join(out, "sinks.png"))
    plot_selection_map(
        per_query, per_block, os.path.join(out, "selection.png"), f"selected blocks, layer {layer}"
    )
    return tables


def _prefill_command(args: argparse.Namespace) -> None:
    from videonsa_jax import infer
    from videonsa_jax.model import videonsa

    model, tokenizer, _ = infer.load(args.model, attention="videonsa")
    question = infer.encode_video_question(
        tokenizer,
        args.video,
        args.question,
        fps=args.fps,
        max_frames=args.max_frames,
        max_pixels=args.max_pixels,
    )
    inputs = infer.batch_inputs(model, [question], pad_token_id=0)
    internals = {
        k: np.asarray(v)[:, 0] if k != "vision_mask" else np.asarray(v)[0]
        for k, v in videonsa.attention_internals(model, inputs).items()
    }
    a = model.config.attention
    tables = analyze_internals(
        internals, args.out, block_size=a.block_size, window_size=a.window_size, eps=args.eps
    )
    for name, table in tables.items():
        print(f"## {name}\n\n{table}")


def _sweep_command(args: argparse.Namespace) -> None:
    from videonsa_jax import evaluate
    from videonsa_jax.training.configs import load_config_file

    config = load_config_file(args.config)
    block_counts = [int(x) for x in args.block_counts.split(",")]
    window_sizes = [int(x) for x in args.window_sizes.split(",")]

    def run(block_count: int, window_size: int) -> float:
        config.workdir = os.path.join(args.out, f"bc{block_count}_ws{window_size}")
        result = evaluate.run(config, args.model, block_count=block_count, window_size=window_size)
        return result[result["headline"]]

    accuracy = budget_sweep(run, block_counts, window_sizes)
    os.makedirs(args.out, exist_ok=True)
    table = sweep_table(accuracy, block_counts, window_sizes, length=args.length, block_size=64)
    with open(os.path.join(args.out, "sweep.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump(
            {
                "block_counts": block_counts,
                "window_sizes": window_sizes,
                "accuracy": accuracy.tolist(),
            },
            f,
        )
    plot_sweep(accuracy, block_counts, window_sizes, os.path.join(args.out, "sweep.png"))
    print(table)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m videonsa_jax.analysis",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    prefill = sub.add_parser("prefill", help="gates, sinks and selected blocks of one video")
    prefill.add_argument("--model", required=True)
    prefill.add_argument("--video", required=True)
    prefill.add_argument("--question", default="Describe this video.")
    prefill.add_argument("--fps", type=float, default=2.0)
    prefill.add_argument("--max_frames", type=int, default=64)
    prefill.add_argument("--max_pixels", type=int, default=64 * 28 * 28)
    prefill.add_argument("--eps", type=float, default=0.3)
    prefill.add_argument("--out", required=True)
    prefill.set_defaults(fn=_prefill_command)
    sweep = sub.add_parser("sweep", help="accuracy over a block_count x window_size grid")
    sweep.add_argument("--config", required=True)
    sweep.add_argument("--model", required=True)
    sweep.add_argument("--block_counts", default="8,16,32")
    sweep.add_argument("--window_sizes", default="64,128,256")
    sweep.add_argument("--length", type=int, default=32768, help="length for the budget column")
    sweep.add_argument("--out", required=True)
    sweep.set_defaults(fn=_sweep_command)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
