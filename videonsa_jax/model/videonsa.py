"""VideoNSA attention of a decoder layer: the gate MLP and the two hybrid attention kinds.

`Attention._attend` calls `attend` for `config.attention.kind` in {"videonsa", "videonsa_release"}
(see shared/design/NSA_SEMANTICS.md and the spec's §5):

* "videonsa": vision rows (image/video pad tokens) take NSA over the causal keys with the layer's
  gates; text rows take dense causal GQA over all keys. The dense part runs only for the rows listed
  in `AttentionBatch.text_rows` (a static-size bucket computed on the host by `text_rows`), so it
  costs O(T_text * T); no [T, T] array is built.
* "videonsa_release": the released implementation. Vision rows are detected from the M-RoPE
  positions (text iff t == h == w); text rows of q, k, v are zeroed and their gate logits set to 0;
  NSA runs on the 64-slot head layout (`pallas_kernels.nsa.release`) for every row; a dense branch
  with text-only queries (vision rows: the causal mean of V) is added to every row.

Gate MLP (`g_proj_1` hidden->hidden + bias, exact GELU, `g_proj_2` hidden->3*heads + bias, divided
by `gate_temperature`, sigmoid); output index head*3 + branch, branch 0 compression / 1 selection /
2 sliding window. Initialisation follows the released training code: weights N(0, 0.02), biases 0.
This makes the gates 0.5 only on average: the logits are not 0. For a unit-RMS input, g_proj_1's
outputs have std 0.02 * sqrt(hidden) and the logits std 0.02 * sqrt(hidden * E[gelu(.)^2]) / 0.3:
about 3.2 for the 7B model (hidden 3584; gates spread over (0, 1), std ~0.37 across tokens),
0.04 for a 64-wide toy model (gates within ~0.01 of 0.5). Zeroing g_proj_2's weight would give
exactly 0.5 but is not what the released model was trained from.

What a layer records (`nnx.Intermediate`, collected over the scanned layers by `TextModel`, which
re-sows them stacked with a leading layer axis; pop them with `nnx.pop(model, nnx.Intermediate)`):
    gate_cmp, gate_slc, gate_swa  [L] mean gate over the vision rows and heads (always);
    internal_q [L,B,T,HQ,D], internal_k / internal_v [L,B,S,H,D], internal_gates [L,B,T,HQ,3],
    internal_block_indices [L,B,T,H,S']  (only when the layers' `capture_internals` is set; see
    `attention_internals`). Release block indices are those of the 64-slot NSA (4 KV heads).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.nsa import nsa, release
from videonsa_jax.config import ModelConfig

# A module import: attention.py imports this module, so names are looked up at call time.
from videonsa_jax.model import attention as attention_lib
from videonsa_jax.model.layers import Linear
from videonsa_jax.parallel import context as context_lib

GATE_NAMES = ("gate_cmp", "gate_slc", "gate_swa")
# `text_rows` buckets the number of text rows up to a multiple of this (fewer recompilations).
TEXT_ROWS_MULTIPLE = 64


# -- gates -----------------------------------------------------------------------------------------


def gate_projections(
    config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs
) -> tuple[Linear, Linear]:
    """The gate MLP's `g_proj_1` [hidden, hidden] and `g_proj_2` [hidden, 3 * heads], with biases.

    Weights N(0, 0.02), biases 0 (the released `_reset_gate_initialization`).
    """
    t = config.text
    kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    g_proj_1 = Linear(t.hidden_size, t.hidden_size, axes=("embed", "mlp"), **kw)
    g_proj_2 = Linear(t.hidden_size, 3 * t.num_heads, axes=("mlp", None), **kw)
    return g_proj_1, g_proj_2


def gate_logits(g_proj_1: Linear, g_proj_2: Linear, x: jax.Array, temperature: float) -> jax.Array:
    """Gate logits g_proj_2(gelu(g_proj_1(x))) / temperature.

    Args:
        x: [B, T, hidden] the layer's normed input.

    Returns:
        [B, T, heads, 3] in the activation dtype; [..., h, b] is output h*3 + b of g_proj_2.
    """
    g = g_proj_2(jax.nn.gelu(g_proj_1(x), approximate=False))
    g = g / jnp.asarray(temperature, g.dtype)
    return g.reshape(*x.shape[:2], -1, 3)


def _gate_means(gates: jax.Array, rows: jax.Array) -> dict[str, jax.Array]:
    """Mean of each branch gate over the rows where `rows` [B, T] is True and all heads."""
    w = rows.astype(jnp.float32)[..., None, None]
    total = jnp.sum(gates.astype(jnp.float32) * w, axis=(0, 1, 2))
    count = jnp.maximum(jnp.sum(w) * gates.shape[2], 1.0)
    return {name: total[i] / count for i, name in enumerate(GATE_NAMES)}


# -- host side -------------------------------------------------------------------------------------


def text_rows(
    config: ModelConfig,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    positions: np.ndarray,
    num_rows: int | None = None,
) -> np.ndarray:
    """Query rows that take the dense branch, for `AttentionBatch.text_rows` (numpy, host side).

    Text rows are the real (attention_mask 1) rows that are not image/video pad tokens ("videonsa"),
    or whose three M-RoPE positions are equal ("videonsa_release", the released detection rule).

    Args:
        input_ids, attention_mask: [B, L].
        positions: [3, B, L] M-RoPE positions.
        num_rows: size of the row buffer; default: the largest per-row count rounded up to a
            multiple of TEXT_ROWS_MULTIPLE (at most L). Fix it to keep shapes equal across batches.

    Returns:
        int32 [B, num_rows]: each batch row's text rows in increasing order, padded with L.

    Raises:
        ValueError: a batch row has more than `num_rows` text rows.
    """
    ids = np.asarray(input_ids)
    if config.attention.kind == "videonsa_release":
        pos = np.asarray(positions)
        text = (pos[0] == pos[1]) & (pos[1] == pos[2])
    else:
        text = (ids != config.image_token_id) & (ids != config.video_token_id)
    text &= np.asarray(attention_mask).astype(bool)
    b, length = ids.shape
    most = int(text.sum(axis=-1).max(initial=0))
    if num_rows is None:
        bucket = -(-max(most, 1) // TEXT_ROWS_MULTIPLE) * TEXT_ROWS_MULTIPLE
        num_rows = min(bucket, length)
    if num_rows < most:
        raise ValueError(f"num_text_rows={num_rows} < {most} text rows in a batch row")
    rows = np.full((b, num_rows), length, np.int32)
    for i in range(b):
        found = np.flatnonzero(text[i])
        rows[i, : found.size] = found
    return rows


# -- device side -----------------------------------------------------------------------------------


def dense_rows(q: jax.Array, k: jax.Array, v: jax.Array, rows: jax.Array, batch: Any) -> jax.Array:
    """Dense causal GQA for the query rows `rows` only (`attention.rows_attention`): O(n * S).

    Args:
        q: [B, T, HQ, D]; k, v: [B, S, H, D].
        rows: int [B, n] query rows; entries >= T are padding (their outputs are garbage).
        batch: the `AttentionBatch` (q_index, kv_valid).

    Returns:
        [B, n, HQ, D] in q.dtype.
    """
    safe = jnp.minimum(rows, q.shape[1] - 1)
    q_rows = jnp.take_along_axis(q, safe[:, :, None, None], axis=1)
    return context_lib.per_device(
        attention_lib.rows_attention,
        (q_rows, k, v, batch.q_index[safe], batch.kv_valid),
        ("bthd", "bthd", "bthd", "bt", "bt"),
        "bthd",
        heads=(q.shape[2], k.shape[2]),
    )


def _scatter_rows(out: jax.Array, rows: jax.Array, values: jax.Array) -> jax.Array:
    """out[b, rows[b, i]] = values[b, i]; rows >= T are dropped."""
    b_ix = jnp.arange(out.shape[0])[:, None]
    return out.at[b_ix, rows].set(values.astype(out.dtype), mode="drop")


def causal_value_mean(v: jax.Array, batch: Any, num_heads: int) -> jax.Array:
    """Mean of the visible values of each query (dense attention with a zero query).

    Args:
        v: [B, S, H, D]; batch: the `AttentionBatch` (query t sees valid keys s <= q_index[t]).

    Returns:
        [B, T, num_heads, D] in v.dtype; head h reads KV head h // (num_heads // H).
    """
    w = batch.kv_valid.astype(jnp.float32)
    sums = jnp.cumsum(v.astype(jnp.float32) * w[..., None, None], axis=1)[:, batch.q_index]
    counts = jnp.cumsum(w, axis=1)[:, batch.q_index]
    mean = sums / jnp.maximum(counts, 1.0)[..., None, None]
    return jnp.repeat(mean, num_heads // v.shape[2], axis=2).astype(v.dtype)


def _zeros_like_shapes(fn) -> Any:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn))


def _videonsa(module: Any, x, q, k, v, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Kind "videonsa": NSA for vision rows, dense causal GQA for text rows."""
    cfg = module.nsa_config
    t = q.shape[1]
    q_offset = 0 if k.shape[1] == t else batch.q_index[0]

    def local_nsa(q, k, v, gates, *offset):  # a traced offset comes as an argument
        return nsa(
            q,
            k,
            v,
            gates[..., 0],
            gates[..., 1],
            gates[..., 2],
            block_size=cfg.block_size,
            block_count=cfg.block_count,
            window_size=cfg.window_size,
            impl=cfg.impl,
            return_block_indices=True,
            q_offset=offset[0] if offset else q_offset,
        )

    def run_nsa():
        gates = jax.nn.sigmoid(
            gate_logits(module.g_proj_1, module.g_proj_2, x, cfg.gate_temperature)
        )
        offset = () if isinstance(q_offset, int) else (q_offset,)
        o, block_indices = context_lib.per_device(
            local_nsa,
            (q, k, v, gates, *offset),
            ("bthd",) * 4 + ("",) * len(offset),
            ("bthd", "bthd"),
            heads=(q.shape[2], k.shape[2]),
        )
        return o, gates, block_indices

    if batch.text_rows is not None and context_lib.context_size() > 1:  # sequence parallel
        gates = jax.nn.sigmoid(
            gate_logits(module.g_proj_1, module.g_proj_2, x, cfg.gate_temperature)
        )
        out, block_indices = context_lib.hybrid_attention(
            q, k, v, gates, batch.text_rows, batch.kv_valid,
            block_size=cfg.block_size, block_count=cfg.block_count,
            window_size=cfg.window_size, impl=cfg.impl,
        )  # fmt: skip
    elif batch.text_rows is None:  # Every row may be text (decode steps, text-only input).
        dense = attention_lib.dense_attention(
            q, k, v, q_index=batch.q_index, kv_valid=batch.kv_valid
        )
        o_nsa, gates, block_indices = jax.lax.cond(
            jnp.any(batch.vision_mask), run_nsa, lambda: _zeros_like_shapes(run_nsa)
        )
        out = jnp.where(batch.vision_mask[..., None, None], o_nsa, dense)
    else:
        o_nsa, gates, block_indices = run_nsa()
        out = _scatter_rows(o_nsa, batch.text_rows, dense_rows(q, k, v, batch.text_rows, batch))
    record = _gate_means(gates, batch.vision_mask)
    record.update(internal_gates=gates, internal_block_indices=block_indices)
    return out, record


