"""Self-attention of a decoder layer and its variants ("dense"; "videonsa*" in `videonsa.py`).

"dense" runs cuDNN flash attention on GPU in bf16/fp16 without a KV cache
(`cudnn_causal_attention`), else the chunked XLA `dense_attention`.

`Attention.__call__` projects q/k/v, applies M-RoPE, writes the KV cache, then calls `_attend`, the
one place where the attention kinds differ. Everything a variant needs is at hand there: the
layer's normed input `x`, post-RoPE `q`/`k`/`v`, and the per-forward `AttentionBatch` (vision-row
mask, 3-D positions, key validity, query indices).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.nsa import gpu_rows
from videonsa_jax.config import ModelConfig
from videonsa_jax.model import rope, videonsa
from videonsa_jax.model.layers import Linear
from videonsa_jax.parallel import context as context_lib

# Finite, so that fully masked rows (padding queries) give a uniform average instead of NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# Cap on a query chunk's fp32 logits in `dense_attention`, per batch row: 1024 queries x 128K keys
# x 28 heads would be 15 GiB (the VideoNSA text rows at 128K).
_CHUNK_LOGITS_BYTES = 2**30


class AttentionBatch(NamedTuple):
    """Per-forward inputs shared by all decoder layers (a pytree; not scanned over).

    cos, sin: [B, T, head_dim] M-RoPE tables for the T query tokens (activation dtype).
    q_index: [T] int32, slot of each query in the key sequence (arange(T) without a cache,
        cache.index + arange(T) with one). Query t sees key s iff s <= q_index[t] and
        kv_valid[b, s].
    kv_valid: [B, S] bool, key slot holds a real (non-padding) token; S = T or the cache length.
    vision_mask: [B, T] bool, query row is an image/video pad token.
    positions: [3, B, T] int32 M-RoPE positions (t, h, w) of the queries.
    text_rows: [B, n] int32 query rows that take the dense branch of the VideoNSA kinds (padded
        with T; `videonsa.text_rows`), or None: every row may be text (decode steps, text-only
        input), and the VideoNSA kinds compute dense attention for all rows.
    """

    cos: jax.Array
    sin: jax.Array
    q_index: jax.Array
    kv_valid: jax.Array
    vision_mask: jax.Array
    positions: jax.Array
    text_rows: jax.Array | None = None


class LayerCache(NamedTuple):
    """One layer's KV cache: k, v [B, S, kv_heads, head_dim] (post-RoPE), filled from `index`."""

    k: jax.Array
    v: jax.Array
    index: jax.Array  # [] int32: first slot this call writes.


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_index: jax.Array,
    kv_valid: jax.Array,
    chunk_size: int = 1024,
) -> jax.Array:
    """Causal grouped-query attention with an fp32 softmax.

    Queries are processed in rematerialised chunks of `chunk_size` (fewer where a chunk's fp32
    logits, chunk x S x Hq x 4 bytes per batch row, would pass 1 GiB), so memory (forward and
    backward) grows as chunk_size * S, not T * S.

    Args:
        q: [B, T, Hq, D]; k, v: [B, S, Hkv, D] with Hq % Hkv == 0 (query head h uses kv head
            h // (Hq // Hkv)).
        q_index: [T] key slot of each query; key s is visible iff s <= q_index[t].
        kv_valid: [B, S] bool, False for padding keys.

    Returns:
        [B, T, Hq, D] in q.dtype.
    """
    t = q.shape[1]
    chunk_size = max(1, min(chunk_size, _CHUNK_LOGITS_BYTES // (4 * k.shape[1] * q.shape[2])))
    if t <= chunk_size:
        return _dense_chunk(q, k, v, q_index, kv_valid)
    n = -(-t // chunk_size)
    pad = n * chunk_size - t
    qc = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    qc = jnp.moveaxis(qc.reshape(q.shape[0], n, chunk_size, *q.shape[2:]), 1, 0)
    ic = jnp.pad(q_index, (0, pad)).reshape(n, chunk_size)
    step = jax.checkpoint(lambda args: _dense_chunk(args[0], k, v, args[1], kv_valid))
    out = jax.lax.map(step, (qc, ic))  # [n, B, chunk, Hq, D]
    out = jnp.moveaxis(out, 0, 1).reshape(q.shape[0], n * chunk_size, *q.shape[2:])
    return out[:, :t]


def rows_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, q_index: jax.Array, kv_valid: jax.Array
) -> jax.Array:
    """Causal GQA of n gathered query rows with per-row key limits (the VideoNSA text rows).

    On GPU in bf16/fp16 the Pallas flash kernel `gpu_rows.rows_attention` (no [n, S] array);
    elsewhere `dense_attention` per batch row (fp32 logits of <= 1 GiB per chunk). Both give a
    row that sees no valid key the mean of v over all keys.

    Args:
        q: [B, n, Hq, D] query rows; k, v: [B, S, Hkv, D].
        q_index: [B, n] row i sees keys s <= q_index[b, i]; kv_valid: [B, S] bool.

    Returns:
        [B, n, Hq, D] in q.dtype.
    """
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        return gpu_rows.rows_attention(q, k, v, q_index, kv_valid)
    return xla_rows_attention(q, k, v, q_index, kv_valid)


def xla_rows_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, q_index: jax.Array, kv_valid: jax.Array
) -> jax.Array:
    """`rows_attention` through the chunked XLA `dense_attention`, one batch row at a time (same
    arguments and result); what `rows_attention` runs off GPU."""

    def one(q_b, k_b, v_b, index_b, valid_b):
        out = dense_attention(
            q_b[None], k_b[None], v_b[None], q_index=index_b, kv_valid=valid_b[None]
        )
        return out[0]

    return jax.vmap(one)(q, k, v, q_index, kv_valid)


def cudnn_causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, kv_valid: jax.Array
) -> jax.Array:
    """Causal GQA of T tokens over themselves with cuDNN flash attention (GPU, bf16/fp16).

    The same function as `dense_attention` with q_index = arange(T), provided kv_valid is a
    right-padding prefix mask (each row's valid keys come first): cuDNN takes key validity as
    per-row lengths. That is the layout of training batches and of `generate.pad_prompts`.
    Padding query rows see every valid key, as in `dense_attention` (no query lengths).

    Args:
        q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] with Hq % Hkv == 0.
        kv_valid: [B, T] bool, a prefix of True per row.

    Returns:
        [B, T, Hq, D] in q.dtype.
    """
    lengths = jnp.maximum(jnp.sum(kv_valid, axis=1, dtype=jnp.int32), 1)  # all-padding rows: 1
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=True, key_value_seq_lengths=lengths, implementation="cudnn"
    )


