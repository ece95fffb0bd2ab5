"""Benchmark formats, answer extraction, the resumable harness and its metrics (no model needed)."""

import json
import os

import pytest

from videonsa_jax.evaluation import harness
from videonsa_jax.evaluation import tasks as tasks_lib


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()


def _write_json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)


# -- synthetic datasets in each public format -----------------------------------------------------


def make_longvideobench(root):
    rows = [
        {
            "id": "v0_q0",
            "video_path": "v0.mp4",
            "question": "What is red?",
            "candidates": ["ball", "sky", "grass"],
            "correct_choice": 0,
            "question_category": "S2E",
            "duration_group": 15,
        },
        {
            "id": "v1_q0",
            "video_path": "v1.mp4",
            "question": "What moves?",
            "option0": "car",
            "option1": "tree",
            "option2": "N/A",
            "option3": "N/A",
            "option4": "N/A",
            "correct_choice": 1,
            "question_category": "T3O",
            "duration_group": 600,
        },
    ]
    _write_json(f"{root}/lvb_val.json", rows)
    for r in rows:
        _touch(f"{root}/videos/{r['video_path']}")
    return f"{root}/lvb_val.json", f"{root}/videos"


def make_mlvu(root):
    _write_json(
        f"{root}/json/1_plotQA.json",
        [
            {
                "video": "a.mp4",
                "duration": 400.0,
                "question": "Who enters first?",
                "candidates": ["the dog", "the cat", "the man", "the woman"],
                "answer": "the man",
                "question_type": "plotQA",
            },
        ],
    )
    _write_json(
        f"{root}/json/4_count.json",
        [
            {
                "video": "b.mp4",
                "duration": 300.0,
                "question": "How many jumps?",
                "candidates": ["1", "2", "3", "4"],
                "answer": "2",
                "question_type": "count",
            },
            {
                "video": "c.mp4",
                "duration": 200.0,
                "question": "How many cars?",
                "candidates": ["5", "6", "7", "8"],
                "answer": "8",
                "question_type": "count",
            },
        ],
    )
    _write_json(
        f"{root}/json/9_summary.json",
        [
            {
                "video": "d.mp4",
                "question": "Summarize.",
                "answer": "text",
                "question_type": "summary",
            }
        ],
    )
    for task, video in [("1_plotQA", "a"), ("4_count", "b"), ("4_count", "c")]:
        _touch(f"{root}/video/{task}/{video}.mp4")
    return f"{root}/json", f"{root}/video"


