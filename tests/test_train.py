"""The training CLI on the tiny config (subprocesses, a few steps)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from videonsa_jax.model.layers import Linear
from videonsa_jax.training import configs, metrics
from videonsa_jax.training import state as state_lib
from videonsa_jax.training import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small and fast: few samples and steps, eval on 8 held-out videos.
FAST = [
    "--config.data.synthetic.num_train=32",
    "--config.data.synthetic.num_eval=8",
    "--config.eval.batch_size=8",
    "--config.data.batch_size=4",
    "--config.data.num_patches=1024",
]


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    """The training subprocesses share compiled programs (same model and shapes): faster tests."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "jax_cache"))
        patch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        yield


def run_train(workdir, *overrides, config="configs/tiny.py", timeout=600):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    cmd = [sys.executable, "-m", "videonsa_jax.train", f"--config={config}",
           f"--workdir={workdir}", *overrides]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """6 steps of the tiny config with eval, checkpoints every 3 steps and a final export."""
    workdir = tmp_path_factory.mktemp("tiny")
    steps = ["--config.train.num_steps=6", "--config.eval.every=6", "--config.train.save_every=3"]
    result = run_train(workdir, *FAST, *steps, "--config.optim.warmup_ratio=0.2",
                       "--config.train.export=true")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result.stderr


def test_cli_trains_evaluates_and_checkpoints(tiny_run):
    workdir, log = tiny_run
    assert "step 6/6 (100%)" in log and "ETA" in log
    scalars = metrics.read_scalars(str(workdir))
    loss = scalars["train/loss"]
    assert sorted(loss) == [1, 2, 3, 4, 5, 6]
    assert loss[6] < loss[1] - 0.5  # it learns (mostly the answer format at first)
    for tag in ("train/learning_rate", "train/grad_norm", "train/tokens_per_sec",
                "train/step_time", "train/skipped_samples", "train/gate_cmp", "train/gate_slc",
                "train/gate_swa", "eval/accuracy"):  # fmt: skip
        assert tag in scalars, tag
    assert 0.0 <= scalars["eval/accuracy"][6] <= 1.0
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(
        os.listdir(workdir / "export")
    )


