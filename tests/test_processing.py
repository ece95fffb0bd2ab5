"""Decoding, sampling, smart_resize, normalisation and patch order (processing/)."""

import io
import math

import av
import numpy as np
import pytest
from PIL import Image

from videonsa_jax.data import synthetic
from videonsa_jax.processing import patchify as patchify_lib
from videonsa_jax.processing import preprocess as preprocess_lib
from videonsa_jax.processing import resize as resize_lib
from videonsa_jax.processing import video as video_lib
from videonsa_jax.processing.errors import VideoDecodeError


def _index_video(path, num_frames, fps=10.0, size=(56, 84)):
    """Frame k is a flat grey of level 4k (so the index is readable after decoding)."""
    frames = np.stack([np.full((*size, 3), 4 * k, np.uint8) for k in range(num_frames)])
    synthetic.write_mp4(str(path), frames, fps)
    return path


def _decoded_index(frame):
    return int(round(frame.mean() / 4))


# ----------------------------------------------------------------------------- smart_resize


@pytest.mark.parametrize(
    "h,w,lo,hi,expected",
    [
        (56, 56, 56 * 56, 56 * 56, (56, 56)),
        (100, 150, 4 * 784, 64 * 784, (112, 140)),  # nearest multiples of 28
        (1080, 1920, 128 * 784, 768 * 784, (560, 1008)),  # scaled down to max_pixels
        (20, 30, 128 * 784, 768 * 784, (280, 392)),  # scaled up to min_pixels
        (28, 5000, 4 * 784, 16384 * 784, (28, 5012)),
    ],
)
def test_smart_resize_values(h, w, lo, hi, expected):
    out = resize_lib.smart_resize(h, w, min_pixels=lo, max_pixels=hi)
    assert out == expected
    assert out[0] % 28 == 0 and out[1] % 28 == 0