def make_timescope(root):
    rows = [
        {
            "id": 0,
            "video": "n0.mp4",
            "question": "What was written?\nA. cat\nB. dog\nC. owl",
            "answer": "B",
            "type": "OCR",
            "length": 60,
        },
        {
            "id": 1,
            "video": "n1.mp4",
            "question": "What happened?",
            "options": ["x", "y", "z"],
            "answer": "C",
            "type": "QA",
            "length": 3600,
        },
    ]
    os.makedirs(root, exist_ok=True)
    with open(f"{root}/timescope.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    _touch(f"{root}/videos/n0.mp4")
    _touch(f"{root}/videos/n1.mp4")
    return f"{root}/timescope.jsonl", f"{root}/videos"


def make_tomato(root):
    _write_json(
        f"{root}/data/count.json",
        {
            "0": {
                "question": "How many spins?",
                "options": ["2", "1", "3"],
                "answer": 2,
                "key": "0209-03",
                "demonstration_type": "human",
            },
        },
    )
    _write_json(
        f"{root}/data/direction.json",
        {
            "0": {
                "question": "Which way?",
                "options": ["left", "right"],
                "answer": 0,
                "key": "0001-00",
                "demonstration_type": "simulated",
            },
        },
    )
    _touch(f"{root}/videos/human/0209-03.mp4")
    _touch(f"{root}/videos/simulated/0001-00.mp4")
    return f"{root}/data", f"{root}/videos"


def make_vsibench(root):
    rows = [
        {
            "id": 1,
            "dataset": "scannet",
            "scene_name": "s0",
            "question_type": "object_counting",
            "question": "How many chairs?",
            "options": None,
            "ground_truth": "4",
        },
        {
            "id": 2,
            "dataset": "arkitscenes",
            "scene_name": "s1",
            "question_type": "object_rel_direction_hard",
            "question": "Where is the lamp?",
            "options": ["A. left", "B. right", "C. back"],
            "ground_truth": "B",
        },
        {
            "id": 3,
            "dataset": "scannet",
            "scene_name": "s0",
            "question_type": "object_rel_direction_easy",
            "question": "Where is the bed?",
            "options": ["A. left", "B. right"],
            "ground_truth": "A",
        },
    ]
    _write_json(f"{root}/test.json", rows)
    _touch(f"{root}/videos/scannet/s0.mp4")
    _touch(f"{root}/videos/arkitscenes/s1.mp4")
    return f"{root}/test.json", f"{root}/videos"


MAKERS = {
    "longvideobench": make_longvideobench,
    "mlvu": make_mlvu,
    "timescope": make_timescope,
    "tomato": make_tomato,
    "vsibench": make_vsibench,
}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_formats_load(tmp_path, name):
    annotations, video_dir = MAKERS[name](str(tmp_path))
    samples = tasks_lib.get_task(name).load(annotations, video_dir)
    assert samples and len({s.id for s in samples}) == len(samples)
    tasks_lib.check_videos(samples)
    for s in samples:
        if s.kind == "choice":
            assert s.answer in tasks_lib.LETTERS[: len(s.options)]
            for letter, option in zip(tasks_lib.LETTERS, s.options, strict=False):
                assert option in s.prompt, (letter, s.prompt)


def test_format_details(tmp_path):
    lvb = tasks_lib.load_longvideobench(*make_longvideobench(str(tmp_path / "lvb")))
    assert lvb[0].prompt == (
        "What is red?\nA. ball\nB. sky\nC. grass\n"
        "Answer with the option's letter from the given choices directly.\n"
    )
    assert lvb[1].options == ("car", "tree") and lvb[1].answer == "B"
    assert lvb[1].groups == {"question_category": "T3O", "duration_group": "600"}

    mlvu = tasks_lib.load_mlvu(*make_mlvu(str(tmp_path / "mlvu")))
    assert [s.answer for s in mlvu] == ["C", "B", "D"]  # Summary rows are skipped.
    assert mlvu[0].prompt.endswith("(D) the woman\nOnly give the best option.\nBest option: (")
    assert mlvu[0].video.endswith("video/1_plotQA/a.mp4")
    assert [s.category for s in mlvu] == ["plotQA", "count", "count"]

    ts = tasks_lib.load_timescope(*make_timescope(str(tmp_path / "ts")))
    assert ts[0].options == ("cat", "dog", "owl")
    assert ts[1].prompt.startswith("What happened?\nA. x\nB. y\nC. z\nAnswer with")

    tomato = tasks_lib.load_tomato(*make_tomato(str(tmp_path / "tomato")))
    assert [(s.answer, s.category) for s in tomato] == [("C", "count"), ("A", "direction")]
    assert tomato[0].video.endswith("videos/human/0209-03.mp4")

    vsi = tasks_lib.load_vsibench(*make_vsibench(str(tmp_path / "vsi")))
    assert [s.kind for s in vsi] == ["number", "choice", "choice"]
    assert vsi[1].category == "object_rel_direction" and vsi[1].options == ("left", "right", "back")
    assert vsi[0].answer == "4"

    with pytest.raises(FileNotFoundError, match="1 video file"):
        os.remove(vsi[1].video)
        tasks_lib.check_videos(vsi)


@pytest.mark.parametrize(
    "response, expected",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B) the man", "B"),
        ("C: three", "C"),
        ("Answer: B", "B"),
        ("The answer is (C).", "C"),
        ("The best option is D, because", "D"),
        ("**A**", "A"),
        ("I think it is B.", "B"),
        ("A man opens the door, so the answer is C", "C"),
        ("A", "A"),
        ("A cat sits on the mat.", None),
        ("The dog runs away", "A"),  # The text of option A.
        ("", None),
        ("E", None),  # Not one of the four options.
        ("option B", "B"),
    ],
)
def test_extract_choice(response, expected):
    options = ("the dog runs away", "a bird", "the cat", "nothing")
    assert tasks_lib.extract_choice(response, options) == expected


def test_numbers_and_mra():
    assert tasks_lib.extract_number("about 3.5 meters") == 3.5
    assert tasks_lib.extract_number("Three chairs") == 3.0
    assert tasks_lib.extract_number("none") is None
    assert tasks_lib.mean_relative_accuracy(4.0, 4.0) == 1.0
    assert tasks_lib.mean_relative_accuracy(None, 4.0) == 0.0
    # 10% error passes thresholds 0.50..0.90 (9 of 10).
    assert tasks_lib.mean_relative_accuracy(4.4, 4.0) == pytest.approx(0.9)
    assert tasks_lib.mean_relative_accuracy(10.0, 4.0) == 0.0


def _oracle(samples):
    """Answers correctly, in a different format per sample."""
    out = []
    for i, s in enumerate(samples):
        if s.kind == "number":
            out.append(f"{s.answer} units")
        else:
            out.append([s.answer, f"({s.answer})", f"The answer is {s.answer}."][i % 3])
    return out


def test_harness_metrics_and_reports(tmp_path):
    task = tasks_lib.get_task("vsibench")
    samples = task.load(*make_vsibench(str(tmp_path / "data")))
    responses = {"1": "4", "2": "C", "3": "(A) left"}
    result = harness.evaluate(
        task,
        samples,
        [lambda batch: [responses[s.id] for s in batch]],
        str(tmp_path / "run"),
        progress=False,
    )
    groups = result["groups"]["question_type"]
    assert groups["object_counting"] == {"n": 1, "acc": 1.0}
    assert groups["object_rel_direction"] == {"n": 2, "acc": 0.5}
    assert result["micro"] == pytest.approx(2 / 3)
    assert result["macro"] == pytest.approx(0.75)
    with open(tmp_path / "run" / "results.json") as f:
        assert json.load(f)["macro"] == pytest.approx(0.75)
    md = (tmp_path / "run" / "results.md").read_text()
    assert "**75.00** (macro average" in md and "| object_rel_direction | 2 | 50.00 |" in md
    lines = (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(x)["pred"] for x in lines] == ["4", "C", "A"]


