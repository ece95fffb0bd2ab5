"""Host-side batches: videos of different sizes stack into one fixed shape (padded ViT groups and
text rows) without changing what the model computes."""

import jax
import numpy as np
import pytest
from flax import nnx

from tests.tiny_videonsa import tiny_config
from videonsa_jax.config import AttentionConfig
from videonsa_jax.model import vision
from videonsa_jax.model.qwen2_5_vl import Qwen2_5_VL
from videonsa_jax.training import inputs as inputs_lib

LENGTH, VIDEO_TOKENS = 40, 16


def _batch(model, grid, text_tokens, seed):
    """Two rows: text prefix, one video of `grid`, `text_tokens` text tokens, padding."""
    rng = np.random.default_rng(seed)
    cfg = model.config
    ids = np.zeros((2, LENGTH), np.int32)
    mask = np.zeros_like(ids)
    for row in range(2):
        body = [20, 21, cfg.vision_start_token_id, *[cfg.video_token_id] * VIDEO_TOKENS]
        body += [cfg.vision_end_token_id, *rng.integers(20, 200, text_tokens)]
        ids[row, : len(body)] = body
        mask[row, : len(body)] = 1
    rows = 2 * int(np.prod(grid))
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "loss_mask": mask.astype(bool),
        "pixel_values_videos": rng.normal(size=(rows, 1176)).astype(np.float32),
        "video_grid_thw": np.array([grid, grid]),
        "second_per_grid_ts": np.ones(2, np.float32),
    }
    return inputs_lib.model_batch(model, batch, num_patches=128)


@pytest.fixture(scope="module")
def model():
    attention = AttentionConfig(kind="videonsa", block_size=4, block_count=2, window_size=8)
    return Qwen2_5_VL(tiny_config(attention=attention), rngs=nnx.Rngs(0))


def test_mixed_video_sizes_stack_and_compute_the_same(model):
    # 4 slices of 4 x 4 patches vs 2 slices of 4 x 8 patches; different text lengths.
    first = _batch(model, (4, 4, 4), text_tokens=3, seed=0)
    second = _batch(model, (2, 4, 8), text_tokens=12, seed=1)
    assert inputs_lib.batch_sizes(first) != inputs_lib.batch_sizes(second)

    stacked, sizes = inputs_lib.stack([first, second])
    assert sizes == {"num_windows": 8, "num_slices": 8, "slice_len": 64, "num_text_rows": 40}
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda inputs: nnx.merge(graphdef, state).forward(inputs))
    for i, micro in enumerate((first, second)):
        padded = jax.tree.map(lambda x, i=i: x[i], stacked["inputs"])
        np.testing.assert_allclose(forward(padded), forward(micro["inputs"]), rtol=1e-5, atol=1e-5)

    # Sizes only grow: a later, smaller batch keeps them (one compiled shape).
    _, again = inputs_lib.stack([_batch(model, (4, 4, 4), text_tokens=1, seed=2)], sizes)
    assert again == sizes


def test_pad_layout_rejects_shrinking(model):
    micro = _batch(model, (2, 4, 8), text_tokens=3, seed=0)
    with pytest.raises(ValueError, match="slice_len=16 is smaller than the 32"):
        vision.pad_layout(micro["inputs"].vision_layout, num_windows=8, num_slices=8, slice_len=16)
