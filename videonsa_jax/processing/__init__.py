"""Video/image decoding, Qwen2.5-VL preprocessing, tokenizer and chat template."""

from videonsa_jax.processing.chat import DEFAULT_SYSTEM_PROMPT
from videonsa_jax.processing.chat import SpecialTokens
from videonsa_jax.processing.chat import Tokenizer
from videonsa_jax.processing.chat import build_conversation
from videonsa_jax.processing.chat import from_llava
from videonsa_jax.processing.chat import load_tokenizer
from videonsa_jax.processing.chat import num_vision_tokens
from videonsa_jax.processing.errors import VideoDecodeError
from videonsa_jax.processing.preprocess import preprocess_image
from videonsa_jax.processing.preprocess import preprocess_video
from videonsa_jax.processing.preprocess import video_grid_thw
from videonsa_jax.processing.resize import smart_resize
from videonsa_jax.processing.video import VideoInfo
from videonsa_jax.processing.video import VideoMetadata
from videonsa_jax.processing.video import load_image
from videonsa_jax.processing.video import load_video
from videonsa_jax.processing.video import probe_video