class _Interrupt(BaseException):
    pass


def test_harness_resumes_from_cache(tmp_path):
    task = tasks_lib.get_task("mlvu")
    samples = task.load(*make_mlvu(str(tmp_path / "data")))
    workdir = str(tmp_path / "run")
    calls = []

    def flaky(batch):
        if len(calls) == 2:
            raise _Interrupt()  # Like a KeyboardInterrupt: not caught per sample.
        calls.extend(s.id for s in batch)
        return _oracle(batch)

    with pytest.raises(_Interrupt):
        harness.evaluate(task, samples, [flaky], workdir, progress=False)
    assert len(calls) == 2

    seen = []

    def counting(batch):
        seen.extend(s.id for s in batch)
        return _oracle(batch)

    result = harness.evaluate(task, samples, [counting], workdir, progress=False)
    assert seen == [samples[2].id]  # Only the sample the interrupted run did not finish.
    assert result["micro"] == 1.0 and result["macro"] == 1.0

    with pytest.raises(ValueError, match="other settings"):
        harness.evaluate(
            task, samples, [counting], workdir, run_config={"fps": 4.0}, progress=False
        )


def test_harness_errors_parallel_workers_and_processes(tmp_path):
    task = tasks_lib.get_task("longvideobench")
    base = task.load(*make_longvideobench(str(tmp_path / "data")))
    samples = [
        tasks_lib.Sample(**{**s.__dict__, "id": f"{s.id}-{i}"}) for i in range(5) for s in base
    ]

    def predictor(batch):
        if any(s.id.endswith("-3") and s.answer == "B" for s in batch):
            raise RuntimeError("cannot decode video")
        return _oracle(batch)

    workdir = str(tmp_path / "run")
    # Two "processes" sharing the workdir; process 0 aggregates after the barrier.
    assert (
        harness.evaluate(
            task,
            samples,
            [predictor, predictor],
            workdir,
            batch_size=2,
            process_index=1,
            process_count=2,
            progress=False,
        )
        is None
    )
    result = harness.evaluate(
        task,
        samples,
        [predictor, predictor],
        workdir,
        batch_size=2,
        process_index=0,
        process_count=2,
        progress=False,
    )
    assert result["n"] == 10
    assert list(result["errors"]) == ["v1_q0-3"]
    assert "cannot decode video" in result["errors"]["v1_q0-3"]
    assert result["micro"] == pytest.approx(0.9)
    assert set(result["groups"]) == {"question_category", "duration_group"}
    assert result["groups"]["duration_group"]["600"] == {"n": 5, "acc": 0.8}


def test_evaluate_end_to_end_on_two_devices(tmp_path, capsys):
    """The evaluate CLI path on a tiny random checkpoint, two device replicas, then a resume."""
    import tiny_videonsa as T

    from videonsa_jax import evaluate
    from videonsa_jax.training.configs import load_config_file

    model_dir = T.shared_checkpoint()
    rows = []
    for i in range(3):
        T.write_tiny_video(str(tmp_path / "videos" / f"n{i}.mp4"))
        rows.append(
            {
                "id": i,
                "video": f"n{i}.mp4",
                "question": "Which?\nA. red\nB. blue",
                "answer": "AB"[i % 2],
                "type": "QA",
                "length": 2,
            }
        )
    with open(tmp_path / "ts.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    config = load_config_file(
        os.path.join(os.path.dirname(__file__), "../configs/eval/timescope.py")
    )
    config.update(
        dict(
            annotations=str(tmp_path / "ts.jsonl"),
            video_dir=str(tmp_path / "videos"),
            workdir=str(tmp_path / "run"),
            min_pixels=3136,
            max_pixels=3136,
            max_new_tokens=2,
            dtype="float32",
            num_devices=2,
            length_multiple=64,
        )
    )
    result = evaluate.run(config, model_dir)
    assert result["n"] == 3 and not result["errors"]
    lines = (tmp_path / "run" / "predictions.0.jsonl").read_text().splitlines()
    assert len(lines) == 3
    again = evaluate.run(config, model_dir)  # Everything cached: nothing is predicted again.
    assert again["micro"] == result["micro"]
    assert len((tmp_path / "run" / "predictions.0.jsonl").read_text().splitlines()) == 3


def test_cli_reports_a_missing_annotation_file_in_one_line(tmp_path):
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "videonsa_jax.evaluate",
            "--config=configs/eval/timescope.py",
            f"--model={tmp_path}",
            f"--config.annotations={tmp_path}/missing.jsonl",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"error: annotation file not found: {tmp_path}/missing.jsonl" in proc.stderr
