"""Decode + Qwen2.5-VL preprocessing throughput on this machine (CPU).

  python benchmarks/data_throughput.py [--repeats 3]

For each case writes one H.264 clip (moving shapes on a gradient), then times
  decode:     load_video (PyAV, forward decode, frame-exact sampling),
  preprocess: preprocess_video (resize + normalise + patchify),
  record:     pipeline.process_record (probe + decode + preprocess + tokenise),
and prints a markdown table of sampled frames/s and LLM vision tokens/s (best of N).
"""

import argparse
import functools
import os
import platform
import tempfile
import time

import numpy as np

from videonsa_jax.data import pipeline, synthetic
from videonsa_jax.processing import chat
from videonsa_jax.processing import preprocess as preprocess_lib
from videonsa_jax.processing import video as video_lib

# name, (height, width), source frames, source fps, sample fps, min_pixels, max_pixels
CASES = [
    ("synthetic 56px", (56, 56), 128, 2.0, 2.0, 56 * 56, 56 * 56),
    ("448x448 -> 224x224", (448, 448), 128, 4.0, 4.0, 128 * 28 * 28, 64 * 28 * 28),
    ("720p -> 50176 px/frame", (720, 1280), 96, 24.0, 4.0, 32 * 28 * 28, 64 * 28 * 28),
    ("720p -> 602112 px/frame", (720, 1280), 48, 24.0, 2.0, 128 * 28 * 28, 768 * 28 * 28),
]


def _clip(height: int, width: int, num_frames: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (height + width)], -1)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    r = min(height, width) // 6
    for t in range(num_frames):
        frame = base + rng.integers(0, 8, (height, width, 1))
        cy, cx = (
            height // 2 + int(height / 3 * np.sin(t / 7)),
            width // 2 + int(width / 3 * np.cos(t / 5)),
        )
        frame[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = (230, 40, 40)
        frames[t] = np.clip(frame, 0, 255)
    return frames


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}"
    )
    print(
        "| case | sampled frames | grid (t,h,w) | tokens | decode frames/s | preprocess frames/s "
        "| record frames/s | record tokens/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        synthetic.write_synthetic_tokenizer(tmp)
        tok = chat.load_tokenizer(tmp)
        for name, (h, w), n, src_fps, fps, lo, hi in CASES:
            path = os.path.join(tmp, "clip.mp4")
            synthetic.write_mp4(path, _clip(h, w, n), src_fps)
            t_dec, (frames, meta) = _best(
                functools.partial(video_lib.load_video, path, fps=fps), args.repeats
            )
            t_pre, out = _best(
                functools.partial(
                    preprocess_lib.preprocess_video, frames, meta, min_pixels=lo, max_pixels=hi
                ),
                args.repeats,
            )
            cfg = pipeline.DataConfig(max_length=10**6, fps=fps, min_pixels=lo, max_pixels=hi)
            record = {
                "video": path,
                "conversations": [
                    {"from": "human", "value": "<video>\nDescribe the video."},
                    {"from": "gpt", "value": "A red disc moves."},
                ],
            }
            t_rec, _ = _best(
                functools.partial(pipeline.process_record, record, tok, cfg), args.repeats
            )
            grid = tuple(int(v) for v in out["video_grid_thw"][0])
            tokens = chat.num_vision_tokens(grid)
            t = len(frames)
            print(
                f"| {name} | {t} | {grid} | {tokens} | {t / t_dec:.0f} | {t / t_pre:.0f} "
                f"| {t / t_rec:.0f} | {tokens / t_rec:.0f} |"
            )


if __name__ == "__main__":
    main()
