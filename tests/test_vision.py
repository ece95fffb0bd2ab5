"""Vision tower parity with transformers' Qwen2.5-VL ViT (CPU, fp32, tiny random config)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
qwen = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
from transformers import Qwen2_5_VLConfig  # noqa: E402
from transformers.vision_utils import get_vision_window_index  # noqa: E402

from videonsa_jax.config import ModelConfig  # noqa: E402
from videonsa_jax.model.vision import (  # noqa: E402
    VisionTransformer,
    prepare_vision_layout,
)

VISION = dict(
    depth=4,
    hidden_size=32,
    intermediate_size=48,
    num_heads=2,
    out_hidden_size=24,
    fullatt_block_indexes=[1, 3],
    window_size=112,
    patch_size=14,
    temporal_patch_size=2,
    spatial_merge_size=2,
    tokens_per_second=2,
)

GRIDS = {
    "image": [[1, 6, 10]],
    "video_3_slices": [[3, 4, 6]],
    "frames_span_windows": [[2, 20, 12]],  # merged 10 x 6: 3 x 2 windows, edge windows partial
    "frames_window_multiple": [[2, 16, 8]],  # merged 8 x 4: exactly 2 x 1 windows
    "image_and_video": [[1, 10, 18], [2, 12, 8]],
}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    hf_config = Qwen2_5_VLConfig(vision_config=VISION, text_config=dict(hidden_size=24))
    hf_config.vision_config._attn_implementation = "eager"
    hf = qwen.Qwen2_5_VisionTransformerPretrainedModel(hf_config.vision_config).eval()
    with torch.no_grad():  # unit-scale weights so that attention patterns matter
        for name, p in hf.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
    config = ModelConfig.from_hf_dict(hf_config.to_dict()).vision
    ours = VisionTransformer(config, rngs=nnx.Rngs(0))
    load_hf_vision(ours, hf.state_dict())
    return hf, ours, config


def hf_key_to_path(key: str) -> str:
    """HF vision key (without the `visual.` prefix) -> our parameter path (module docstring)."""
    key = key.replace("patch_embed.proj.weight", "patch_embed.kernel")
    key = key.replace("merger.mlp.0.", "merger.mlp_0.").replace("merger.mlp.2.", "merger.mlp_2.")
    if key.endswith(".weight") and "norm" not in key and "ln_q" not in key:
        key = key[: -len(".weight")] + ".kernel"
    return key


def load_hf_vision(model: VisionTransformer, state_dict: dict) -> None:
    n_params = len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n_params == len(state_dict)
    for key, tensor in state_dict.items():
        value = tensor.detach().float().numpy()
        if key == "patch_embed.proj.weight":
            value = value.reshape(value.shape[0], -1).T
        elif value.ndim == 2:
            value = value.T
        *parents, leaf = hf_key_to_path(key).split(".")
        obj = model
        for part in parents:
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
        var = getattr(obj, leaf)
        assert var.shape == value.shape, (key, var.shape, value.shape)
        var[...] = jnp.asarray(value)


@nnx.jit
def forward(model, pixels, layout):
    return model(pixels, layout)


def run_hf(hf, pixels: np.ndarray, grid: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = hf(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grid))
    return out.pooler_output.numpy()


def random_pixels(grid: np.ndarray, seed: int = 0) -> np.ndarray:
    n = int(np.prod(grid, axis=1).sum())
    return np.random.default_rng(seed).standard_normal((n, 1176)).astype(np.float32)


@pytest.mark.parametrize("case", sorted(GRIDS))
def test_matches_transformers(models, case):
    hf, ours, config = models
    grid = np.asarray(GRIDS[case], np.int64)
    pixels = random_pixels(grid)
    expected = run_hf(hf, pixels, grid)
    got = np.asarray(forward(ours, jnp.asarray(pixels), prepare_vision_layout(grid, config)))
    assert got.shape == expected.shape == (len(pixels) // 4, VISION["out_hidden_size"])
    err = np.max(np.abs(got - expected)) / max(1.0, np.max(np.abs(expected)))
    assert err <= 1e-4, err


def test_padded_layout_is_jittable_and_exact(models):
    hf, ours, config = models
    grid = np.asarray(GRIDS["image_and_video"], np.int64)
    pixels = random_pixels(grid, seed=1)
    n = len(pixels)
    layout = prepare_vision_layout(
        grid, config, num_patches=n + 40, num_windows=20, num_slices=5, slice_len=200
    )
    padded = np.concatenate([pixels, np.full((40, pixels.shape[1]), 7.0, np.float32)])

    got = np.asarray(forward(ours, jnp.asarray(padded), layout))
    expected = run_hf(hf, pixels, grid)
    assert got.shape[0] == (n + 40) // 4 and np.all(np.isfinite(got))
    np.testing.assert_allclose(got[: n // 4], expected, atol=1e-4 * max(1.0, abs(expected).max()))


def test_layout_groups_match_transformers_partition(models):
    _, _, config = models
    grid = np.asarray([[2, 20, 12], [1, 16, 8], [3, 4, 6]], np.int64)
    layout = prepare_vision_layout(grid, config)
    # transformers: windows = consecutive cu_window_seqlens chunks of the window-ordered rows.
    window_index, cu = get_vision_window_index(torch.from_numpy(grid), 2, 112, 14)
    rows = (window_index.numpy()[:, None] * 4 + np.arange(4)).reshape(-1)
    cu = cu.numpy()
    expected = {frozenset(rows[a:b].tolist()) for a, b in zip(cu[:-1], cu[1:], strict=True)}
    got = {
        frozenset(idx[ok].tolist())
        for idx, ok in zip(layout.window_index, layout.window_valid, strict=True)
    }
    assert got == expected
    # full attention: one temporal slice of one item.
    sizes = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    expected = {frozenset(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)}
    got = {
        frozenset(idx[ok].tolist())
        for idx, ok in zip(layout.full_index, layout.full_valid, strict=True)
    }
    assert got == expected
    flat = layout.window_index.reshape(-1)[layout.window_inverse]
    np.testing.assert_array_equal(flat, np.arange(len(flat)))


def test_bf16_smoke(models):
    hf, ours, config = models
    grid = np.asarray(GRIDS["image_and_video"], np.int64)
    pixels = random_pixels(grid, seed=2)
    layout = prepare_vision_layout(grid, config)
    expected = np.asarray(forward(ours, jnp.asarray(pixels), layout))
    model = VisionTransformer(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    nnx.update(model, nnx.state(ours))
    got = forward(model, jnp.asarray(pixels), layout)
    assert got.dtype == jnp.bfloat16
    got = np.asarray(got.astype(jnp.float32))
    assert np.all(np.isfinite(got))
    assert np.max(np.abs(got - expected)) <= 5e-2 * np.max(np.abs(expected))


def test_remat_gives_the_same_gradients(models):
    _, ours, config = models
    grid = np.asarray(GRIDS["video_3_slices"], np.int64)
    pixels = jnp.asarray(random_pixels(grid, seed=3))
    layout = prepare_vision_layout(grid, config)

    def grads(remat: str):
        model = VisionTransformer(config, remat=remat, rngs=nnx.Rngs(0))
        nnx.update(model, nnx.state(ours))
        graphdef, params = nnx.split(model)
        loss = lambda p: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(pixels, layout)))
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
        checkpoints = len(re.findall(r"\b(?:remat\w*|checkpoint)\[", jaxpr))
        return jax.jit(jax.value_and_grad(loss))(params), checkpoints

    (loss_ref, g_ref), checkpoints_ref = grads("none")
    (loss, g), checkpoints = grads("full")
    assert checkpoints_ref == 0 and checkpoints == config.depth
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g, g_ref)
    with pytest.raises(ValueError, match="remat must be one of"):
        VisionTransformer(config, remat="everything", rngs=nnx.Rngs(0))


def test_query_chunked_group_attention(models, monkeypatch):
    """Long groups run in query chunks (here forced: chunks of 8 query rows); values match
    transformers and the gradients match the one-chunk path."""
    from videonsa_jax.model import vision

    hf, ours, config = models
    grid = np.asarray(GRIDS["video_3_slices"], np.int64)
    pixels = jnp.asarray(random_pixels(grid, seed=5))
    layout = prepare_vision_layout(grid, config)
    graphdef, params = nnx.split(ours)
    loss = lambda p: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(pixels, layout)))
    loss_ref, g_ref = jax.jit(jax.value_and_grad(loss))(params)
    monkeypatch.setattr(vision, "GROUP_LOGITS_BYTES", 1)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
    assert re.search(r"\bscan\[", jaxpr)  # the chunked path ran
    got = np.asarray(jax.jit(lambda p: nnx.merge(graphdef, p)(pixels, layout))(params))
    expected = run_hf(hf, np.asarray(pixels), grid)
    assert np.max(np.abs(got - expected)) / max(1.0, np.max(np.abs(expected))) <= 1e-4
    loss_chunked, g = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(loss_chunked, loss_ref, rtol=1e-5)
    # fp32: the chunks sum the key / value gradients in another order.
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b)) + 1e-7