def test_smart_resize_matches_transformers():
    hf = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    rng = np.random.default_rng(0)
    for _ in range(500):
        h, w = (int(x) for x in rng.integers(42, 4000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        lo = int(rng.choice([4, 64, 128, 256])) * 784
        hi = int(rng.choice([64, 256, 768, 16384])) * 784
        assert resize_lib.smart_resize(h, w, min_pixels=lo, max_pixels=hi) == hf.smart_resize(
            h, w, factor=28, min_pixels=lo, max_pixels=hi
        )


def test_smart_resize_aspect_ratio():
    with pytest.raises(ValueError, match="aspect ratio"):
        resize_lib.smart_resize(10, 2010, min_pixels=784, max_pixels=10**7)


def test_video_frame_budget():
    f = resize_lib.video_frame_max_pixels
    assert f(100, min_pixels=100, max_pixels=5000, total_pixels=None) == 5000
    # share of the total budget per temporal pair: 10^6 / 100 * 2
    assert f(100, min_pixels=100, max_pixels=10**6, total_pixels=10**6) == 20000
    # floored at 1.05 * min_pixels, but never above max_pixels
    assert f(10**5, min_pixels=1000, max_pixels=10**6, total_pixels=10**6) == 1050
    assert f(10**5, min_pixels=1000, max_pixels=500, total_pixels=10**6) == 500
    assert f(2, min_pixels=1, max_pixels=10**9, total_pixels=10**9) == resize_lib.VIDEO_MAX_PIXELS


# ----------------------------------------------------------------------------- patch order


def _hf_order_transcription(frames_tchw):
    """The documented HF reshape/permute, on channels-first frames [T, C, H, W]."""
    t, c, h, w = frames_tchw.shape
    gt, gh, gw = t // 2, h // 14, w // 14
    x = frames_tchw.reshape(gt, 2, c, gh // 2, 2, 14, gw // 2, 2, 14)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * 2 * 14 * 14)


def test_patchify_matches_hf_order():
    rng = np.random.default_rng(1)
    frames = rng.standard_normal((4, 56, 84, 3)).astype(np.float32)
    rows, grid = patchify_lib.patchify(frames)
    assert grid == (2, 4, 6)
    np.testing.assert_array_equal(rows, _hf_order_transcription(frames.transpose(0, 3, 1, 2)))
    # Spot-check the closed form documented in patchify.py.
    gh, gw = 4, 6
    for t, bh, bw, mh, mw, ch, tp, py, px in [
        (1, 1, 2, 1, 0, 2, 1, 13, 5),
        (0, 0, 0, 0, 1, 0, 0, 0, 0),
    ]:
        r = (((t * gh // 2 + bh) * gw // 2 + bw) * 2 + mh) * 2 + mw
        col = ((ch * 2 + tp) * 14 + py) * 14 + px
        assert (
            rows[r, col] == frames[2 * t + tp, (2 * bh + mh) * 14 + py, (2 * bw + mw) * 14 + px, ch]
        )


def test_patchify_pads_odd_frame_count():
    frames = np.random.default_rng(2).standard_normal((3, 28, 28, 3)).astype(np.float32)
    rows, grid = patchify_lib.patchify(frames)
    assert grid == (2, 2, 2)
    padded = np.concatenate([frames, frames[-1:]])
    np.testing.assert_array_equal(rows, _hf_order_transcription(padded.transpose(0, 3, 1, 2)))


def test_preprocess_image_matches_transformers():
    hf = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    rng = np.random.default_rng(3)
    for shape in [(100, 150), (333, 257), (64, 64)]:
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        ours = preprocess_lib.preprocess_image(image, min_pixels=4 * 784, max_pixels=80 * 784)
        proc = hf.Qwen2VLImageProcessorPil(min_pixels=4 * 784, max_pixels=80 * 784)
        ref = proc(images=[Image.fromarray(image)], return_tensors="np")
        np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
        np.testing.assert_allclose(ours["pixel_values"], ref["pixel_values"], atol=2e-6, rtol=0)


def test_preprocess_video_shapes_and_normalisation():
    frames = np.full((6, 60, 90, 3), 128, np.uint8)
    meta = video_lib.VideoMetadata(
        source_fps=8.0,
        total_frames=24,
        frame_indices=np.arange(6),
        timestamps=np.zeros(6),
        sampled_fps=2.0,
        height=60,
        width=90,
    )
    out = preprocess_lib.preprocess_video(frames, meta, min_pixels=784, max_pixels=56 * 84)
    gt, gh, gw = out["video_grid_thw"][0]
    assert (gt, gh, gw) == (3, 4, 6)
    assert out["pixel_values_videos"].shape == (gt * gh * gw, 1176)
    assert out["pixel_values_videos"].dtype == np.float32
    assert out["second_per_grid_ts"][0] == pytest.approx(1.0)  # 2 / sampled fps
    expected = (128 / 255 - patchify_lib.CLIP_MEAN) / patchify_lib.CLIP_STD
    np.testing.assert_allclose(out["pixel_values_videos"][0, ::392], expected, rtol=1e-6)
    eval_style = preprocess_lib.preprocess_video(
        frames, meta, min_pixels=784, max_pixels=56 * 84, processor_fps=4.0
    )
    assert eval_style["second_per_grid_ts"][0] == pytest.approx(0.5)
    assert preprocess_lib.video_grid_thw(6, 60, 90, min_pixels=784, max_pixels=56 * 84) == (3, 4, 6)


def test_resize_kernel_close_to_torch_antialiased_bicubic():
    """PIL's bicubic vs torch's antialiased bicubic (what qwen-vl-utils uses for video).

    Measured on smooth / synthetic content: at most 1 grey level apart; on white noise,
    where PIL clips the bicubic overshoot between its two passes, up to ~24 levels on a few
    pixels (mean 0.2). Documented in resize.py and benchmarks/RESULTS.md.
    """
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    frames = synthetic._render(rng, 2, 168, {1: "red"})
    ours = resize_lib.resize_frames(frames, 112, 112).astype(int)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    y = torch.nn.functional.interpolate(x, size=(112, 112), mode="bicubic", antialias=True)
    ref = y.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy().astype(int)
    assert np.abs(ours - ref).max() <= 1
    assert np.abs(ours - ref).mean() < 0.3


# ----------------------------------------------------------------------------- decoding


def test_num_sampled_frames_rules():
    n = video_lib.num_sampled_frames
    assert n(100, 10.0, fps=2.0) == 20
    assert n(100, 10.0, fps=2.0, max_frames=7) == 6  # floored to even
    assert n(10, 10.0, fps=1.0, min_frames=5) == 6  # min rounded up to even
    assert n(5, 10.0, fps=100.0) == 4  # never more than the clip has
    assert n(2000, 1.0, fps=1.0) == 768  # default cap


def test_load_video_frame_exact(tmp_path):
    path = _index_video(tmp_path / "v.mp4", 40, fps=10.0)
    frames, meta = video_lib.load_video(path, fps=2.0)
    assert frames.shape == (8, 56, 84, 3) and frames.dtype == np.uint8
    expected = np.round(np.linspace(0, 39, 8)).astype(int)
    np.testing.assert_array_equal(meta.frame_indices, expected)
    assert [_decoded_index(f) for f in frames] == expected.tolist()
    np.testing.assert_allclose(meta.timestamps, expected / 10.0)
    assert meta.sampled_fps == pytest.approx(2.0) and meta.source_fps == pytest.approx(10.0)


def test_load_video_clip_and_bytes(tmp_path):
    path = _index_video(tmp_path / "v.mp4", 40, fps=10.0)
    frames, meta = video_lib.load_video(path.read_bytes(), fps=5.0, start=1.05, end=2.9)
    first, last = math.ceil(1.05 * 10), math.floor(2.9 * 10)
    assert meta.total_frames == last - first + 1
    assert meta.frame_indices[0] == first and meta.frame_indices[-1] == last
    assert [_decoded_index(f) for f in frames] == meta.frame_indices.tolist()
    assert len(frames) % 2 == 0


def _write_empty_mp4(path):
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
    return path


@pytest.mark.parametrize(
    "make", ["missing", "empty", "garbage", "truncated", "no_frames", "too_few_frames", "aspect"]
)
def test_bad_videos_raise_one_error(tmp_path, make):
    path = tmp_path / "bad.mp4"
    if make == "empty":
        path.write_bytes(b"")
    elif make == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif make == "truncated":
        good = _index_video(tmp_path / "good.mp4", 20).read_bytes()
        path.write_bytes(good[:200])
    elif make == "no_frames":
        _write_empty_mp4(path)
    elif make == "too_few_frames":
        _index_video(path, 1)
    elif make == "aspect":
        synthetic.write_mp4(str(path), np.zeros((2, 2, 420, 3), np.uint8), 10.0)
    with pytest.raises(VideoDecodeError) as info:
        video_lib.load_video(path, fps=2.0)
    assert info.value.reason


def test_load_image(tmp_path):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:10, :, 3] = 255  # top half opaque red, bottom half transparent
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    image = video_lib.load_image(buf.getvalue())
    assert image.shape == (20, 30, 3)
    np.testing.assert_array_equal(image[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(image[-1, 0], [255, 255, 255])  # composited on white
    with pytest.raises(VideoDecodeError):
        video_lib.load_image(tmp_path / "missing.png")
    with pytest.raises(VideoDecodeError):
        video_lib.load_image(b"not an image")
    Image.new("RGB", (402, 2)).save(tmp_path / "wide.png")
    with pytest.raises(VideoDecodeError):
        video_lib.load_image(tmp_path / "wide.png")
