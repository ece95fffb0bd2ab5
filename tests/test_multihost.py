"""Two CPU processes on localhost (jax.distributed, gloo collectives) train the tiny config through
the train CLI on one mesh (fsdp 2 x context 2 over 2 x 2 devices), each reading only its own batch
rows, checkpoint, and resume; with context 4 the two processes share (and both read) all rows."""

import os
import re
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(workdir: str, num_steps: int, fsdp: int = 2, context: int = 2) -> list[str]:
    """Runs the CLI in 2 processes; returns their outputs (asserting they succeed)."""
    port = _free_port()
    flags = [
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        f"--config.train.num_steps={num_steps}",
        "--config.train.save_every=1",
        "--config.train.log_every=1",
        "--config.eval.every=0",
        "--config.data.synthetic.num_train=8",
        "--config.data.synthetic.num_eval=0",
        "--config.data.synthetic.num_frames=8",
        "--config.data.batch_size=2",
        "--config.data.num_patches=512",
        "--config.data.max_length=90",
        "--config.data.shuffle=False",
        "--config.mesh.data=1",
        f"--config.mesh.fsdp={fsdp}",
        f"--config.mesh.context={context}",
    ]
    procs = []
    for i in range(2):
        env = dict(
            os.environ,
            XLA_FLAGS="--xla_force_host_platform_device_count=2",
            JAX_PLATFORMS="cpu",
            JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
            PYTHONPATH=REPO,
        )
        cmd = [sys.executable, "-m", "videonsa_jax.train", *flags]
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        outputs.append(out)
    for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
    return outputs


def _rows(outputs: list[str]) -> list[str]:
    """Each process's "reads batch rows [a, b) of B" log line."""
    return [re.search(r"process \d reads batch rows .*", out).group() for out in outputs]


def test_two_processes_train_checkpoint_and_resume(tmp_path):
    workdir = str(tmp_path / "run")
    first = _train(workdir, num_steps=1)
    assert "2 processes" in first[0], first[0][-2000:]
    own_rows = ["process 0 reads batch rows [0, 1) of 2", "process 1 reads batch rows [1, 2) of 2"]
    assert _rows(first) == own_rows
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "1"))
    second = _train(workdir, num_steps=2)
    assert "training steps 2..2" in second[0], second[0][-2000:]
    assert _rows(second) == own_rows
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))


@pytest.mark.slow  # ~80 s; the test above runs the same path in the CPU suite
def test_two_processes_sharing_the_batch_rows(tmp_path):
    outputs = _train(str(tmp_path / "run"), num_steps=1, fsdp=1, context=4)
    assert _rows(outputs) == [f"process {i} reads batch rows [0, 2) of 2" for i in range(2)]
