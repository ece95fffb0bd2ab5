"""M-RoPE, vision 2D RoPE and get_rope_index parity with transformers (CPU, tiny config)."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
qwen = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
from transformers import Qwen2_5_VLConfig  # noqa: E402
from transformers.vision_utils import get_vision_position_ids  # noqa: E402

from videonsa_jax.config import ModelConfig  # noqa: E402
from videonsa_jax.model import rope  # noqa: E402

# Small, non-default special token ids: get_rope_index must read them from the config.
TEXT, V_START, V_END, IMG, VID, PAD = 7, 3, 4, 5, 6, 0


@pytest.fixture(scope="module")
def hf_model():
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=32,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
        ),
        vision_config=dict(
            depth=1, hidden_size=16, num_heads=2, out_hidden_size=32, tokens_per_second=2
        ),
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=V_START,
        vision_end_token_id=V_END,
    )
    return qwen.Qwen2_5_VLModel(config).eval()


@pytest.fixture(scope="module")
def config(hf_model):
    return ModelConfig.from_hf_dict(hf_model.config.to_dict())


def vision_span(kind: int, grid) -> list[int]:
    t, h, w = grid
    return [V_START] + [kind] * (t * (h // 2) * (w // 2)) + [V_END]


def hf_rope_index(model, ids, mask, image_grid, video_grid, spg):
    ids_t = torch.from_numpy(ids)
    types = torch.from_numpy(np.where(ids == IMG, 1, np.where(ids == VID, 2, 0)))
    as_t = lambda x: None if x is None else torch.tensor(x)  # noqa: E731
    pos, deltas = model.get_rope_index(
        ids_t,
        mm_token_type_ids=types,
        image_grid_thw=as_t(image_grid),
        video_grid_thw=as_t(video_grid),
        second_per_grid_ts=None if spg is None else torch.tensor(spg, dtype=torch.float32),
        attention_mask=as_t(mask),
    )
    return pos.numpy(), deltas.numpy().reshape(-1)


def check_against_hf(
    hf_model, config, rows, image_grid=None, video_grid=None, spg=None, left_pad=False
):
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), PAD, np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for b, row in enumerate(rows):
        sl = slice(length - len(row), length) if left_pad else slice(0, len(row))
        ids[b, sl], mask[b, sl] = row, 1
    expected = hf_rope_index(hf_model, ids, mask, image_grid, video_grid, spg)
    got = rope.get_rope_index(ids, mask, image_grid, video_grid, spg, config=config)
    assert got[0].dtype == np.int32 and got[0].shape == (3, len(rows), length)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    return got


def test_text_only(config):
    ids = np.array([[TEXT] * 5, [PAD, PAD, TEXT, TEXT, TEXT]])
    mask = (ids != PAD).astype(np.int64)
    pos, deltas = rope.get_rope_index(ids, mask, None, None, None, config=config)
    expected = np.array([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]])
    np.testing.assert_array_equal(pos, np.broadcast_to(expected, (3, 2, 5)))
    np.testing.assert_array_equal(deltas, [0, 0])
    pos, _ = rope.get_rope_index(ids, None, None, None, None, config=config)
    np.testing.assert_array_equal(pos, np.broadcast_to(np.arange(5), (3, 2, 5)))


def test_image(hf_model, config):
    grid = [[1, 6, 10]]
    row = [TEXT] * 3 + vision_span(IMG, grid[0]) + [TEXT] * 4
    check_against_hf(hf_model, config, [row], image_grid=grid)


@pytest.mark.parametrize("spg", [0.5, 1.0, 1.5, 2.0])
def test_video(hf_model, config, spg):
    grid = [[5, 4, 6]]  # 5 temporal groups; the temporal index outruns max(h, w) / 2
    row = [TEXT] * 2 + vision_span(VID, grid[0]) + [TEXT] * 3
    check_against_hf(hf_model, config, [row], video_grid=grid, spg=[spg])


def test_video_without_second_per_grid(hf_model, config):
    grid = [[3, 4, 4]]
    row = [TEXT] + vision_span(VID, grid[0]) + [TEXT]
    check_against_hf(hf_model, config, [row], video_grid=grid)


def test_image_and_video_in_one_prompt(hf_model, config):
    image_grid, video_grid = [[1, 4, 8], [1, 2, 2]], [[4, 6, 4]]
    row = (
        [TEXT] * 2
        + vision_span(IMG, image_grid[0])
        + [TEXT]
        + vision_span(VID, video_grid[0])
        + [TEXT] * 2
        + vision_span(IMG, image_grid[1])
        + [TEXT]
    )
    check_against_hf(hf_model, config, [row], image_grid, video_grid, spg=[1.5])


@pytest.mark.parametrize("left_pad", [False, True])
def test_padded_batch_of_two(hf_model, config, left_pad):
    image_grid, video_grid = [[1, 4, 6]], [[3, 4, 4], [2, 2, 4]]
    rows = [
        [TEXT] * 2 + vision_span(VID, video_grid[0]) + [TEXT] * 2,
        [TEXT] + vision_span(IMG, image_grid[0]) + vision_span(VID, video_grid[1]) + [TEXT] * 9,
    ]
    pos, _ = check_against_hf(
        hf_model, config, rows, image_grid, video_grid, spg=[0.5, 2.0], left_pad=left_pad
    )
    assert np.any(pos[:, 0] != pos[:, 1])


@pytest.mark.parametrize("spg", [0.5, 1.0, 1.5, 2.0])
def test_int_time_rule(config, spg):
    """rope_time_rule="int": T = t * int(spg) * tps and text resumes at (max position) + 1."""
    config = config.replace(rope_time_rule="int")
    t, h, w = 3, 4, 6  # merged 2 x 3
    row = [TEXT] * 2 + vision_span(VID, (t, h, w)) + [TEXT] * 2
    pos, deltas = rope.get_rope_index(
        np.array([row]), None, None, [[t, h, w]], [spg], config=config
    )
    start = 3  # 2 text tokens + <|vision_start|>
    step = int(spg) * 2  # 0.5 -> 0, 1.5 -> 2, 2.0 -> 4
    vision = [
        (start + ti * step, start + hi, start + wi)
        for ti in range(t)
        for hi in range(h // 2)
        for wi in range(w // 2)
    ]
    after = max(max(v) for v in vision) + 1
    expected = (
        [(k, k, k) for k in range(start)]
        + vision
        + [(after + k, after + k, after + k) for k in range(3)]  # <|vision_end|> + 2 text
    )
    np.testing.assert_array_equal(pos[:, 0].T, expected)
    np.testing.assert_array_equal(deltas, [after + 3 - len(row)])


def test_mismatched_grid_raises(config):
    row = [TEXT] + vision_span(IMG, (1, 4, 4)) + [TEXT]
    with pytest.raises(ValueError, match="does not match"):
        rope.get_rope_index(np.array([row]), None, [[1, 4, 6]], None, None, config=config)


def test_inv_freq_within_one_ulp():
    # Ours is a correctly rounded fp32 pow; torch's fp32 pow is off by one ulp on a few inputs.
    for dim, theta in [(128, 1e6), (80 // 2, 1e4), (16, 1e4)]:
        expected = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        got = rope.inv_freq(dim, theta)
        assert got.dtype == np.float32
        np.testing.assert_array_max_ulp(got, expected.numpy(), maxulp=1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mrope_cos_sin_and_apply(hf_model, config, dtype):
    torch_dtype = torch.float32 if dtype == jnp.float32 else torch.bfloat16
    rng = np.random.default_rng(0)
    position_ids = rng.integers(0, 3000, size=(3, 2, 7))
    x = torch.zeros((2, 7, 32), dtype=torch_dtype)
    cos, sin = hf_model.language_model.rotary_emb(x, torch.from_numpy(position_ids))
    text = config.text
    ours = rope.mrope_cos_sin(
        position_ids,
        head_dim=text.head_dim,
        theta=text.rope_theta,
        mrope_section=text.mrope_section,
        dtype=dtype,
    )
    assert ours[0].dtype == dtype and ours[0].shape == (2, 7, text.head_dim)
    atol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(ours[0], np.float32), cos.float().numpy(), atol=atol)
    np.testing.assert_allclose(np.asarray(ours[1], np.float32), sin.float().numpy(), atol=atol)

    q = rng.standard_normal((2, 7, 3, text.head_dim)).astype(np.float32)  # [B, L, H, D]
    q_t = torch.from_numpy(q).to(torch_dtype)
    expected, _ = qwen.apply_rotary_pos_emb(q_t, q_t, cos, sin, unsqueeze_dim=2)
    cos_t, sin_t = (jnp.asarray(c.float().numpy()).astype(dtype) for c in (cos, sin))
    got = rope.apply_rotary(jnp.asarray(q).astype(dtype), cos_t, sin_t)
    assert got.dtype == dtype
    np.testing.assert_allclose(
        np.asarray(got, np.float32), expected.float().numpy(), atol=1e-5 if atol == 1e-5 else 5e-2
    )


def test_vision_rotary(hf_model, config):
    grid = np.array([[2, 4, 6], [1, 8, 2]])
    positions = rope.vision_rotary_positions(grid, 2)
    expected = get_vision_position_ids(torch.from_numpy(grid), 2)
    np.testing.assert_array_equal(positions, expected.numpy())

    head_dim = config.vision.head_dim
    cos, sin = rope.vision_cos_sin(positions, head_dim=head_dim)
    x = torch.zeros((len(positions), head_dim))
    cos_t, sin_t = hf_model.visual.rotary_pos_emb(x, expected)
    np.testing.assert_allclose(np.asarray(cos), cos_t.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin), sin_t.numpy(), atol=1e-6)

    q = np.random.default_rng(1).standard_normal((len(positions), 2, head_dim)).astype(np.float32)
    q_t = torch.from_numpy(q)
    expected_q, _ = qwen.apply_rotary_pos_emb_vision(q_t, q_t, cos_t, sin_t)
    got = rope.apply_rotary(jnp.asarray(q), cos, sin)
    np.testing.assert_allclose(np.asarray(got), expected_q.numpy(), atol=1e-6)
