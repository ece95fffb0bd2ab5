"""Parity of the whole model with transformers' Qwen2_5_VLForConditionalGeneration (CPU, fp32).

Every case compares the M-RoPE positions, the vision features and the logits (max abs error
<= 1e-4 over the non-padded rows). Grids are chosen to span several 112-px windows without being a
multiple of the window (8 patches).
"""

import hf_tiny as H
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from videonsa_jax.checkpoints import from_pretrained

TOL = 1e-4
IMAGE = (1, 20, 12)  # 3 x 2 windows, the last row and column partial
VIDEO = (4, 12, 20)  # 4 temporal groups, 2 x 3 windows per frame


@jax.jit
def _run(state, inputs):
    """(vision features or None, logits): one compiled program per input shape."""
    model = nnx.merge(_GRAPHDEF[0], state)
    features = None
    if inputs.pixel_rows is not None:
        features = model.visual(inputs.pixel_rows, inputs.vision_layout)
    return features, model.forward(inputs)


_GRAPHDEF = []


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    torch_model = H.save_tiny(path)
    model = from_pretrained(path, dtype=jnp.float32)
    _GRAPHDEF[:] = [nnx.graphdef(model)]
    return torch_model, model, path


def _vision_kwargs(rng, images=(), videos=(), spg=None):
    kwargs = {}
    if images:
        kwargs["pixel_values"] = H.random_pixels(rng, images)
        kwargs["image_grid_thw"] = np.array(images)
    if videos:
        kwargs["pixel_values_videos"] = H.random_pixels(rng, videos)
        kwargs["video_grid_thw"] = np.array(videos)
        if spg is not None:
            kwargs["second_per_grid_ts"] = np.array(spg, np.float32)
    return kwargs


def _check(models, ids, mask=None, **vision):
    """Compares positions, vision features and logits; returns our logits."""
    torch_model, model, _ = models
    ids = np.asarray(ids)
    mask = np.ones_like(ids) if mask is None else np.asarray(mask)
    inputs = model.prepare_inputs(ids, mask, **vision)

    if "image_grid_thw" in vision or "video_grid_thw" in vision:
        t = {k: torch.from_numpy(v) for k, v in vision.items() if k.endswith("grid_thw")}
        spg = vision.get("second_per_grid_ts")
        ref_pos, ref_delta = torch_model.model.get_rope_index(
            torch.from_numpy(ids).long(),
            mm_token_type_ids=torch.from_numpy(H.token_types(ids)).int(),
            second_per_grid_ts=None if spg is None else torch.from_numpy(spg),
            attention_mask=torch.from_numpy(mask).long(),
            **t,
        )
        np.testing.assert_array_equal(inputs.positions, ref_pos.numpy())
        np.testing.assert_array_equal(inputs.rope_deltas, ref_delta.numpy().reshape(-1))

        ref_features = []
        for kind in ("image", "video"):
            if f"{kind}_grid_thw" in vision:
                pixels = vision["pixel_values" if kind == "image" else "pixel_values_videos"]
                with torch.no_grad():
                    out = torch_model.model.visual(
                        torch.from_numpy(pixels), grid_thw=t[f"{kind}_grid_thw"]
                    )
                ref_features.append(out.pooler_output.numpy())
    features, logits = _run(nnx.state(model), inputs)
    if features is not None:
        np.testing.assert_allclose(features, np.concatenate(ref_features), atol=TOL, rtol=0)

    ref = H.torch_logits(torch_model, ids, mask, **vision)
    assert logits.shape == ref.shape
    err = float(np.abs(np.asarray(logits) - ref)[mask.astype(bool)].max())
    assert err <= TOL, err
    return logits


def test_text_only(models):
    rng = np.random.default_rng(0)
    _check(models, [H.random_text(rng, 23)])


def test_contract_call(models):
    """model(input_ids, ...) = prepare_inputs + jitted forward; a 1-D prompt is a batch of one."""
    torch_model, model, _ = models
    rng = np.random.default_rng(0)
    ids = np.array(H.random_text(rng, 9))
    ref = H.torch_logits(torch_model, ids[None])
    np.testing.assert_allclose(np.asarray(model(ids)), ref, atol=TOL, rtol=0)


