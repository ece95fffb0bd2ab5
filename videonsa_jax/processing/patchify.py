"""Pixel normalisation and Qwen2.5-VL patch flattening.

Row order (identical to HF's Qwen2-VL processors): for a clip F[T, H, W, C] with
gt = T/2, gh = H/14, gw = W/14, row r and column c hold

  r = ((((t * gh/2) + bh) * gw/2 + bw) * 2 + mh) * 2 + mw
  c = ((ch * 2 + tp) * 14 + py) * 14 + px
  value = F[2t + tp, (2bh + mh) * 14 + py, (2bw + mw) * 14 + px, ch]

i.e. rows are grouped by temporal pair, then by 2x2 merge window in row-major order,
and each row is one (channel, time, y, x) patch of 3 * 2 * 14 * 14 = 1176 values.
"""

import numpy as np

from videonsa_jax.processing import resize as resize_lib

# OpenAI CLIP statistics, used by every Qwen2-VL / Qwen2.5-VL processor.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
PATCH_DIM = 3 * resize_lib.TEMPORAL_PATCH_SIZE * resize_lib.PATCH_SIZE**2  # 1176


def normalize(frames: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 (x / 255 - mean) / std (CLIP statistics)."""
    x = frames.astype(np.float32) * np.float32(1 / 255)
    return (x - CLIP_MEAN) / CLIP_STD


def pad_temporal(frames: np.ndarray, multiple: int = resize_lib.TEMPORAL_PATCH_SIZE) -> np.ndarray:
    """Repeats the last frame until the frame count is a multiple of `multiple`."""
    pad = -frames.shape[0] % multiple
    if pad:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
    return frames


def patchify(frames: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Flattens normalised frames [T, H, W, 3] into rows [gt*gh*gw, 1176] in HF's order.

    T is padded to even by repeating the last frame; H and W must be multiples of 28.
    Returns the rows and the grid (gt, gh, gw) in patches.
    """
    p, m, tp = resize_lib.PATCH_SIZE, resize_lib.MERGE_SIZE, resize_lib.TEMPORAL_PATCH_SIZE
    frames = pad_temporal(frames, tp)
    t, h, w, c = frames.shape
    if h % (p * m) or w % (p * m):
        raise ValueError(f"frame size {h}x{w} is not a multiple of {p * m}")
    gt, gh, gw = t // tp, h // p, w // p
    x = frames.reshape(gt, tp, gh // m, m, p, gw // m, m, p, c)
    # (t, tp, bh, mh, py, bw, mw, px, c) -> (t, bh, bw, mh, mw, c, tp, py, px)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return np.ascontiguousarray(x).reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)
