"""Qwen2.5-VL preprocessing: frames -> (pixel rows, grid, seconds per temporal patch)."""

import numpy as np

from videonsa_jax.processing import patchify as patchify_lib
from videonsa_jax.processing import resize as resize_lib
from videonsa_jax.processing.video import VideoMetadata

DEFAULT_PROCESSOR_FPS = 2.0  # HF processor default fps when none is passed.


def video_frame_size(
    num_frames: int,
    height: int,
    width: int,
    *,
    min_pixels: int,
    max_pixels: int,
    total_pixels: int | None = None,
) -> tuple[int, int]:
    """Resized (h, w) of each frame of a `num_frames`-frame video of size height x width."""
    frame_max = resize_lib.video_frame_max_pixels(
        num_frames, min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels
    )
    return resize_lib.smart_resize(height, width, min_pixels=min_pixels, max_pixels=frame_max)


def video_grid_thw(
    num_frames: int,
    height: int,
    width: int,
    *,
    min_pixels: int,
    max_pixels: int,
    total_pixels: int | None = None,
) -> tuple[int, int, int]:
    """Patch grid (gt, gh, gw) that `preprocess_video` produces, without any decoding.

    The LLM sees gt * gh * gw / 4 tokens for it.
    """
    h, w = video_frame_size(
        num_frames,
        height,
        width,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        total_pixels=total_pixels,
    )
    gt = -(-num_frames // resize_lib.TEMPORAL_PATCH_SIZE)
    return gt, h // resize_lib.PATCH_SIZE, w // resize_lib.PATCH_SIZE


def preprocess_video(
    frames: np.ndarray,
    metadata: VideoMetadata | None = None,
    *,
    min_pixels: int = resize_lib.VIDEO_MIN_PIXELS,
    max_pixels: int = resize_lib.VIDEO_MAX_PIXELS,
    total_pixels: int | None = None,
    processor_fps: float | None = None,
) -> dict[str, np.ndarray]:
    """Resizes, normalises and flattens one video.

    Args:
      frames: uint8 [T, H, W, 3] sampled frames.
      metadata: from `load_video`; supplies the sampled fps.
      min_pixels, max_pixels: per-frame pixel bounds for smart_resize.
      total_pixels: optional budget for the whole video, split over the frames as
        qwen-vl-utils does (see `resize.video_frame_max_pixels`).
      processor_fps: the fps the HF processor is told; second_per_grid_ts = 2 / it.
        None -> the actual sampled fps (qwen-vl-utils' recommendation), or 2.0 without
        metadata. VideoNSA's evaluation never passes one (so 2.0 -> 1.0 s); ms-swift
        training passes the requested fps.

    Returns:
      pixel_values_videos float32 [gt*gh*gw, 1176], video_grid_thw int64 [1, 3],
      second_per_grid_ts float32 [1].
    """
    t, height, width = frames.shape[:3]
    if t == 0:
        raise ValueError("video has no frames")
    h, w = video_frame_size(
        t, height, width, min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels
    )
    pixels = patchify_lib.normalize(resize_lib.resize_frames(frames, h, w))
    rows, grid = patchify_lib.patchify(pixels)
    if processor_fps is None:
        processor_fps = metadata.sampled_fps if metadata is not None else DEFAULT_PROCESSOR_FPS
    return {
        "pixel_values_videos": rows,
        "video_grid_thw": np.array([grid], np.int64),
        "second_per_grid_ts": np.array(
            [resize_lib.TEMPORAL_PATCH_SIZE / processor_fps], np.float32
        ),
    }


def preprocess_image(
    image: np.ndarray,
    *,
    min_pixels: int = resize_lib.IMAGE_MIN_PIXELS,
    max_pixels: int = resize_lib.IMAGE_MAX_PIXELS,
) -> dict[str, np.ndarray]:
    """uint8 [H, W, 3] -> pixel_values float32 [gh*gw, 1176], image_grid_thw [1, 3] (t = 1).

    The image is tiled to the two frames of one temporal patch.
    """
    h, w = resize_lib.smart_resize(
        image.shape[0], image.shape[1], min_pixels=min_pixels, max_pixels=max_pixels
    )
    pixels = patchify_lib.normalize(resize_lib.resize_frames(image[None], h, w))
    rows, grid = patchify_lib.patchify(np.repeat(pixels, resize_lib.TEMPORAL_PATCH_SIZE, 0))
    return {"pixel_values": rows, "image_grid_thw": np.array([grid], np.int64)}
