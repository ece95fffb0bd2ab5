"""Sequence parallelism: on 8 fake CPU devices, context = 4 (with data 2, fsdp 2 or tensor 2) gives
the single-device forward and gradients (fp32), for a length that is a multiple of neither the
shard count nor the NSA block size."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tests.tiny_videonsa import tiny_config
from videonsa_jax.config import AttentionConfig
from videonsa_jax.model.qwen2_5_vl import Qwen2_5_VL
from videonsa_jax.parallel import context, create_mesh, state_shardings
from videonsa_jax.training import inputs as inputs_lib
from videonsa_jax.training.configs import DEFAULT_RULES

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")

VIDEO_TOKENS = 24  # grid (6, 4, 4): 96 patches, 24 merged tokens
LENGTH = 45  # not a multiple of 4 shards nor of block_size 4 (padded to 48 or 64)


def _model_and_inputs(kind: str, batch_size: int, impl: str = "auto"):
    attention = AttentionConfig(kind=kind, block_size=4, block_count=3, window_size=8, impl=impl)
    config = dataclasses.replace(tiny_config(), attention=attention)
    model = Qwen2_5_VL(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(20, 200, (batch_size, LENGTH)).astype(np.int32)
    ids[:, 5] = config.vision_start_token_id
    ids[:, 6 : 6 + VIDEO_TOKENS] = config.video_token_id
    ids[:, 6 + VIDEO_TOKENS] = config.vision_end_token_id
    mask = np.ones_like(ids)
    mask[-1, -3:] = 0
    grid = np.array([[6, 4, 4]] * batch_size)
    pixels = rng.normal(size=(int(grid.prod(-1).sum()), 1176)).astype(np.float32)
    inputs = model.prepare_inputs(
        ids, mask, pixel_values_videos=pixels, video_grid_thw=grid, second_per_grid_ts=[1.0] * 2
    )
    return model, inputs


def _loss_and_grads(model, inputs, weights):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, inputs):
        logits = nnx.merge(graphdef, params, rest).forward(inputs)
        return jnp.sum(logits * weights), logits

    return jax.value_and_grad(loss, has_aux=True), params


def _run(kind, mesh_sizes, monkeypatch, name=None, impl="auto"):
    calls = []
    name = name or ("hybrid_attention" if kind == "videonsa" else "dense_attention")
    original = getattr(context, name)
    monkeypatch.setattr(context, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    model, inputs = _model_and_inputs(kind, batch_size=2, impl=impl)
    weights = jax.random.normal(
        jax.random.key(1), (2, LENGTH, model.config.text.vocab_size), jnp.float32
    )
    fn, params = _loss_and_grads(model, inputs, weights)
    (loss_ref, logits_ref), grads_ref = jax.jit(fn)(params, inputs)

    mesh = create_mesh(mesh_sizes)
    shardings = state_shardings(params, mesh, DEFAULT_RULES)
    params = jax.device_put(params, shardings)
    inputs = inputs_lib.device_put(inputs, inputs_lib.shardings(inputs, mesh, DEFAULT_RULES))
    weights = jax.device_put(
        weights, NamedSharding(mesh, P("fsdp" if mesh.shape["fsdp"] > 1 else None))
    )
    (loss, logits), grads = jax.jit(context.with_mesh(fn, mesh))(params, inputs)

    assert calls, f"context.{name} was not used"
    np.testing.assert_allclose(logits, logits_ref, rtol=1e-5, atol=1e-5)
    # The loss sums 46,080 terms of both signs to ~2.4 (their magnitudes sum to ~4,700): fp32
    # summed in another order differs by a few 1e-9 of that magnitude sum, so the bound scales with
    # it; a shard dropped or counted twice moves the loss by orders of magnitude more.
    magnitude = float(jnp.sum(jnp.abs(logits_ref * weights)))
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5, atol=1e-7 * magnitude)
    flat_ref = dict(nnx.to_flat_state(grads_ref))
    for path, g in nnx.to_flat_state(grads):
        ref = flat_ref[path].get_value()
        scale = max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(
            g.get_value(), ref, rtol=1e-5, atol=1e-5 * scale, err_msg=str(path)
        )


@pytest.mark.parametrize(
    "mesh_sizes", [dict(context=4, data=2), dict(fsdp=2, context=4), dict(context=4, tensor=2)]
)
def test_videonsa_context_parallel_matches_single_device(mesh_sizes, monkeypatch):
    _run("videonsa", mesh_sizes, monkeypatch)


def test_dense_context_parallel_matches_single_device(monkeypatch):
    _run("dense", dict(fsdp=2, context=4), monkeypatch)


def test_videonsa_kernels_per_device_match_single_device(monkeypatch):
    """Context 1 on data 2 x fsdp 2 x tensor 2: the NSA kernels (Pallas, interpret mode) and the
    dense-row attention run per device through `context.per_device` (XLA would otherwise gather
    their operands to every device) and give the single-device result."""
    _run("videonsa", dict(data=2, fsdp=2, tensor=2), monkeypatch, "per_device", impl="pallas")


def test_padded_length():
    mesh = create_mesh(dict(fsdp=2, context=4))
    assert context.padded_length(45, 4) == 45  # no mesh: unchanged
    with context.use_mesh(mesh):
        assert context.context_size() == 4
        assert context.padded_length(45, 4) == 48
        assert context.padded_length(48, 4) == 48
        assert context.padded_length(45, 64) == 256
