"""Qwen2.5 decoder: token embedding, a scanned stack of decoder layers, final RMSNorm.

The decoder layers are one module whose parameters carry a leading `layers` axis (built with
`nnx.vmap`); the forward pass runs them with `jax.lax.scan`, optionally rematerialised
(`ModelConfig.remat`). An optional `KVCache` (preallocated, stacked over layers) is written by
prefill and read by decode steps, so a jitted decode step never recompiles.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from videonsa_jax.config import ModelConfig
from videonsa_jax.model import rope
from videonsa_jax.model.attention import Attention, AttentionBatch, LayerCache
from videonsa_jax.model.layers import REMAT_POLICIES, Linear, RMSNorm, param
from videonsa_jax.parallel import context


class KVCache(NamedTuple):
    """Keys and values of all decoder layers, preallocated.

    k, v: [num_layers, B, max_len, kv_heads, head_dim], post-RoPE.
    valid: [B, max_len] bool, slot holds a real token (False for padding and unwritten slots).
    index: [] int32, number of slots written so far (shared by the batch; a call with T tokens
        writes slots index .. index + T - 1 and advances it by T).
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, config: ModelConfig, batch_size: int, max_len: int, dtype=jnp.bfloat16):
        t = config.text
        shape = (t.num_layers, batch_size, max_len, t.num_kv_heads, t.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch_size, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        t = config.text
        kw = dict(use_bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = Linear(t.hidden_size, t.intermediate_size, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(t.hidden_size, t.intermediate_size, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(t.intermediate_size, t.hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        t = config.text
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(config, **kw)
        self.post_attention_layernorm = RMSNorm(
            t.hidden_size, eps=t.rms_norm_eps, param_dtype=param_dtype
        )
        self.mlp = MLP(config, **kw)

    def __call__(
        self, x: jax.Array, batch: AttentionBatch, cache: LayerCache | None = None
    ) -> tuple[jax.Array, LayerCache | None]:
        h, cache = self.self_attn(self.input_layernorm(x), batch, cache)
        h = x + h
        return h + self.mlp(self.post_attention_layernorm(h)), cache


class TextModel(nnx.Module):
    """Embedding + scanned decoder layers + final norm (HF `Qwen2_5_VLTextModel`)."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        t = config.text
        if config.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {config.remat!r}")
        self.config = config
        self.dtype = dtype
        self.embed_tokens = param(
            rngs,
            nnx.initializers.normal(0.02),
            (t.vocab_size, t.hidden_size),
            ("vocab", "embed"),
            param_dtype,
        )

        @nnx.split_rngs(splits=t.num_layers)
        @nnx.vmap(axis_size=t.num_layers, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, param_dtype=param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """[B, T] int -> [B, T, hidden] in the activation dtype."""
        return jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)

    def __call__(
        self,
        embeds: jax.Array,
        positions: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        vision_mask: jax.Array | None = None,
        text_rows: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Runs the decoder stack.

        Args:
            embeds: [B, T, hidden] input embeddings (vision features already scattered in).
            positions: [3, B, T] int32 M-RoPE positions.
            attention_mask: [B, T], 1 for real tokens, 0 for padding (keys never attend to it).
            vision_mask: [B, T] bool, image/video pad rows (used by the VideoNSA attention).
            text_rows: [B, n] int32 rows of the VideoNSA dense branch, or None (see
                `AttentionBatch.text_rows`).
            cache: written at slots cache.index .. cache.index + T - 1; attention then runs over all
                cached keys.

        Returns:
            ([B, T, hidden] final-normed hidden states, advanced cache or None). Values the layers
            sow (`nnx.Intermediate`, e.g. VideoNSA gate means) are re-sown on this module, stacked
            over layers.
        """
        t = self.config.text
        b, length, _ = embeds.shape
        mask = (
            jnp.ones((b, length), bool) if attention_mask is None else attention_mask.astype(bool)
        )
        vision_mask = jnp.zeros((b, length), bool) if vision_mask is None else vision_mask
        real_length = length
        if cache is None:  # Sequence parallelism: a no-op without a `context` mesh axis.
            length = context.padded_length(length, self.config.attention.block_size)
            embeds, positions, mask, vision_mask, text_rows = context.pad_inputs(
                embeds, positions, mask, vision_mask, text_rows, length
            )
        cos, sin = rope.mrope_cos_sin(
            positions,
            head_dim=t.head_dim,
            theta=t.rope_theta,
            mrope_section=t.mrope_section,
            dtype=self.dtype,
        )
        start = jnp.zeros((), jnp.int32) if cache is None else cache.index
        kv_valid = mask
        if cache is not None:
            kv_valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, start))
        batch = AttentionBatch(
            cos=cos,
            sin=sin,
            q_index=start + jnp.arange(length, dtype=jnp.int32),
            kv_valid=kv_valid,
            vision_mask=vision_mask,
            positions=positions,
            text_rows=text_rows,
        )

        graphdef, state = nnx.split(self.layers)

        def body(x, xs):
            layer_state, layer_kv = xs
            layer = nnx.merge(graphdef, layer_state)
            layer_cache = None if layer_kv is None else LayerCache(*layer_kv, index=start)
            x, layer_cache = layer(x, batch, layer_cache)
            if layer_cache is None:
                x = context.shard_sequence(x)
            sown = {
                str(path[-1]): var.get_value()
                for path, var in nnx.to_flat_state(nnx.pop(layer, nnx.Intermediate))
            }
            return x, (None if layer_cache is None else (layer_cache.k, layer_cache.v), sown)

        policy = REMAT_POLICIES[self.config.remat]
        if self.config.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        kv = None if cache is None else (cache.k, cache.v)
        x, (new_kv, sown) = jax.lax.scan(body, embeds, (state, kv))
        for name, values in sown.items():
            for value in values:
                self.sow(nnx.Intermediate, name, value)
        if cache is not None:
            cache = KVCache(k=new_kv[0], v=new_kv[1], valid=kv_valid, index=start + length)
        return self.norm(x[:, :real_length]), cache