def test_cli_fine_tunes_from_an_exported_model(tiny_run, tmp_path):
    exported = tiny_run[0] / "export"
    result = run_train(
        tmp_path, *FAST, f"--config.model.init_from={exported}", "--config.train.num_steps=2",
        "--config.eval.every=0", "--config.data.synthetic.num_train=8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"initialised {exported}" in result.stderr
    # It starts from the trained weights: well below the from-scratch loss (~ln 512 = 6.2).
    scratch = metrics.read_scalars(str(tiny_run[0]))["train/loss"]
    assert metrics.read_scalars(str(tmp_path))["train/loss"][1] < scratch[1] - 0.5


def test_unknown_config_key_fails_with_one_message(tmp_path):
    result = run_train(tmp_path, "--config.train.num_stepz=3", timeout=120)
    assert result.returncode != 0
    assert "num_stepz" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.parametrize("config", ["configs/tiny.py", "configs/qwen2_5_vl_7b_videonsa.py"])
def test_missing_init_checkpoint_fails_with_one_message(tmp_path, config):
    result = run_train(
        tmp_path, "--config.model.init_from=/does/not/exist", config=config, timeout=120
    )
    assert result.returncode != 0
    assert "config.model.init_from='/does/not/exist' is not a checkpoint directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_nonfinite_step_is_skipped_and_counted():
    class Toy(nnx.Module):
        def __init__(self):
            self.a = Linear(3, 2, use_bias=True, axes=("embed", "mlp"), rngs=nnx.Rngs(0))

    def loss_fn(model, batch):
        nll = jnp.sum(model.a(batch["x"]) ** 2) * batch["scale"]
        return nll, jnp.float32(batch["x"].shape[0]), {}

    config = configs.base_config()
    graphdef, params = nnx.split(Toy(), nnx.Param)[:2]
    tx = step_lib.make_optimizer(config)
    schedule = step_lib.learning_rate_schedule(config)
    step = jax.jit(step_lib.make_train_step(graphdef, tx, loss_fn, schedule))
    state = state_lib.new_state(params, tx)
    batch = lambda scale: {"x": jnp.ones((1, 4, 3)), "scale": jnp.full((1,), scale)}

    for _ in range(2):  # leave the warmup's zero learning rate
        state, _ = step(state, nnx.State({}), batch(1.0))
    bad, m = step(state, nnx.State({}), batch(jnp.nan))
    assert int(m["nonfinite"]) == 1 and int(bad.step) == 3
    for a, b in zip(jax.tree.leaves((bad.params, bad.opt_state)),
                    jax.tree.leaves((state.params, state.opt_state)), strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)
    worse, m = step(bad, nnx.State({}), batch(jnp.inf))
    assert int(m["nonfinite"]) == 2
    good, m = step(worse, nnx.State({}), batch(1.0))
    assert int(m["nonfinite"]) == 0
    assert not np.array_equal(good.params["a"]["kernel"][...], state.params["a"]["kernel"][...])


def test_step_runs_with_a_rematerialised_vision_tower():
    """remat="full" (configs/long128k.py) wraps each ViT block in `nnx.remat`, which fails on
    arrays closed over by a trace (the step's aux-shape `eval_shape` once did that)."""
    from tests.tiny_videonsa import tiny_config
    from videonsa_jax.model.qwen2_5_vl import Qwen2_5_VL

    model = Qwen2_5_VL(tiny_config(remat="full"), rngs=nnx.Rngs(0))
    cfg = model.config
    ids = np.full((1, 32), 20, np.int32)
    ids[0, 3], ids[0, 4:28], ids[0, 28] = (cfg.vision_start_token_id, cfg.video_token_id,
                                           cfg.vision_end_token_id)  # fmt: skip
    pixels = np.random.default_rng(0).normal(size=(96, cfg.vision.patch_dim)).astype(np.float32)
    inputs = model.prepare_inputs(ids, None, pixel_values_videos=pixels, video_grid_thw=[[6, 4, 4]])
    batch = jax.tree.map(lambda x: x[None], {"inputs": inputs, "loss_mask": ids > 0})
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    config = configs.base_config()
    tx = step_lib.make_optimizer(config)
    loss_fn = state_lib.lm_loss(16)
    step = jax.jit(
        step_lib.make_train_step(graphdef, tx, loss_fn, step_lib.learning_rate_schedule(config))
    )
    _, m = step(state_lib.new_state(params, tx), rest, batch)
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0


def _nll_case(length: int = 60, dim: int = 16, vocab: int = 4096):
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, length, dim)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(dim, vocab)) * 0.1, jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, size=(2, length)), jnp.int32)
    weights = np.zeros((2, length), np.float32)
    weights[0, 3:7], weights[1, 50:] = 1.0, 0.5  # most chunks of 8 have no target
    return hidden, weight, targets, jnp.asarray(weights)


def test_token_nll_matches_the_direct_sum():
    hidden, weight, targets, weights = _nll_case()

    def direct(h, w):
        logp = jax.nn.log_softmax(h @ w, axis=-1)
        return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * weights)

    def chunked(h, w):
        return step_lib.token_nll(h, lambda x: x @ w, targets, weights, chunk_size=8)

    (v, g), (v_ref, g_ref) = (
        jax.value_and_grad(f, (0, 1))(hidden, weight) for f in (chunked, direct)
    )
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    for a, b in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_token_nll_gradient_memory_does_not_grow_with_the_chunks():
    """The projection weight is not stacked once per chunk in the backward (it was, through the
    chunk-skipping cond: 129 copies of the 2.2 GB lm head at 128K tokens)."""
    hidden, weight, targets, weights = _nll_case(length=256)
    grad = jax.jit(
        jax.grad(
            lambda h, w: step_lib.token_nll(h, lambda x: x @ w, targets, weights, chunk_size=8),
            (0, 1),
        )
    )
    temp = grad.lower(hidden, weight).compile().memory_analysis().temp_size_in_bytes
    assert temp < 8 * weight.nbytes, (temp, weight.nbytes)  # stacked: > 32 (one per chunk)


def test_patch_rows_are_prepared_in_the_model_dtype():
    """bf16 models get bf16 patch rows from the host (the ViT's first op casts to bf16 anyway)."""
    from tests.tiny_videonsa import tiny_config
    from videonsa_jax.model.qwen2_5_vl import Qwen2_5_VL

    model = Qwen2_5_VL(tiny_config(), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    cfg = model.config
    ids = np.full((1, 12), 20, np.int32)
    ids[0, 3:7] = cfg.video_token_id
    pixels = np.random.default_rng(0).normal(size=(16, cfg.vision.patch_dim)).astype(np.float32)
    inputs = model.prepare_inputs(ids, None, pixel_values_videos=pixels, video_grid_thw=[[1, 4, 4]])
    assert inputs.pixel_rows.dtype == jnp.bfloat16
    np.testing.assert_array_equal(inputs.pixel_rows, pixels.astype(jnp.bfloat16))
