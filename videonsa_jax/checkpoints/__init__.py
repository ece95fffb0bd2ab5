"""Checkpoint I/O: HF safetensors <-> `Qwen2_5_VL`."""

from videonsa_jax.checkpoints.hf import CheckpointError, from_pretrained, save_pretrained

__all__ = ["CheckpointError", "from_pretrained", "save_pretrained"]
