"""Test helper: tiny random transformers Qwen2.5-VL checkpoints (fp32, CPU) and prompt builders."""

from __future__ import annotations

import numpy as np
import torch
import transformers

VOCAB = 300
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 290, 291, 292, 293
PATCH_DIM = 3 * 2 * 14 * 14


def tiny_config(*, tie: bool = False, num_layers: int = 2, **text) -> transformers.Qwen2_5_VLConfig:
    """Tiny Qwen2.5-VL: 64-d decoder with 4/2 heads, 4-block 32-d ViT (blocks 1, 3 full)."""
    text_config = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        tie_word_embeddings=tie,
        bos_token_id=None,
        eos_token_id=289,
        pad_token_id=0,
    )
    text_config.update(text)
    vision_config = dict(
        depth=4,
        hidden_size=32,
        intermediate_size=48,
        num_heads=2,
        out_hidden_size=64,
        patch_size=14,
        temporal_patch_size=2,
        spatial_merge_size=2,
        window_size=112,
        fullatt_block_indexes=[1, 3],
        tokens_per_second=2,
    )
    return transformers.Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=IMAGE_PAD,
        video_token_id=VIDEO_PAD,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=tie,
    )


def tiny_model(config: transformers.Qwen2_5_VLConfig, seed: int = 0):
    """A fp32 eager-attention model whose every parameter is random (norm weights near 1)."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.08 * noise)
    return model


def save_tiny(path, *, tie: bool = False, seed: int = 0, **text):
    """Writes a tiny random checkpoint with `save_pretrained` (Hub layout); returns the model."""
    model = tiny_model(tiny_config(tie=tie, **text), seed)
    model.save_pretrained(path)
    return model


def token_types(input_ids: np.ndarray) -> np.ndarray:
    """mm_token_type_ids: 0 text, 1 image, 2 video."""
    return np.where(input_ids == IMAGE_PAD, 1, np.where(input_ids == VIDEO_PAD, 2, 0))


def vision_span(grid_thw, pad_id: int) -> list[int]:
    """<|vision_start|> + t*(h/2)*(w/2) pad tokens + <|vision_end|>."""
    t, h, w = grid_thw
    return [VISION_START] + [pad_id] * (t * h * w // 4) + [VISION_END]


def random_text(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(1, VISION_START - 2, size=n).tolist()


def random_pixels(rng: np.random.Generator, grids) -> np.ndarray:
    n = sum(int(np.prod(g)) for g in grids)
    return rng.standard_normal((n, PATCH_DIM)).astype(np.float32)


def torch_logits(model, input_ids, attention_mask=None, **vision) -> np.ndarray:
    """HF logits [B, L, vocab] (numpy, fp32) for numpy inputs."""
    ids = np.asarray(input_ids)
    kwargs = {"input_ids": torch.from_numpy(ids).long()}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.from_numpy(np.asarray(attention_mask)).long()
    if vision:
        kwargs["mm_token_type_ids"] = torch.from_numpy(token_types(ids)).int()
    for key, value in vision.items():
        if value is not None:
            value = torch.from_numpy(np.asarray(value))
            kwargs[key] = value.long() if key.endswith("grid_thw") else value.float()
    with torch.no_grad():
        return model(**kwargs).logits.float().numpy()
