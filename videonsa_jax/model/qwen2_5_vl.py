"""The whole Qwen2.5-VL: vision tower, embedding merge, decoder stack, lm head.

Host/device split:
    inputs = model.prepare_inputs(input_ids, ...)  # numpy: positions, vision layout, scatter
    logits = model.forward(inputs)                 # jittable, fixed shapes
    logits = model(input_ids, ...)                 # both (the public contract), forward jitted
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from videonsa_jax.config import ModelConfig
from videonsa_jax.model import rope, videonsa, vision
from videonsa_jax.model.layers import Linear
from videonsa_jax.model.text import KVCache, TextModel


class ModelInputs(NamedTuple):
    """Host-prepared, fixed-shape inputs of `Qwen2_5_VL.forward` (a pytree of arrays).

    input_ids: [B, L] int32.
    attention_mask: [B, L] int32, 1 for real tokens, 0 for padding.
    positions: [3, B, L] int32 M-RoPE positions (from `rope.get_rope_index`).
    rope_deltas: [B] int32, position offset of the next generated token minus its index.
    pixel_rows: [N, patch_dim] patch rows of all images, then all videos (zero padded to N), in
        the model's dtype (the ViT's first op casts to it: bf16 halves the batch), or None for
        text-only inputs.
    vision_layout: `vision.VisionLayout` for those rows, or None.
    vision_targets: [N // merge**2] int32, flat index b * L + l of the token each merged vision row
        replaces; padding rows hold B * L (dropped). None for text-only inputs.
    text_rows: [B, n] int32 query rows of the VideoNSA dense branch, padded with L
        (`videonsa.text_rows`), or None (dense attention: unused; VideoNSA: every row may be text).
    """

    input_ids: Any
    attention_mask: Any
    positions: Any
    rope_deltas: Any
    pixel_rows: Any = None
    vision_layout: Any = None
    vision_targets: Any = None
    text_rows: Any = None


class Qwen2_5_VL(nnx.Module):
    """Qwen2.5-VL (+ VideoNSA attention in the decoder layers, per `config.attention.kind`).

    Params: `visual` (ViT), `text` (embedding, stacked decoder layers, norm), `lm_head` (absent when
    `config.text.tie_word_embeddings`: the embedding table is reused).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        self.visual = vision.VisionTransformer(
            config.vision, dtype=dtype, param_dtype=param_dtype, remat=config.remat, rngs=rngs
        )
        self.text = TextModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        t = config.text
        self.lm_head = (
            None
            if t.tie_word_embeddings
            else Linear(
                t.hidden_size,
                t.vocab_size,
                use_bias=False,
                axes=("embed", "vocab"),
                rngs=rngs,
                dtype=dtype,
                param_dtype=param_dtype,
            )
        )

    # -- host side -------------------------------------------------------------------------------

    def prepare_inputs(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        second_per_grid_ts=None,
        *,
        num_patches: int | None = None,
        num_windows: int | None = None,
        num_slices: int | None = None,
        slice_len: int | None = None,
        num_text_rows: int | None = None,
    ) -> ModelInputs:
        """Computes positions, the vision layout and the vision scatter targets (numpy).

        Args:
            input_ids: [B, L] (or [L]) token ids with `<|image_pad|>` / `<|video_pad|>` rows.
            attention_mask: [B, L], 1 for real tokens (default: all ones).
            pixel_values, image_grid_thw: [N_img, patch_dim] patch rows and [n_img, 3] grids.
            pixel_values_videos, video_grid_thw: the same for videos.
            second_per_grid_ts: [n_vid] seconds per temporal grid step (default 1.0).
            num_patches: pad the patch rows to this many (fixed shapes for jit); default: none.
            num_windows, num_slices, slice_len: pad the ViT attention groups likewise (see
                `vision.prepare_vision_layout`).
            num_text_rows: VideoNSA kinds: size of `text_rows` (fixed shapes for jit); default: a
                bucket of the text row count for inputs with images/videos, None without.
        """
        cfg = self.config
        ids = np.asarray(input_ids).astype(np.int32)
        if ids.ndim == 1:
            ids = ids[None]
            attention_mask = None if attention_mask is None else np.asarray(attention_mask)[None]
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        mask = mask.astype(np.int32)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask {mask.shape} does not match input_ids {ids.shape}")
        grids = {
            "image": _as_grid(image_grid_thw, pixel_values, "image"),
            "video": _as_grid(video_grid_thw, pixel_values_videos, "video"),
        }
        positions, deltas = rope.get_rope_index(
            ids,
            mask,
            grids["image"],
            grids["video"],
            None if second_per_grid_ts is None else np.asarray(second_per_grid_ts, np.float64),
            config=cfg,
        )
        inputs = ModelInputs(
            input_ids=ids,
            attention_mask=mask,
            positions=np.asarray(positions, np.int32),
            rope_deltas=np.asarray(deltas, np.int32).reshape(-1),
        )
        has_vision = any(grid is not None for grid in grids.values())
        if cfg.attention.kind != "dense" and (has_vision or num_text_rows is not None):
            rows = videonsa.text_rows(cfg, ids, mask, inputs.positions, num_text_rows)
            inputs = inputs._replace(text_rows=rows)
        pixels = {"image": pixel_values, "video": pixel_values_videos}
        used = [(kind, grid, pixels[kind]) for kind, grid in grids.items() if grid is not None]
        if not used:
            return inputs

        merge = cfg.vision.spatial_merge_size**2
        targets = []
        for kind, grid, _ in used:
            token_id = cfg.image_token_id if kind == "image" else cfg.video_token_id
            flat = np.flatnonzero(ids.reshape(-1) == token_id)
            n_features = int(grid.prod(-1).sum()) // merge
            if flat.size != n_features:
                raise ValueError(
                    f"{kind} features and {kind} tokens do not match: {flat.size} tokens, "
                    f"{n_features} features from grid_thw {grid.tolist()}"
                )
            targets.append(flat)
        rows = np.concatenate([np.asarray(p, np.float32) for _, _, p in used], axis=0)
        rows = rows.astype(self.dtype)
        grid_thw = np.concatenate([g for _, g, _ in used], axis=0)
        n = rows.shape[0] if num_patches is None else num_patches
        if n < rows.shape[0]:
            raise ValueError(f"num_patches={num_patches} < {rows.shape[0]} patch rows")
        rows = np.pad(rows, ((0, n - rows.shape[0]), (0, 0)))
        targets = np.concatenate(targets).astype(np.int32)
        targets = np.pad(targets, (0, n // merge - targets.size), constant_values=ids.size)
        layout = vision.prepare_vision_layout(
            grid_thw,
            cfg.vision,
            num_patches=num_patches,
            num_windows=num_windows,
            num_slices=num_slices,
            slice_len=slice_len,
        )
        return inputs._replace(pixel_rows=rows, vision_layout=layout, vision_targets=targets)

    # -- device side -----------------------------------------------------------------------------

    def embed(self, inputs: ModelInputs) -> jax.Array:
        """Token embeddings with the vision features scattered into the pad rows: [B, L, hidden]."""
        embeds = self.text.embed(inputs.input_ids)
        if inputs.pixel_rows is None:
            return embeds
        b, length, hidden = embeds.shape
        features = self.visual(inputs.pixel_rows.astype(self.dtype), inputs.vision_layout)
        flat = embeds.reshape(b * length, hidden)
        flat = flat.at[inputs.vision_targets].set(features.astype(flat.dtype), mode="drop")
        return flat.reshape(b, length, hidden)

    def vision_mask(self, input_ids: jax.Array) -> jax.Array:
        """[B, L] bool: image/video pad rows."""
        return (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)

    def hidden_states(
        self, inputs: ModelInputs, cache: KVCache | None = None
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-normed decoder output [B, L, hidden] (and the advanced cache when given)."""
        return self.text(
            self.embed(inputs),
            jnp.asarray(inputs.positions),
            attention_mask=jnp.asarray(inputs.attention_mask),
            vision_mask=self.vision_mask(jnp.asarray(inputs.input_ids)),
            text_rows=None if inputs.text_rows is None else jnp.asarray(inputs.text_rows),
            cache=cache,
        )

    def attention_internals(self, inputs: ModelInputs) -> dict[str, jax.Array]:
        """Per-layer q/k/v, gates and selected blocks of a VideoNSA prefill (`videonsa.py`)."""
        return videonsa.attention_internals(self, inputs)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[..., hidden] -> [..., vocab] through the lm head (the embedding when tied)."""
        if self.lm_head is not None:
            return self.lm_head(hidden)
        table = self.text.embed_tokens[...].astype(self.dtype)
        return jnp.dot(hidden.astype(self.dtype), table.T)

    def forward(self, inputs: ModelInputs) -> jax.Array:
        """Jittable forward: ModelInputs -> logits [B, L, vocab]."""
        return self.logits(self.hidden_states(inputs)[0])

    def forward_cached(self, inputs: ModelInputs, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Prefill or decode step with a KV cache: (logits [B, T, vocab], advanced cache).

        Prefill passes the prompt's `prepare_inputs`; a decode step passes `decode_inputs`.
        """
        hidden, cache = self.hidden_states(inputs, cache)
        return self.logits(hidden), cache

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
        """An empty KV cache for `max_len` tokens (prompt + generated)."""
        return KVCache.init(self.config, batch_size, max_len, dtype or self.dtype)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        second_per_grid_ts=None,
    ) -> jax.Array:
        """The public contract: logits [B, L, vocab] for HF-style inputs."""
        inputs = self.prepare_inputs(
            input_ids,
            attention_mask,
            pixel_values,
            image_grid_thw,
            pixel_values_videos,
            video_grid_thw,
            second_per_grid_ts,
        )
        graphdef, state = nnx.split(self)
        return _jit_forward(graphdef, state, inputs)


def decode_inputs(token_ids: jax.Array, cache: KVCache, rope_deltas: jax.Array) -> ModelInputs:
    """ModelInputs for a decode step of text tokens (jittable).

    A generated token's M-RoPE position is (real tokens before it) + rope_delta on all 3 axes, so
    left padding of the prompt does not shift it.

    Args:
        token_ids: [B, T] new tokens (T = 1 for one step).
        cache: the cache before the step.
        rope_deltas: [B] from the prompt's `prepare_inputs`.
    """
    b, t = token_ids.shape
    seen = jnp.sum(cache.valid, axis=-1, dtype=jnp.int32)
    pos = seen[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :] + rope_deltas[:, None]
    return ModelInputs(
        input_ids=token_ids,
        attention_mask=jnp.ones((b, t), jnp.int32),
        positions=jnp.broadcast_to(pos[None], (3, b, t)).astype(jnp.int32),
        rope_deltas=rope_deltas,
    )


def _as_grid(grid_thw, pixels, kind: str) -> np.ndarray | None:
    if grid_thw is None:
        if pixels is not None:
            raise ValueError(f"{kind} pixels given without their grid_thw")
        return None
    if pixels is None:
        raise ValueError(f"{kind} grid_thw given without pixel values")
    return np.asarray(grid_thw, np.int64).reshape(-1, 3)


def _forward(graphdef, state, inputs: ModelInputs) -> jax.Array:
    return nnx.merge(graphdef, state).forward(inputs)


_jit_forward = jax.jit(_forward, static_argnums=0)
