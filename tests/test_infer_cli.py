"""`python -m videonsa_jax.infer`: streams an answer; one clear error per user mistake."""

import os
import subprocess
import sys

import pytest
import tiny_videonsa as T

from videonsa_jax import infer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--min_pixels", "3136", "--max_pixels", "3136", "--dtype", "float32"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    return T.shared_checkpoint(), T.write_tiny_video(str(root / "v.mp4"))


def test_streams_answer(assets, capsys):
    model_dir, video = assets
    argv = ["--model", model_dir, "--video", video, "--question", "What moves?", *SMALL]
    assert infer.main([*argv, "--max_new_tokens", "6", "--fps", "4"]) == 0
    out, err = capsys.readouterr()
    assert "8 frames, grid (4, 4, 4)" in err and out.endswith("\n")

    model, tokenizer, config = infer.load(model_dir, dtype=infer.DTYPES["float32"])
    question = infer.encode_video_question(
        tokenizer, video, "What moves?", fps=4.0, min_pixels=3136, max_pixels=3136
    )
    pieces = []
    text = infer.answer(model, tokenizer, question, config.replace(max_new_tokens=6), pieces.append)
    assert "".join(pieces) == text and out == text + "\n"


def test_errors(assets, tmp_path, capsys):
    model_dir, video = assets
    base = ["--question", "Why?", *SMALL]
    assert infer.main(["--model", str(tmp_path / "nope"), "--video", video, *base]) == 2
    assert "error: model directory" in capsys.readouterr().err

    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    assert infer.main(["--model", model_dir, "--video", str(bad), *base]) == 2
    assert "error: cannot read the video" in capsys.readouterr().err

    too_long = ["--max_new_tokens", "4096"]
    assert infer.main(["--model", model_dir, "--video", video, *base, *too_long]) == 2
    err = capsys.readouterr().err
    assert "error: prompt too long" in err and "context of 2048 tokens" in err


def test_module_entry_point(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "videonsa_jax.infer",
            "--model",
            str(tmp_path),
            "--video",
            "x.mp4",
            "--question",
            "q",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: model directory {str(tmp_path)!r} has no config.json"