def _dense_chunk(q, k, v, q_index, kv_valid):
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits * (d**-0.5)
    visible = jnp.arange(k.shape[1])[None, :] <= q_index[:, None]  # [T, S]
    visible = visible[None] & kv_valid[:, None, :]  # [B, T, S]
    logits = jnp.where(visible[:, None, None], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, d).astype(q.dtype)


class Attention(nnx.Module):
    """Qwen2 GQA self-attention: q/k/v with bias, o_proj without, M-RoPE on q and k."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        t = config.text
        self.kind = config.attention.kind
        self.num_heads = t.num_heads
        self.num_kv_heads = t.num_kv_heads
        self.head_dim = t.head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        q_dim, kv_dim = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
        self.q_proj = Linear(t.hidden_size, q_dim, use_bias=True, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(t.hidden_size, kv_dim, use_bias=True, axes=("embed", "kv_heads"), **kw)
        self.v_proj = Linear(t.hidden_size, kv_dim, use_bias=True, axes=("embed", "kv_heads"), **kw)
        self.o_proj = Linear(q_dim, t.hidden_size, use_bias=False, axes=("heads", "embed"), **kw)
        self.nsa_config = config.attention
        self.capture_internals = False  # `videonsa.attention_internals` sets it.
        if self.kind == "videonsa_release":
            videonsa.check_heads(config)
        if self.kind != "dense":
            self.g_proj_1, self.g_proj_2 = videonsa.gate_projections(config, **kw)

    def __call__(
        self, x: jax.Array, batch: AttentionBatch, cache: LayerCache | None = None
    ) -> tuple[jax.Array, LayerCache | None]:
        """x: [B, T, hidden] (normed layer input) -> ([B, T, hidden], updated cache or None)."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q = rope.apply_rotary(q, batch.cos, batch.sin)
        k = rope.apply_rotary(k, batch.cos, batch.sin)
        if cache is not None:
            start = (0, cache.index, 0, 0)
            cache = LayerCache(
                k=jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start),
                v=jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start),
                index=cache.index,
            )
            k, v = cache.k.astype(q.dtype), cache.v.astype(q.dtype)
        out = self._attend(x, q, k, v, batch)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), cache

    def _attend(
        self, x: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, batch: AttentionBatch
    ) -> jax.Array:
        """The attention kinds: q [B,T,Hq,D], k/v [B,S,Hkv,D] -> [B,T,Hq,D]."""
        if self.kind == "dense":
            self_attention = k.shape[1] == q.shape[1]  # no cache, or a prefill filling it
            if context_lib.context_size() > 1 and self_attention:  # sequence parallel
                return context_lib.dense_attention(q, k, v, batch.kv_valid)
            fast = q.dtype in (jnp.bfloat16, jnp.float16) and jax.default_backend() == "gpu"
            if self_attention and fast:  # q_index == arange(T)
                return cudnn_causal_attention(q, k, v, batch.kv_valid)
            return dense_attention(q, k, v, q_index=batch.q_index, kv_valid=batch.kv_valid)
        return videonsa.attend(self, x, q, k, v, batch)
