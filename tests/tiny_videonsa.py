"""Test helper: a tiny random checkpoint with the synthetic tokenizer, and a tiny video."""

from __future__ import annotations

import functools
import os
import tempfile

import numpy as np
from flax import nnx

from videonsa_jax.checkpoints import save_pretrained
from videonsa_jax.config import ModelConfig, TextConfig, VisionConfig
from videonsa_jax.data import synthetic
from videonsa_jax.model.qwen2_5_vl import Qwen2_5_VL


def tiny_config(**overrides) -> ModelConfig:
    """2-layer 64-d decoder (4 / 2 heads), 2-block ViT; token ids of the synthetic tokenizer."""
    config = ModelConfig(
        vision=VisionConfig(
            depth=2,
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            out_hidden_size=64,
            fullatt_block_indexes=(1,),
        ),
        text=TextConfig(
            vocab_size=synthetic.SYNTHETIC_VOCAB_SIZE,
            hidden_size=64,
            intermediate_size=96,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            mrope_section=(2, 3, 3),
            max_position_embeddings=2048,
        ),
        image_token_id=12,
        video_token_id=13,
        vision_start_token_id=9,
        vision_end_token_id=10,
        bos_token_id=None,
        eos_token_id=(2, 0),
        pad_token_id=0,
    )
    return config.replace(**overrides) if overrides else config


def write_tiny_checkpoint(path: str, seed: int = 0, **overrides) -> str:
    """Random tiny model (save_pretrained) + synthetic tokenizer.json in `path`."""
    model = Qwen2_5_VL(tiny_config(**overrides), rngs=nnx.Rngs(seed))
    save_pretrained(model, path)
    synthetic.write_synthetic_tokenizer(path)
    return path


@functools.cache
def shared_checkpoint() -> str:
    """One tiny checkpoint per test session (read-only for the tests that use it)."""
    return write_tiny_checkpoint(os.path.join(tempfile.mkdtemp(prefix="tiny_videonsa_"), "ckpt"))


def write_tiny_video(path: str, num_frames: int = 8, size: int = 56, fps: float = 4.0) -> str:
    """A moving-square clip (H.264) of `num_frames` frames of size x size."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 60, (num_frames, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        y = x = 4 + 4 * t
        frames[t, y : y + 12, x : x + 12] = (220, 40, 40)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    synthetic.write_mp4(path, frames, fps)
    return path
