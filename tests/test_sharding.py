"""On 8 fake CPU devices, a sharded training step equals the single-device step (fp32)."""

import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from videonsa_jax.parallel import context, create_mesh, logical_to_spec
from videonsa_jax.parallel.mesh import resolve_mesh_shape
from videonsa_jax.training import configs
from videonsa_jax.training import inputs as inputs_lib
from videonsa_jax.training import state as state_lib
from videonsa_jax.training import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = dict(image_token_id=12, video_token_id=13, vision_start_token_id=9, vision_end_token_id=10)


def _tiny_setup():
    config = configs.load_config_file(os.path.join(REPO, "configs/tiny.py"))  # VideoNSA
    config.model.dtype = "float32"
    config.model.vision.update(depth=1, fullatt_block_indexes=(0,))  # faster to compile
    model_config = configs.model_config(config, IDS)
    return config, model_config


def _batch(model, rng, batch_size=4, length=48, video_tokens=16):
    """A text + video batch: prefix, <vision_start>, video pads, <vision_end>, text; padding."""
    ids = rng.integers(20, 512, (batch_size, length)).astype(np.int32)
    ids[:, 6] = IDS["vision_start_token_id"]
    ids[:, 7 : 7 + video_tokens] = IDS["video_token_id"]
    ids[:, 7 + video_tokens] = IDS["vision_end_token_id"]
    mask = np.ones_like(ids)
    mask[-1, -4:] = 0
    loss_mask = np.zeros(ids.shape, bool)
    loss_mask[:, -9:-4] = True
    grid = np.array([[video_tokens // 4, 4, 4]] * batch_size)
    rows = int(grid.prod(-1).sum())
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "loss_mask": loss_mask,
        "pixel_values_videos": rng.normal(size=(rows, 1176)).astype(np.float32),
        "video_grid_thw": grid,
        "second_per_grid_ts": np.ones(batch_size, np.float32),
    }
    return inputs_lib.model_batch(model, batch, num_patches=rows)


def _sgd_step(config, model_config, mesh, host_batch):
    """One step with SGD(lr=1): returns (loss, gradients = old params - new params, state)."""
    rules = tuple(tuple(r) for r in config.sharding.rules)
    make_model = state_lib.model_factory(model_config, config)
    model = nnx.eval_shape(make_model)
    tx = optax.sgd(1.0)
    graphdef, _, shardings = state_lib.abstract_state(model, tx, mesh, rules)
    state = state_lib.init_state(make_model, tx, shardings)
    old = jax.tree.map(np.asarray, state.params)
    step = step_lib.make_train_step(
        graphdef, tx, state_lib.lm_loss(chunk_size=16), lambda _: 1.0, shardings.params
    )
    step = jax.jit(context.with_mesh(step, mesh), out_shardings=(shardings, None))
    batch = inputs_lib.device_put(host_batch, inputs_lib.shardings(host_batch, mesh, rules, 1))
    new_state, metrics = step(state, nnx.State({}), batch)
    grads = jax.tree.map(lambda a, b: a - np.asarray(b), old, new_state.params)
    return float(metrics["loss"]), grads, new_state


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_sharded_step_equals_single_device_step():
    config, model_config = _tiny_setup()
    model = nnx.eval_shape(state_lib.model_factory(model_config, config))
    rng = np.random.default_rng(0)
    host, _ = inputs_lib.stack([_batch(model, rng), _batch(model, rng)])  # 2 micro-batches

    single = create_mesh({"data": 1}, devices=jax.devices()[:1])
    loss_1, grads_1, _ = _sgd_step(config, model_config, single, host)
    sharded = create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    loss_8, grads_8, state_8 = _sgd_step(config, model_config, sharded, host)

    q_kernel = state_8.params["text"]["layers"]["self_attn"]["q_proj"]["kernel"][...]
    assert q_kernel.sharding.spec == P(None, "fsdp", "tensor")
    assert len(q_kernel.sharding.device_set) == 8
    np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5, atol=1e-5)
    flat_1 = nnx.to_flat_state(grads_1)
    flat_8 = dict(nnx.to_flat_state(grads_8))
    assert max(np.abs(g[...]).max() for _, g in flat_1) > 1e-3  # gradients are not trivial
    for path, g1 in flat_1:
        np.testing.assert_allclose(
            flat_8[path][...], g1[...], rtol=1e-5, atol=1e-5, err_msg=str(path)
        )


def test_logical_rules():
    mesh = create_mesh({"data": -1})
    assert logical_to_spec(("embed", "mlp"), configs.DEFAULT_RULES, mesh) == P(None, None)
    with pytest.raises(ValueError, match="no rule"):
        logical_to_spec(("embedd",), configs.DEFAULT_RULES, mesh)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_logical_rules_on_a_mesh():
    mesh = create_mesh({"fsdp": 2, "context": 2, "tensor": 2})
    rules = configs.DEFAULT_RULES
    assert logical_to_spec(("embed", "mlp"), rules, mesh, (64, 128)) == P(
        ("fsdp", "context"), "tensor"
    )
    # An axis that does not divide the dimension is dropped (from the end).
    assert logical_to_spec(("embed", "vocab"), rules, mesh, (6, 7)) == P("fsdp", None)
    # A mesh axis is used once per array.
    assert logical_to_spec(("batch", "embed"), rules, mesh, (4, 8)) == P("fsdp", "context")


def test_mesh_shape():
    assert resolve_mesh_shape([1, -1, 2, 1], 8) == (1, 4, 2, 1)
    with pytest.raises(ValueError, match="needs 4 devices"):
        resolve_mesh_shape([2, 2, 1, 1], 8)
