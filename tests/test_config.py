"""ModelConfig from config.json (transformers 4.x and 5.x layouts) and the released model shapes."""

import dataclasses

import hf_tiny as H
import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from videonsa_jax.config import ModelConfig
from videonsa_jax.model.qwen2_5_vl import Qwen2_5_VL

# (hidden, layers, heads, kv heads, intermediate, vocab, tied, vision intermediate): spec §1-2.
SIZES = {
    "3B": (2048, 36, 16, 2, 11008, 151936, True, 3420),
    "7B": (3584, 28, 28, 4, 18944, 152064, False, 3420),
    "32B": (5120, 64, 40, 8, 27648, 152064, False, 3456),
    "72B": (8192, 80, 64, 8, 29568, 152064, False, 3456),
}


def released_config(size: str) -> dict:
    """config.json of a released Qwen2.5-VL checkpoint (transformers 4.x layout)."""
    hidden, layers, heads, kv_heads, inter, vocab, tied, vision_inter = SIZES[size]
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": inter,
        "max_position_embeddings": 128000,
        "max_window_layers": layers,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": 32,
            "hidden_act": "silu",
            "hidden_size": 1280,
            "intermediate_size": vision_inter,
            "num_heads": 16,
            "in_chans": 3,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": vocab,
    }


def test_tiny_layouts_parse_equal():
    """The 5.x dict transformers writes and a hand-written 4.x dict give the same config."""
    hf = H.tiny_config(tie=True)
    new = ModelConfig.from_hf_dict(hf.to_dict())
    text = hf.to_dict()["text_config"]
    old = {k: v for k, v in text.items() if k not in ("rope_parameters", "model_type")}
    old |= {
        "rope_theta": text["rope_parameters"]["rope_theta"],
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "vision_config": hf.to_dict()["vision_config"],
        "image_token_id": H.IMAGE_PAD,
        "video_token_id": H.VIDEO_PAD,
        "vision_start_token_id": H.VISION_START,
        "vision_end_token_id": H.VISION_END,
    }
    assert ModelConfig.from_hf_dict(old) == new
    assert new.text.tie_word_embeddings and new.text.mrope_section == (2, 3, 3)
    assert new.text.num_kv_heads == 2 and new.vision.fullatt_block_indexes == (1, 3)
    assert ModelConfig.from_hf_dict(new.to_hf_dict()) == new


@pytest.mark.parametrize("size", SIZES)
def test_released_shapes(size):
    """4.x and 5.x layouts parse equal; the abstract model has transformers' parameter count."""
    old = released_config(size)
    hf_config = transformers.Qwen2_5_VLConfig(**old)
    config = ModelConfig.from_hf_dict(old)
    assert ModelConfig.from_hf_dict(hf_config.to_dict()) == config
    hidden, layers, heads, kv_heads, inter, vocab, tied, vision_inter = SIZES[size]
    assert (config.text.hidden_size, config.text.num_layers) == (hidden, layers)
    assert (config.text.num_heads, config.text.num_kv_heads) == (heads, kv_heads)
    assert config.text.tie_word_embeddings == tied
    assert config.vision.intermediate_size == vision_inter
    assert config.text.rope_theta == 1e6 and config.text.mrope_section == (16, 24, 24)

    model = nnx.eval_shape(lambda: Qwen2_5_VL(config, rngs=nnx.Rngs(0)))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    with torch.device("meta"):
        reference = transformers.Qwen2_5_VLForConditionalGeneration(hf_config)
    assert ours == sum(p.numel() for p in reference.parameters())


def test_overrides():
    config = ModelConfig.from_hf_dict(released_config("7B"), attention="videonsa", block_count=64)
    assert config.attention.kind == "videonsa" and config.attention.block_count == 64
    assert config.replace(remat="full").remat == "full"
    attention = dataclasses.replace(config.attention, window_size=32)
    assert config.replace(attention=attention).attention == attention
    with pytest.raises(ValueError, match="Unknown config override"):
        config.replace(blocks=3)
    with pytest.raises(ValueError, match="Unknown config override 'text'"):
        config.replace(text=attention)  # a sub-config of the wrong type
