"""Host-side batches: videos of different sizes stack into one fixed shape (padded ViT groups and
text rows) without changing what the model computes; blocks of rows read by different processes
assemble into the whole batch."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tests.tiny_videonsa import tiny_config
from videonsa_jax.config import AttentionConfig
from videonsa_jax.model import vision
from videonsa_jax.model.qwen2_5_vl import Qwen2_5_VL
from videonsa_jax.parallel import BatchBlock, create_mesh, process_batch_block
from videonsa_jax.training import configs
from videonsa_jax.training import inputs as inputs_lib

LENGTH, VIDEO_TOKENS = 40, 16


def _collated(model, grid, text_tokens, seed):
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
    return batch


def _batch(model, grid, text_tokens, seed):
    return inputs_lib.model_batch(model, _collated(model, grid, text_tokens, seed), num_patches=128)


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


def _concat(blocks):
    """Globalized `ModelInputs` of consecutive blocks -> the whole batch's (batch-major fields on
    their batch axis, every other array on its leading axis)."""
    batch_axis = {"positions": 1}
    fields = {}
    for name, *parts in zip(blocks[0]._fields, *blocks, strict=True):
        if name == "vision_layout":
            fields[name] = jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
        else:
            fields[name] = np.concatenate(parts, axis=batch_axis.get(name, 0))
    return type(blocks[0])(**fields)


def test_blocks_of_two_processes_assemble_into_the_whole_batch(model):
    parts = [_collated(model, (4, 4, 4), text_tokens=5, seed=seed) for seed in (0, 1)]
    whole = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    expected = inputs_lib.model_batch(model, whole, num_patches=256)["inputs"]

    # Exact sizes (no padding): the globalized index fields equal the whole batch's (group slots
    # where valid: invalid slots point at any row).
    local = [inputs_lib.model_batch(model, p, num_patches=128)["inputs"] for p in parts]
    joined = _concat([inputs_lib.globalize(x, BatchBlock(i, 2, 2)) for i, x in enumerate(local)])
    got, want = joined.vision_layout, expected.vision_layout
    for kind in ("window", "full"):
        valid = getattr(want, f"{kind}_valid")
        np.testing.assert_array_equal(getattr(got, f"{kind}_valid"), valid)
        np.testing.assert_array_equal(
            np.where(valid, getattr(got, f"{kind}_index"), -1),
            np.where(valid, getattr(want, f"{kind}_index"), -1),
        )
    for name in ("rotary_pos", "window_inverse", "full_inverse"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    for name in joined._fields:
        if name != "vision_layout":
            np.testing.assert_array_equal(getattr(joined, name), getattr(expected, name), name)

    # Padded patch rows and groups (sizes agreed between the blocks): the same logits.
    padded, _ = inputs_lib.uniform_sizes(
        [inputs_lib.model_batch(model, p, num_patches=160) for p in parts]
    )
    blocks = [inputs_lib.globalize(m["inputs"], BatchBlock(i, 2, 2)) for i, m in enumerate(padded)]
    joined = _concat(blocks)
    assert joined.pixel_rows.shape[0] == 320
    targets = joined.vision_targets
    np.testing.assert_array_equal(np.sort(targets[targets < 4 * LENGTH]), expected.vision_targets)
    assert np.all(targets[targets >= 4 * LENGTH] == 4 * LENGTH)  # the scatter drops padding
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda inputs: nnx.merge(graphdef, state).forward(inputs))
    np.testing.assert_allclose(forward(joined), forward(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_place_splits_the_vision_arrays_like_the_batch(model):
    mesh = create_mesh({"data": 2, "fsdp": 2, "context": 2})
    assert process_batch_block(mesh, ("data", "fsdp"), 4) == (0, 1, 4)  # one process
    placement = inputs_lib.Placement.of_process(mesh, configs.DEFAULT_RULES, 4)
    assert placement.block == (0, 1, 4) and placement.shards == 4
    assert placement.num_patches(250, 4) == 256  # a multiple of 4 x 4 shards
    parts = [_collated(model, (4, 4, 4), text_tokens=5, seed=seed) for seed in (0, 1)]
    whole = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    (host,), sizes = inputs_lib.uniform_sizes(
        [inputs_lib.model_batch(model, whole, num_patches=256)], shards=placement.shards
    )
    assert sizes["num_windows"] % 4 == 0 and sizes["num_slices"] % 4 == 0
    placed = inputs_lib.place(host, placement)
    jax.tree.map(np.testing.assert_array_equal, placed, host)  # block 0 of 1: unchanged
    pixels = placed["inputs"].pixel_rows
    assert pixels.sharding.spec == P(("data", "fsdp"))
    assert placed["inputs"].vision_layout.window_index.sharding.spec == P(("data", "fsdp"))
    assert placed["inputs"].input_ids.sharding.spec == P(("data", "fsdp"), "context")
