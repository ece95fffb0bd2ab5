"""Synthetic long-video tasks (data/synthetic.py)."""

import json
import os

import numpy as np
import pytest

from videonsa_jax.data import synthetic
from videonsa_jax.processing import video as video_lib


def _coloured(frame):
    """Fraction of pixels that are clearly not grey."""
    f = frame.astype(int)
    return ((f.max(-1) - f.min(-1)) > 80).mean()


def _dominant_colour(frame):
    f = frame.reshape(-1, 3).astype(int)
    pixels = f[(f.max(-1) - f.min(-1)) > 80]
    mean = pixels.mean(0)
    return min(synthetic.COLOURS, key=lambda c: np.abs(np.array(synthetic.COLOURS[c]) - mean).sum())


@pytest.mark.parametrize("task", synthetic.TASKS)
def test_generate_task(tmp_path, task):
    path = synthetic.generate_dataset(
        str(tmp_path), task, 3, num_frames=16, size=56, fps=4.0, seed=7, progress=False
    )
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == 3
    for row in rows:
        frames, meta = video_lib.load_video(os.path.join(tmp_path, row["video"]), fps=4.0)
        assert frames.shape == (16, 56, 56, 3) and meta.source_fps == pytest.approx(4.0)
        human, gpt = row["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<video>\n")
        assert gpt == {"from": "gpt", "value": row["answer"]}
        event = {t for span in row["event_frames"] for t in span}
        for t in range(16):
            assert (_coloured(frames[t]) > 0.1) == (t in event), (row["id"], t)
        answer = row["choices"][row["answer_index"]]
        if task == "needle":
            assert _dominant_colour(frames[row["event_frames"][0][0]]) == answer
        elif task == "order":
            first = _dominant_colour(frames[row["event_frames"][0][0]])
            second = _dominant_colour(frames[row["event_frames"][1][0]])
            assert first == answer and second != answer
        else:
            assert answer == str(len(row["event_frames"]))
            starts = [span[0] for span in row["event_frames"]]
            assert all(
                b - a > 2 for a, b in zip(starts, starts[1:], strict=False)
            )  # separated events


def test_deterministic_and_prefix_stable(tmp_path):
    a = synthetic.generate_dataset(
        str(tmp_path / "a"), "needle", 2, num_frames=8, seed=3, progress=False
    )
    b = synthetic.generate_dataset(
        str(tmp_path / "b"), "needle", 3, num_frames=8, seed=3, progress=False
    )
    rows_a, rows_b = open(a).readlines(), open(b).readlines()
    assert rows_a == rows_b[:2]
    video_a = tmp_path / "a" / "videos" / "needle_00001.mp4"
    video_b = tmp_path / "b" / "videos" / "needle_00001.mp4"
    assert video_a.read_bytes() == video_b.read_bytes()  # the encoder is single-threaded
    fa, _ = video_lib.load_video(video_a, fps=2.0)
    fb, _ = video_lib.load_video(video_b, fps=2.0)
    np.testing.assert_array_equal(fa, fb)


def test_too_few_frames_for_counting(tmp_path):
    with pytest.raises(ValueError, match="num_frames"):
        synthetic.generate_dataset(str(tmp_path), "counting", 1, num_frames=12, progress=False)


def test_cli(tmp_path):
    synthetic.main(
        ["--out", str(tmp_path), "--task", "all", "--n", "1", "--num-frames", "14", "--size", "28"]
    )
    for task in synthetic.TASKS:
        assert os.path.exists(tmp_path / f"{task}.jsonl")
    assert os.path.exists(tmp_path / "tokenizer.json")
    assert os.path.exists(tmp_path / "tokenizer_config.json")
