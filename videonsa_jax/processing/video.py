"""Video and image decoding with frame-exact sampling (PyAV).

Sampling follows qwen-vl-utils: on the clip [start, end] of `total` frames,
  n = total / source_fps * fps, clamped to [ceil2(min_frames), floor2(max_frames)] and to
  total, then floored to an even count (the temporal patch);
  indices = round(linspace(first, last, n)) (round half to even).
Frames are found by decoding forward from the start of the stream and counting decoded
frames, never by seeking (a seek lands on the preceding keyframe, not on the frame).
"""

import dataclasses
import io
import math
import os

import av
import numpy as np
from PIL import Image

from videonsa_jax.processing import resize as resize_lib
from videonsa_jax.processing.errors import VideoDecodeError

DEFAULT_MAX_FRAMES = 768  # qwen-vl-utils FPS_MAX_FRAMES
FRAME_FACTOR = resize_lib.TEMPORAL_PATCH_SIZE

VideoSource = str | os.PathLike | bytes


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """Container-level facts, read without decoding."""

    total_frames: int  # frames in the whole stream
    fps: float  # source frame rate
    height: int
    width: int


@dataclasses.dataclass(frozen=True)
class VideoMetadata:
    """What `load_video` sampled."""

    source_fps: float
    total_frames: int  # frames in the requested [start, end] clip
    frame_indices: np.ndarray  # int64 [T], stream frame numbers of the returned frames
    timestamps: np.ndarray  # float64 [T], seconds (presentation time of each frame)
    sampled_fps: float  # T / total_frames * source_fps
    height: int
    width: int


def _name(src: VideoSource) -> str:
    return os.fspath(src) if isinstance(src, (str, os.PathLike)) else "<bytes>"


def _open(src: VideoSource) -> av.container.InputContainer:
    if isinstance(src, (bytes, bytearray)):
        if not src:
            raise VideoDecodeError(_name(src), "empty video bytes")
        src = io.BytesIO(src)
    else:
        path = os.fspath(src)
        if not os.path.exists(path):
            raise VideoDecodeError(path, "file not found")
        if os.path.getsize(path) == 0:
            raise VideoDecodeError(path, "empty file")
    try:
        return av.open(src)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoDecodeError(_name(src), f"cannot open: {e}") from e


def _count_packets(src: VideoSource) -> int:
    with _open(src) as container:
        stream = container.streams.video[0]
        return sum(1 for p in container.demux(stream) if p.size)


