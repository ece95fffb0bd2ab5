"""Qwen2.5-VL resolution rules (smart_resize, per-frame video budget) and the resize.

The resize is PIL's bicubic filter (a = -0.5, antialiased when downscaling) on uint8,
which is what qwen-vl-utils and HF's image processors use for images. For videos the
reference pipeline resizes with torch's antialiased bicubic in float and rounds back to
uint8. Both are the same a = -0.5 antialiased bicubic; PIL rounds and clips to uint8
between its two passes. Measured: identical on smooth gradients, <= 1 grey level on the
synthetic task frames (mean 0.1), up to 24 levels on a few pixels of white noise where
the overshoot is clipped (mean 0.2); see benchmarks/RESULTS.md.
"""

import math

import numpy as np
from PIL import Image

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: every side is a multiple of this.
MAX_ASPECT_RATIO = 200

# qwen-vl-utils defaults (pixels).
IMAGE_MIN_PIXELS = 4 * 28 * 28
IMAGE_MAX_PIXELS = 16384 * 28 * 28
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)


def smart_resize(
    height: int, width: int, *, factor: int = FACTOR, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Returns (h, w), multiples of `factor`, close to the input aspect ratio.

    Rounds each side to the nearest multiple (Python's round-half-to-even, floored at
    `factor`); if the area exceeds `max_pixels` scales both sides down by the same ratio and
    floors, elif it is below `min_pixels` scales up and ceils. The if/elif order matters
    when min_pixels > max_pixels. This is the qwen-vl-utils form; HF's processor differs
    only in omitting the `factor` floor of the first rounding (tiny inputs only).

    Raises:
      ValueError: aspect ratio above 200 or a non-positive side.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image side must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"aspect ratio {max(height, width) / min(height, width):.1f} "
            f"> {MAX_ASPECT_RATIO} ({height}x{width})"
        )
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def video_frame_max_pixels(
    num_frames: int, *, min_pixels: int, max_pixels: int, total_pixels: int | None
) -> int:
    """Per-frame pixel cap of a video of `num_frames` sampled frames (qwen-vl-utils).

    Without `total_pixels` this is `max_pixels`. With it, each temporal pair of frames
    gets an even share of the total budget, floored at 1.05 * min_pixels and never above
    `max_pixels` nor VIDEO_MAX_PIXELS:
      min(max_pixels, max(min(VIDEO_MAX_PIXELS, total_pixels / num_frames * 2),
                          int(1.05 * min_pixels))).
    """
    if total_pixels is None:
        return max_pixels
    share = total_pixels / max(num_frames, 1) * TEMPORAL_PATCH_SIZE
    budget = max(min(VIDEO_MAX_PIXELS, share), int(min_pixels * 1.05))
    return int(min(max_pixels, budget))


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic (antialiased) resize of uint8 frames [T, H, W, 3] -> [T, height, width, 3]."""
    if frames.shape[1:3] == (height, width):
        return frames
    out = np.empty((frames.shape[0], height, width, 3), np.uint8)
    for i, frame in enumerate(frames):
        img = Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC)
        out[i] = np.asarray(img)
    return out