def _videonsa_release(module: Any, x, q, k, v, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Kind "videonsa_release": the released layer (spec §5.4), every quirk included.

    The NSA branch sees the tokens of this call only (prefill from an empty cache, as released).
    """
    cfg = module.nsa_config
    b, t, hq, _ = q.shape
    pos = batch.positions
    is_vision = ~((pos[0] == pos[1]) & (pos[1] == pos[2]))  # [B, T]
    m = is_vision[..., None, None].astype(q.dtype)
    k_new, v_new = k, v
    if k.shape[1] != t:  # A prefill into a cache: this call's keys.
        start = batch.q_index[0]
        k_new, v_new = (jax.lax.dynamic_slice_in_dim(y, start, t, axis=1) for y in (k, v))

    def run_nsa():
        logits = gate_logits(module.g_proj_1, module.g_proj_2, x, cfg.gate_temperature)
        gates = jax.nn.sigmoid(logits * m)  # text rows: logits 0, gates 0.5
        g64 = [release.pad_heads(gates[..., i]) for i in range(3)]
        o64, block_indices = release.videonsa_release_nsa(
            release.pad_heads(q * m),
            k_new * m,
            v_new * m,
            *g64,
            block_size=cfg.block_size,
            block_count=cfg.block_count,
            window_size=cfg.window_size,
            return_block_indices=True,
        )
        return release.merge_heads(o64, hq), gates, block_indices

    if batch.text_rows is None:  # Every row may be text; NSA gives exactly 0 without vision rows.
        dense = attention_lib.dense_attention(
            q * (1 - m), k, v, q_index=batch.q_index, kv_valid=batch.kv_valid
        )
        o_nsa, gates, block_indices = jax.lax.cond(
            jnp.any(is_vision), run_nsa, lambda: _zeros_like_shapes(run_nsa)
        )
    else:
        o_nsa, gates, block_indices = run_nsa()
        dense = _scatter_rows(
            causal_value_mean(v, batch, hq),  # vision rows: zero query, uniform over keys
            batch.text_rows,
            dense_rows(q, k, v, batch.text_rows, batch),
        )
    # The released layer skips the dense branch when every row of the batch is vision.
    out = o_nsa + jnp.where(jnp.all(is_vision), jnp.zeros_like(dense), dense)
    record = _gate_means(gates, is_vision)
    record.update(internal_gates=gates, internal_block_indices=block_indices)
    return out, record


def attend(
    module: Any, x: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, batch: Any
) -> jax.Array:
    """The VideoNSA kinds of `Attention._attend`; records gate means (and internals) by `sow`.

    Args:
        module: the `Attention` (kind, nsa_config, g_proj_1, g_proj_2, capture_internals).
        x: [B, T, hidden] normed layer input; q: [B, T, HQ, D]; k, v: [B, S, H, D] (post-RoPE,
            S = T or the cache length); batch: the `AttentionBatch`.

    Returns:
        [B, T, HQ, D] in q.dtype.
    """
    kinds = {"videonsa": _videonsa, "videonsa_release": _videonsa_release}
    if module.kind not in kinds:
        raise NotImplementedError(f"attention kind {module.kind!r} is not implemented")
    out, record = kinds[module.kind](module, x, q, k, v, batch)
    for name in GATE_NAMES:
        module.sow(nnx.Intermediate, name, record[name])
    if module.capture_internals:
        for name, value in (("internal_q", q), ("internal_k", k), ("internal_v", v)):
            module.sow(nnx.Intermediate, name, value)
        for name in ("internal_gates", "internal_block_indices"):
            module.sow(nnx.Intermediate, name, record[name])
    return out.astype(q.dtype)


def check_heads(config: ModelConfig) -> None:
    """Raises ValueError if the released 64-slot layout cannot hold the model's heads."""
    t = config.text
    slots = release.NUM_SLOTS
    if 2 * t.num_heads > slots or slots % t.num_kv_heads:
        raise ValueError(
            f"videonsa_release needs 2 * heads <= {slots} and kv heads dividing {slots}; got "
            f"{t.num_heads} / {t.num_kv_heads}"
        )


# -- analysis --------------------------------------------------------------------------------------


def attention_internals(model: Any, inputs: Any) -> dict[str, jax.Array]:
    """Per-layer attention internals of one prefill (no cache), for `videonsa_jax.analysis`.

    Args:
        model: a `Qwen2_5_VL` with a VideoNSA attention kind.
        inputs: its `prepare_inputs(...)`.

    Returns:
        {"q": [L,B,T,HQ,D], "k", "v": [L,B,T,H,D], "gates": [L,B,T,HQ,3] (branch order cmp, slc,
        swa), "block_indices": [L,B,T,H,S'], "gate_cmp", "gate_slc", "gate_swa": [L] means over
        vision rows, "vision_mask": [B,T] (image/video pad tokens)}.
    """
    if model.config.attention.kind == "dense":
        raise ValueError("attention_internals needs a VideoNSA attention kind, not 'dense'")
    graphdef, state = nnx.split(model)
    return _internals(graphdef, state, inputs)


@functools.partial(jax.jit, static_argnums=0)
def _internals(graphdef, state, inputs) -> dict[str, jax.Array]:
    model = nnx.merge(graphdef, state)
    model.text.layers.self_attn.capture_internals = True
    model.hidden_states(inputs)
    out = {}
    for path, var in nnx.to_flat_state(nnx.pop(model, nnx.Intermediate)):
        name = str(path[-1])
        out[name.removeprefix("internal_")] = var.get_value()[-1]
    out["vision_mask"] = model.vision_mask(jnp.asarray(inputs.input_ids))
    return out