def probe_video(src: VideoSource) -> VideoInfo:
    """Reads frame count, fps and size from the container (no decoding).

    Raises:
      VideoDecodeError: unreadable file, no video stream, zero frames, unknown fps or an
        aspect ratio above 200.
    """
    name = _name(src)
    try:
        with _open(src) as container:
            if not container.streams.video:
                raise VideoDecodeError(name, "no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            height, width = stream.codec_context.height, stream.codec_context.width
            total = stream.frames
    except av.FFmpegError as e:
        raise VideoDecodeError(name, f"cannot read stream: {e}") from e
    if not total:  # Some containers (mkv, webm) do not store a frame count.
        total = _count_packets(src)
    if total <= 0:
        raise VideoDecodeError(name, "zero frames")
    if not rate or float(rate) <= 0:
        raise VideoDecodeError(name, "unknown frame rate")
    if height <= 0 or width <= 0:
        raise VideoDecodeError(name, f"bad frame size {height}x{width}")
    if max(height, width) / min(height, width) > resize_lib.MAX_ASPECT_RATIO:
        raise VideoDecodeError(
            name, f"aspect ratio above {resize_lib.MAX_ASPECT_RATIO} ({height}x{width})"
        )
    return VideoInfo(total_frames=int(total), fps=float(rate), height=height, width=width)


def clip_range(
    total_frames: int, fps: float, start: float | None, end: float | None
) -> tuple[int, int]:
    """First and last frame number of the clip [start, end] seconds (inclusive)."""
    first = math.ceil(start * fps) if start else 0
    last = math.floor(end * fps) if end is not None else total_frames - 1
    first, last = max(0, first), min(last, total_frames - 1)
    return first, last


def num_sampled_frames(
    total_frames: int,
    source_fps: float,
    *,
    fps: float,
    max_frames: int | None = None,
    min_frames: int = 4,
) -> int:
    """Number of frames sampled from a clip of `total_frames` frames (even, >= 2)."""
    lo = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
    cap = max_frames if max_frames is not None else min(DEFAULT_MAX_FRAMES, total_frames)
    hi = math.floor(cap / FRAME_FACTOR) * FRAME_FACTOR
    n = total_frames / source_fps * fps
    n = min(max(n, lo), hi, total_frames)
    return math.floor(n / FRAME_FACTOR) * FRAME_FACTOR


def sample_frame_indices(first: int, last: int, num_frames: int) -> np.ndarray:
    """round(linspace(first, last, num_frames)) as int64 [num_frames]."""
    return np.round(np.linspace(first, last, num_frames)).astype(np.int64)


def _decode(src: VideoSource, indices: np.ndarray) -> tuple[list[np.ndarray], list[float], int]:
    """Decodes forward; returns the frames at `indices`, their times, and frames decoded."""
    wanted = {}
    for k, idx in enumerate(indices):
        wanted.setdefault(int(idx), []).append(k)
    frames, times = [None] * len(indices), [0.0] * len(indices)
    last, count = int(indices.max()), 0
    with _open(src) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if count in wanted:
                rgb = frame.to_ndarray(format="rgb24")
                for k in wanted[count]:
                    frames[k], times[k] = rgb, float(frame.time or 0.0)
            count += 1
            if count > last:
                break
    return frames, times, count


def load_video(
    src: VideoSource,
    *,
    fps: float,
    max_frames: int | None = None,
    min_frames: int = 4,
    start: float | None = None,
    end: float | None = None,
) -> tuple[np.ndarray, VideoMetadata]:
    """Decodes a video and samples frames at `fps` (see module docstring).

    Args:
      src: a file path or the encoded bytes of a video file.
      fps: target sampling rate.
      max_frames: cap on the sampled frame count (default: min(768, clip frames)).
      min_frames: floor on the sampled frame count (rounded up to even).
      start, end: optional clip bounds in seconds.

    Returns:
      frames: uint8 [T, H, W, 3] RGB with T even; metadata: `VideoMetadata`.

    Raises:
      VideoDecodeError: for every unusable input (missing, empty, corrupt, undecodable,
        zero frames, fewer than 2 frames in the clip, aspect ratio above 200).
    """
    name = _name(src)
    info = probe_video(src)
    total = info.total_frames
    for _ in range(2):  # Second pass only if the container's frame count was wrong.
        first, last = clip_range(total, info.fps, start, end)
        clip = last - first + 1
        n = (
            num_sampled_frames(
                clip, info.fps, fps=fps, max_frames=max_frames, min_frames=min_frames
            )
            if clip > 0
            else 0
        )
        if n < FRAME_FACTOR:
            raise VideoDecodeError(
                name, f"clip has {max(clip, 0)} frames, need at least {FRAME_FACTOR}"
            )
        indices = sample_frame_indices(first, last, n)
        try:
            frames, times, decoded = _decode(src, indices)
        except av.FFmpegError as e:
            raise VideoDecodeError(name, f"decoding failed: {e}") from e
        if decoded > last:
            break
        if decoded == 0:
            raise VideoDecodeError(name, "no decodable frames")
        total = decoded  # The header over-counted: resample within the frames that exist.
    else:
        raise VideoDecodeError(name, "frame count keeps changing while decoding")
    video = np.stack(frames)
    metadata = VideoMetadata(
        source_fps=info.fps,
        total_frames=clip,
        frame_indices=indices,
        timestamps=np.asarray(times, np.float64),
        sampled_fps=n / clip * info.fps,
        height=video.shape[1],
        width=video.shape[2],
    )
    return video, metadata


def load_image(src: str | os.PathLike | bytes) -> np.ndarray:
    """Decodes an image to uint8 RGB [H, W, 3]; transparency is composited on white.

    Raises:
      VideoDecodeError: missing, empty, undecodable, or aspect ratio above 200.
    """
    name = _name(src)
    try:
        if isinstance(src, (bytes, bytearray)):
            img = Image.open(io.BytesIO(src))
        else:
            img = Image.open(os.fspath(src))
        img.load()
    except FileNotFoundError as e:
        raise VideoDecodeError(name, "file not found") from e
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise VideoDecodeError(name, f"cannot decode image: {e}") from e
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    image = np.asarray(img.convert("RGB"))
    h, w = image.shape[:2]
    if min(h, w) == 0 or max(h, w) / min(h, w) > resize_lib.MAX_ASPECT_RATIO:
        raise VideoDecodeError(name, f"bad image size {h}x{w}")
    return image
