"""Video/image decoding, Qwen2.5-VL preprocessing, tokenizer and chat template."""

from videonsa_jax.processing.chat import (
    DEFAULT_SYSTEM_PROMPT,
    SpecialTokens,
    Tokenizer,
    build_conversation,
    from_llava,
    load_tokenizer,
    num_vision_tokens,
)
from videonsa_jax.processing.errors import VideoDecodeError
from videonsa_jax.processing.preprocess import preprocess_image, preprocess_video, video_grid_thw
from videonsa_jax.processing.resize import smart_resize
from videonsa_jax.processing.video import (
    VideoInfo,
    VideoMetadata,
    load_image,
    load_video,
    probe_video,
)

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "SpecialTokens",
    "Tokenizer",
    "VideoDecodeError",
    "VideoInfo",
    "VideoMetadata",
    "build_conversation",
    "from_llava",
    "load_image",
    "load_tokenizer",
    "load_video",
    "num_vision_tokens",
    "preprocess_image",
    "preprocess_video",
    "probe_video",
    "smart_resize",
    "video_grid_thw",
]
