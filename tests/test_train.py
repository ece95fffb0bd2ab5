"""The training CLI on the tiny config (subprocesses, a few steps)."""

import os
import subprocess
import sys

import pytest

from videonsa_jax.training import metrics

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
                "train/step_time", "train/skipped_samples", "eval/accuracy"):  # fmt: skip
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
    # The trained model starts far below the from-scratch loss (~ln 512 = 6.2).
    assert metrics.read_scalars(str(tmp_path))["train/loss"][1] < 4.0


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