def test_one_image(models):
    rng = np.random.default_rng(1)
    ids = H.random_text(rng, 5) + H.vision_span(IMAGE, H.IMAGE_PAD) + H.random_text(rng, 7)
    kwargs = _vision_kwargs(rng, images=[IMAGE])
    exact = _check(models, [ids], **kwargs)

    # Padding the ViT rows and attention groups to fixed sizes (static shapes) changes nothing.
    model = models[1]
    n = int(np.prod(IMAGE)) + 32
    sizes = dict(num_patches=n, num_windows=8, num_slices=2, slice_len=256)
    padded = model.prepare_inputs([ids], **kwargs, **sizes)
    assert padded.pixel_rows.shape[0] == n
    assert padded.vision_layout.window_index.shape[0] == 8
    assert padded.vision_layout.full_index.shape == (2, 256)
    np.testing.assert_allclose(_run(nnx.state(model), padded)[1], exact, atol=1e-5, rtol=0)


@pytest.mark.parametrize("spg", [0.5, 1.0, 1.5, 2.0])
def test_one_video(models, spg):
    rng = np.random.default_rng(2)
    ids = H.random_text(rng, 4) + H.vision_span(VIDEO, H.VIDEO_PAD) + H.random_text(rng, 6)
    _check(models, [ids], **_vision_kwargs(rng, videos=[VIDEO], spg=[spg]))


def test_image_and_video(models):
    rng = np.random.default_rng(3)
    ids = (
        H.random_text(rng, 3)
        + H.vision_span(IMAGE, H.IMAGE_PAD)
        + H.random_text(rng, 4)
        + H.vision_span(VIDEO, H.VIDEO_PAD)
        + H.random_text(rng, 5)
    )
    _check(models, [ids], **_vision_kwargs(rng, images=[IMAGE], videos=[VIDEO], spg=[1.5]))


def test_padded_batch(models):
    """Two rows of different lengths, left padded: one image row, one video row."""
    rng = np.random.default_rng(4)
    small_image, video = (1, 8, 12), (2, 12, 8)
    rows = [
        H.random_text(rng, 3) + H.vision_span(small_image, H.IMAGE_PAD) + H.random_text(rng, 2),
        H.random_text(rng, 6) + H.vision_span(video, H.VIDEO_PAD) + H.random_text(rng, 9),
    ]
    length = max(map(len, rows))
    ids = np.zeros((2, length), np.int64)
    mask = np.zeros((2, length), np.int64)
    for b, row in enumerate(rows):
        ids[b, length - len(row) :] = row
        mask[b, length - len(row) :] = 1
    kwargs = _vision_kwargs(rng, images=[small_image], videos=[video], spg=[0.5])
    _check(models, ids, mask, **kwargs)


def test_int_time_rule(models):
    """rope_time_rule="int" truncates second_per_grid_t (1.5 -> 1) and the model uses it."""
    torch_model, _, path = models
    model = from_pretrained(path, dtype=jnp.float32, rope_time_rule="int")
    rng = np.random.default_rng(6)
    start = 4
    ids = np.array([H.random_text(rng, start) + H.vision_span(VIDEO, H.VIDEO_PAD)])
    kwargs = _vision_kwargs(rng, videos=[VIDEO], spg=[1.5])
    inputs = model.prepare_inputs(ids, **kwargs)
    t, h, w = VIDEO
    temporal = inputs.positions[0, 0, start + 1 : start + 1 + t * h * w // 4] - (start + 1)
    expected = np.repeat(np.arange(t) * 1 * 2, h * w // 4)  # ti * int(1.5) * tokens_per_second
    np.testing.assert_array_equal(temporal, expected)

    ref_inputs = {k: torch.from_numpy(v) for k, v in kwargs.items()}
    with torch.no_grad():
        ref = torch_model(
            input_ids=torch.from_numpy(ids).long(),
            position_ids=torch.from_numpy(inputs.positions).long(),
            **ref_inputs,
        ).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(ids, **kwargs)), ref, atol=TOL, rtol=0)
