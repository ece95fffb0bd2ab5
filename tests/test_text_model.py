"""The decoder on its own (JAX only): KV cache, padding, remat, chunked attention, stacking."""

import functools

import hf_tiny as H
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from videonsa_jax.config import ModelConfig
from videonsa_jax.model.attention import dense_attention
from videonsa_jax.model.qwen2_5_vl import Qwen2_5_VL, decode_inputs

IMAGE = (1, 8, 4)


@pytest.fixture(scope="module")
def config():
    return ModelConfig.from_hf_dict(H.tiny_config(num_layers=3).to_dict())


def _model(config, **overrides):
    return Qwen2_5_VL(config.replace(**overrides), rngs=nnx.Rngs(0))


_TRACES = []


@functools.partial(jax.jit, static_argnums=0)
def _step(graphdef, state, inputs, cache):
    _TRACES.append(inputs.input_ids.shape)
    return nnx.merge(graphdef, state).forward_cached(inputs, cache)


def test_layers_are_stacked(config):
    model = nnx.eval_shape(lambda: _model(config))
    attn = model.text.layers.self_attn
    assert attn.k_proj.kernel.shape == (3, 64, 32)
    assert attn.k_proj.kernel.get_metadata()["out_sharding"] == ("layers", "embed", "kv_heads")
    assert model.text.layers.mlp.down_proj.kernel.get_metadata()["out_sharding"] == (
        "layers",
        "mlp",
        "embed",
    )


def test_kv_cache_decode_matches_full_forward(config):
    """Prefill a left-padded image prompt, decode 3 tokens one by one with one jitted step."""
    model = _model(config)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    rows = [
        H.random_text(rng, 2) + H.vision_span(IMAGE, H.IMAGE_PAD) + H.random_text(rng, 3),
        H.random_text(rng, 4) + H.vision_span(IMAGE, H.IMAGE_PAD) + H.random_text(rng, 5),
    ]
    new = rng.integers(1, 200, size=(2, 3))
    length = max(map(len, rows))
    ids = np.zeros((2, length), np.int32)
    mask = np.zeros((2, length), np.int32)
    for b, row in enumerate(rows):
        ids[b, length - len(row) :], mask[b, length - len(row) :] = row, 1
    pixels = H.random_pixels(rng, [IMAGE, IMAGE])
    grids = np.array([IMAGE, IMAGE])

    full = model.prepare_inputs(
        np.concatenate([ids, new], 1),
        np.concatenate([mask, np.ones_like(new)], 1),
        pixel_values=pixels,
        image_grid_thw=grids,
    )
    expected = jax.jit(lambda state, x: nnx.merge(graphdef, state).forward(x))(state, full)

    prompt = model.prepare_inputs(ids, mask, pixel_values=pixels, image_grid_thw=grids)
    cache = model.init_cache(2, length + 5)
    logits, cache = _step(graphdef, state, prompt, cache)
    real = mask.astype(bool)  # padding rows attend to nothing; their outputs are arbitrary
    np.testing.assert_allclose(logits[real], expected[:, :length][real], atol=1e-5, rtol=0)
    n_traces = len(_TRACES)
    for k in range(3):
        step = decode_inputs(jnp.asarray(new[:, k : k + 1]), cache, prompt.rope_deltas)
        np.testing.assert_array_equal(step.positions, full.positions[:, :, length + k][..., None])
        logits, cache = _step(graphdef, state, step, cache)
        np.testing.assert_allclose(logits[:, 0], expected[:, length + k], atol=1e-5, rtol=0)
    assert len(_TRACES) == n_traces + 1  # one compilation for all decode steps
    assert int(cache.index) == length + 3


def test_left_padding_is_ignored(config):
    model = _model(config)
    rng = np.random.default_rng(1)
    row = H.random_text(rng, 7)
    alone = model(np.array([row]))
    padded = model(np.array([[0, 0, 0] + row]), np.array([[0, 0, 0] + [1] * 7]))
    np.testing.assert_allclose(padded[:, 3:], alone, atol=1e-5, rtol=0)


def test_remat_policies_agree(config):
    rng = np.random.default_rng(2)
    ids = np.array([H.random_text(rng, 6)])

    def grads(remat):
        model = _model(config, remat=remat)
        inputs = model.prepare_inputs(ids)
        graphdef, state = nnx.split(model)

        def loss(state):
            return jnp.sum(nnx.merge(graphdef, state).forward(inputs) ** 2)

        return jax.jit(jax.value_and_grad(loss))(state)

    ref_loss, ref = grads("none")
    for remat in ("full", "dots"):
        loss, g = grads(remat)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), g, ref)
    with pytest.raises(ValueError, match="remat must be one of"):
        _model(config, remat="sometimes")


def test_chunked_dense_attention():
    """Query chunking (and its rematerialised backward) equals the one-shot computation."""
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 11, 4, 8))
    k = jax.random.normal(keys[1], (2, 11, 2, 8))
    v = jax.random.normal(keys[2], (2, 11, 2, 8))
    valid = jnp.arange(11)[None, :] >= jnp.array([[0], [3]])
    index = jnp.arange(11)

    def f(chunk_size, q, k, v):
        out = dense_attention(q, k, v, q_index=index, kv_valid=valid, chunk_size=chunk_size)
        return jnp.sum(jnp.sin(out)), out

    f = jax.jit(jax.value_and_grad(f, argnums=(1, 2, 3), has_aux=True), static_argnums=0)
    (_, out), grads = f(1024, q, k, v)
    (_, out4), grads4 = f(4, q, k, v)
    np.testing.assert_allclose(out4, out, atol=1e-6)
    for a, b in zip(grads4, grads, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
