"""Checkpoints: exact resume after kill -9, SIGTERM saves, corrupt latest falls back."""

import logging
import os
import shutil
import signal
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from videonsa_jax import train
from videonsa_jax.model.layers import Linear
from videonsa_jax.parallel import create_mesh
from videonsa_jax.training import checkpointing, configs, metrics
from videonsa_jax.training import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A 1-layer model, a 1-block ViT, 8 steps, a checkpoint every 2 steps, every step logged.
RUN = [
    "--config=configs/tiny.py:dense",
    "--config.data.synthetic.num_train=32",
    "--config.data.synthetic.num_eval=4",
    "--config.data.batch_size=2",
    "--config.data.num_patches=512",
    "--config.model.text.num_layers=1",
    "--config.model.vision.depth=1",
    "--config.model.vision.fullatt_block_indexes=(0,)",
    "--config.train.num_steps=8",
    "--config.train.save_every=2",
    "--config.train.log_every=1",
    "--config.eval.every=0",
]


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    """The training subprocesses share compiled programs (same model and shapes): faster tests."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "jax_cache"))
        patch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        yield


def _command(workdir):
    return [sys.executable, "-m", "videonsa_jax.train", f"--workdir={workdir}", *RUN]


def _env():
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _run_until(workdir, pattern, sig):
    """Starts training, sends `sig` once a log line contains `pattern`; returns (rc, log)."""
    proc = subprocess.Popen(_command(workdir), cwd=REPO, env=_env(), text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if pattern in line:
            proc.send_signal(sig)
            break
    lines.append(proc.communicate(timeout=300)[1])
    return proc.returncode, "".join(lines)


def _shared_data(tmp_path, *workdirs):
    """Generates the synthetic data once and copies it into each workdir (video encoding is not
    bit-reproducible across runs, so both runs must read the same files)."""
    config = configs.load_config_file(os.path.join(REPO, "configs/tiny.py"), "dense")
    config.data.synthetic.num_train, config.data.synthetic.num_eval = 32, 4
    train.prepare_data(config, str(tmp_path / "shared"))
    for workdir in workdirs:
        shutil.copytree(tmp_path / "shared" / "data", workdir / "data")


def test_kill9_then_sigterm_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _shared_data(tmp_path, straight, resumed)
    reference = subprocess.Popen(_command(straight), cwd=REPO, env=_env(), text=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip

    rc, log = _run_until(resumed, "checkpoint: saving step 4", signal.SIGKILL)
    assert rc == -signal.SIGKILL, log[-3000:]

    rc, log = _run_until(resumed, "step 6/8", signal.SIGTERM)
    assert rc == 0, log[-3000:]
    assert "restored step" in log
    assert "termination signal: saved step" in log
    stopped_at = int(log.split("termination signal: saved step ")[1].split(",")[0])
    assert stopped_at < 8
    assert str(stopped_at) in os.listdir(resumed / "checkpoints")

    result = subprocess.run(_command(resumed), cwd=REPO, env=_env(), text=True,
                            capture_output=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"restored step {stopped_at}" in result.stderr

    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]
    expected = metrics.read_scalars(str(straight))["train/loss"]
    got = metrics.read_scalars(str(resumed))["train/loss"]
    assert sorted(expected) == sorted(got) == list(range(1, 9))
    assert got == expected  # exactly, step by step


class _Toy(nnx.Module):
    def __init__(self, width=8):
        self.a = Linear(4, width, use_bias=True, axes=("embed", "mlp"), rngs=nnx.Rngs(0))


def _toy_state(seed, width=8):
    tx = optax.adamw(1e-3)
    params = jax.tree.map(lambda x: x + seed, nnx.state(_Toy(width), nnx.Param))
    abstract_model = nnx.eval_shape(lambda: _Toy(width))
    mesh = create_mesh({"data": -1})
    rules = (("embed", None), ("mlp", None))
    _, abstract, shardings = state_lib.abstract_state(abstract_model, tx, mesh, rules)
    return state_lib.init_state(None, tx, shardings, params), abstract


def _corrupt(directory):
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")


def test_corrupt_latest_falls_back_to_previous_with_a_warning(tmp_path, caplog):
    directory = str(tmp_path / "checkpoints")
    data = iter(grain.MapDataset.range(100).to_iter_dataset())
    checkpointer = checkpointing.Checkpointer(directory, save_every=1, keep=3)
    states = {}
    for step in (1, 2):
        next(data)
        states[step], abstract = _toy_state(step)
        checkpointer.save(step, states[step], data)
        checkpointer.wait()
    checkpointer.close()
    _corrupt(os.path.join(directory, "2", "state"))
    os.makedirs(os.path.join(directory, "3.orbax-checkpoint-tmp"))  # an interrupted save

    data = iter(grain.MapDataset.range(100).to_iter_dataset())
    checkpointer = checkpointing.Checkpointer(directory, save_every=1, keep=3)
    with caplog.at_level(logging.WARNING):
        restored, step = checkpointer.restore_latest(abstract, data)
    assert step == 1
    assert any("step 2" in r.getMessage() and "falling back" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert next(data) == 1  # the iterator position saved with step 1
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(states[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert os.path.isdir(tmp_path / "corrupt_checkpoints" / "2")

    # A state of another shape (another config) restores from nothing and moves nothing.
    with pytest.raises(checkpointing.CheckpointError, match="config match"):
        checkpointer.restore_latest(_toy_state(0, width=16)[1], data)
    assert os.listdir(directory) == ["1"]

    # Step 2 can be saved again, and restores.
    checkpointer.save(2, states[2], data)
    checkpointer.wait()
    restored, step = checkpointer.restore_latest(abstract, data)
    assert step == 2
    assert jnp.array_equal(
        restored.params["a"]["kernel"][...], states[2].params["a"]["kernel"][...]
    )
    checkpointer.close()
