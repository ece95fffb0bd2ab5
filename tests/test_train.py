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


def run_train(workdir, *overrides, config="configs/tiny.py", timeout=600):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    cmd = [sys.executable, "-m", "videonsa_jax.train", f"--config={config}",
           f"--workdir={workdir}", *overrides]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_trains_evaluates_and_checkpoints(tmp_path):
    steps = ["--config.train.num_steps=6", "--config.eval.every=6", "--config.train.save_every=3"]
    result = run_train(tmp_path, *FAST, *steps, "--config.optim.warmup_ratio=0.2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 6/6 (100%)" in result.stderr and "ETA" in result.stderr
    scalars = metrics.read_scalars(str(tmp_path))
    loss = scalars["train/loss"]
    assert sorted(loss) == [1, 2, 3, 4, 5, 6]
    assert loss[6] < loss[1] - 0.5  # it learns (mostly the answer format at first)
    for tag in ("train/learning_rate", "train/grad_norm", "train/tokens_per_sec",
                "train/step_time", "train/skipped_samples", "eval/accuracy"):  # fmt: skip
        assert tag in scalars, tag
    assert 0.0 <= scalars["eval/accuracy"][6] <= 1.0
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]


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
    assert "config.model.init_from='/does/not/exist' is not a directory" in result.stderr
    assert "Traceback" not in result.stderr
