"""Ask a question about a video and stream the answer.

    python -m videonsa_jax.infer --model DIR --video FILE --question "What happens?" \
        [--fps 2 --max_frames 64 --max_pixels 200704 --block_count 32 --window_size 256]

The prompt is the Qwen2.5-VL chat format with the video first and the question right after it
(VideoNSA's evaluation layout). Decoding settings come from the checkpoint's generation_config.json
(see `generate.GenerationConfig.from_pretrained`); `--max_new_tokens` overrides the length.
Errors that a user can fix (a missing model directory, an unreadable video, a prompt longer than
the model's context) are reported in one line with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from videonsa_jax import processing
from videonsa_jax.generate import (
    ContextLengthError,
    GenerationConfig,
    TextStreamer,
    generate,
    pad_prompts,
)
from videonsa_jax.model.qwen2_5_vl import ModelInputs, Qwen2_5_VL
from videonsa_jax.processing import resize

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


class ModelNotFoundError(FileNotFoundError):
    """The model directory is missing or is not a checkpoint (no config.json / tokenizer.json)."""


def load(
    model_dir: str, *, attention: str | None = None, dtype=jnp.bfloat16, **overrides: Any
) -> tuple[Qwen2_5_VL, processing.Tokenizer, GenerationConfig]:
    """Loads the model, its tokenizer and its generation settings from a checkpoint directory.

    Args:
        model_dir: HF-format directory (config.json, *.safetensors, tokenizer.json).
        attention: "dense" | "videonsa" | "videonsa_release"; default: as the checkpoint says.
        dtype: activation and parameter dtype.
        **overrides: `ModelConfig.replace` overrides, e.g. block_count=16, window_size=128.
    """
    from videonsa_jax.checkpoints import from_pretrained

    for name in ("config.json", "tokenizer.json"):
        if not os.path.isfile(os.path.join(model_dir, name)):
            what = "does not exist" if not os.path.isdir(model_dir) else f"has no {name}"
            raise ModelNotFoundError(f"model directory {model_dir!r} {what}")
    model = from_pretrained(model_dir, dtype=dtype, attention=attention, **overrides)
    tokenizer = processing.load_tokenizer(model_dir)
    return model, tokenizer, GenerationConfig.from_pretrained(model_dir)


@dataclasses.dataclass(frozen=True)
class EncodedVideoQuestion:
    """A tokenized video question (host arrays), before batching into model inputs."""

    ids: np.ndarray  # int32 [L]
    vision: dict[str, np.ndarray]  # pixel_values_videos, video_grid_thw, second_per_grid_ts
    frames: np.ndarray  # uint8 [T, H, W, 3] as sampled (before resizing)
    timestamps: np.ndarray  # seconds

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        return tuple(int(x) for x in self.vision["video_grid_thw"][0])


def encode_video_question(
    tokenizer: processing.Tokenizer,
    video: str,
    question: str,
    *,
    fps: float = 2.0,
    max_frames: int | None = None,
    min_pixels: int = resize.VIDEO_MIN_PIXELS,
    max_pixels: int = resize.VIDEO_MAX_PIXELS,
    processor_fps: float | None = None,
    system_prompt: str = processing.DEFAULT_SYSTEM_PROMPT,
) -> EncodedVideoQuestion:
    """Decodes and samples `video`, and tokenizes "<video>{question}" as a user turn.

    Args:
        fps, max_frames: frame sampling (qwen-vl-utils rules).
        min_pixels, max_pixels: per-frame pixel bounds for the resize.
        processor_fps: the fps whose temporal step enters M-RoPE (second_per_grid_ts = 2 / it);
            default: the sampled fps. VideoNSA's evaluation uses 2.0.

    Raises:
        processing.VideoDecodeError: the video is missing or cannot be decoded.
    """
    frames, meta = processing.load_video(video, fps=fps, max_frames=max_frames)
    vision = processing.preprocess_video(
        frames, meta, min_pixels=min_pixels, max_pixels=max_pixels, processor_fps=processor_fps
    )
    ids, _ = processing.build_conversation(
        tokenizer,
        [{"role": "user", "content": processing.chat.VIDEO_PLACEHOLDER + question}],
        video_grid_thw=vision["video_grid_thw"],
        add_generation_prompt=True,
        system_prompt=system_prompt,
    )
    return EncodedVideoQuestion(ids, vision, frames, meta.timestamps)


def batch_inputs(
    model: Qwen2_5_VL,
    questions: Sequence[EncodedVideoQuestion],
    pad_token_id: int,
    multiple: int = 1,
) -> ModelInputs:
    """Right-padded model inputs of a batch (prompt length rounded up to `multiple`)."""
    ids, mask = pad_prompts([q.ids for q in questions], pad_token_id, multiple)
    return model.prepare_inputs(
        ids,
        mask,
        **{
            key: np.concatenate([q.vision[key] for q in questions])
            for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
        },
    )


def answer(
    model: Qwen2_5_VL,
    tokenizer: processing.Tokenizer,
    question: EncodedVideoQuestion,
    config: GenerationConfig,
    write: Callable[[str], Any] | None = None,
) -> str:
    """Generates the answer to one question; `write` receives it piece by piece as it comes."""
    streamer = None if write is None else TextStreamer(tokenizer, config.eos_token_ids, write)
    inputs = batch_inputs(model, [question], config.pad_token_id)
    return generate(model, inputs, config, on_token=streamer).texts(tokenizer)[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m videonsa_jax.infer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="checkpoint directory (HF format)")
    parser.add_argument("--video", required=True, help="video file")
    parser.add_argument("--question", required=True)
    parser.add_argument("--fps", type=float, default=2.0, help="frames sampled per second")
    parser.add_argument("--max_frames", type=int, default=None, help="cap on sampled frames")
    parser.add_argument("--min_pixels", type=int, default=resize.VIDEO_MIN_PIXELS)
    parser.add_argument(
        "--max_pixels",
        type=int,
        default=resize.VIDEO_MAX_PIXELS,
        help="pixels per frame after resizing",
    )
    parser.add_argument(
        "--attention",
        choices=["dense", "videonsa", "videonsa_release"],
        help="attention kind (default: as the checkpoint says)",
    )
    parser.add_argument("--block_count", type=int, help="NSA selected blocks per query")
    parser.add_argument("--window_size", type=int, help="NSA sliding window")
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    args = parser.parse_args(argv)

    overrides = {
        k: getattr(args, k) for k in ("block_count", "window_size") if getattr(args, k) is not None
    }
    try:
        model, tokenizer, config = load(
            args.model, attention=args.attention, dtype=DTYPES[args.dtype], **overrides
        )
        question = encode_video_question(
            tokenizer,
            args.video,
            args.question,
            fps=args.fps,
            max_frames=args.max_frames,
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
        )
        config = config.replace(max_new_tokens=args.max_new_tokens)
        print(
            f"[{len(question.frames)} frames, grid {question.grid_thw}, {question.ids.size} "
            "prompt tokens]",
            file=sys.stderr,
        )

        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        answer(model, tokenizer, question, config, write)
        sys.stdout.write("\n")
    except ModelNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except processing.VideoDecodeError as e:
        print(f"error: cannot read the video: {e}", file=sys.stderr)
        return 2
    except ContextLengthError as e:
        print(f"error: prompt too long: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
