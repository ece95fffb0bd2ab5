"""The five long-video benchmarks in their public annotation formats.

Each task turns an annotation file (or directory) plus a local video directory into `Sample`s: the
video path, the user text that follows the video in the chat prompt (question, options and the
task's answer instruction, as in the VideoNSA / lmms-eval protocol), the gold answer and the
categories it is reported under. `score` parses a model response and grades it.

Formats read (fields beyond these are ignored):

  longvideobench  `lvb_val.json`: a list of {id, video_path, question, candidates |
                  option0..option4, correct_choice (int), question_category, duration_group};
                  videos at `video_dir/video_path`.
  mlvu            the MLVU `json/` directory (`1_plotQA.json`, ...; one list per task of {video,
                  question, candidates, answer (the correct candidate's text), question_type}),
                  videos at `video_dir/<json stem>/<video>`; or one file of rows {video_name |
                  video, question, candidates, answer (letter or text), task_type}. Rows without
                  candidates (the open-ended sub_scene / summary tasks) are skipped.
  timescope       rows {id, video, question | input, options | candidates (optional when the
                  question already lists "A. ..." lines), answer (letter), type, length}.
  tomato          the TOMATO `data/` directory (`count.json`, `direction.json`, ...; each a dict
                  id -> {question, options, answer (int), key, demonstration_type}), videos at
                  `video_dir/<demonstration_type>/<key>.mp4`; or rows {id, question, options,
                  answer, video_path, reason_type, demonstration_type}.
  vsibench        rows {id, dataset, scene_name, question_type, question, options (list of
                  "A. ..." strings, or null for numeric questions), ground_truth}; videos at
                  `video_dir/<dataset>/<scene_name>.mp4`.

A file is JSON (a list, or a dict of rows keyed by id) or JSON Lines. Headline numbers: the
sample-level accuracy ("micro") for LongVideoBench, TimeScope and TOMATO; the mean over categories
("macro") for MLVU (M-Avg over its task types) and VSI-Bench (mean over question types, numeric
ones scored by mean relative accuracy).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

LETTERS = "ABCDEFGHIJ"
LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."


@dataclasses.dataclass(frozen=True)
class Sample:
    """One benchmark question.

    id: unique within the task (the prediction cache key).
    video: path of the video file.
    prompt: the user text placed right after the video in the chat prompt.
    options: the option texts, in letter order (empty for numeric questions).
    answer: the gold letter, or the gold number as a string when `kind == "number"`.
    groups: category name per grouping, e.g. {"question_category": "T3O", "duration_group": "600"};
        the first grouping is the task's main category.
    kind: "choice" (graded by the parsed letter) or "number" (mean relative accuracy).
    """

    id: str
    video: str
    prompt: str
    options: tuple[str, ...]
    answer: str
    groups: dict[str, str]
    kind: Literal["choice", "number"] = "choice"

    @property
    def category(self) -> str:
        return next(iter(self.groups.values()), "all")


@dataclasses.dataclass(frozen=True)
class Task:
    """A benchmark: how to read it, how long an answer may be, which average it reports."""

    name: str
    load: Callable[[str, str], list[Sample]]  # (annotations, video_dir) -> samples
    max_new_tokens: int
    headline: Literal["micro", "macro"]


# -- answer extraction -----------------------------------------------------------------------------

_ANSWER_PHRASE = re.compile(
    r"(?i:answer|option|choice)(?:\s+(?i:is|would be|should be))?\s*[:：]?\s*"
    r"[\(\[]?([A-J])(?![A-Za-z])"
)
_LEADING = re.compile(r"^[\(\[\*\s]*([A-J])(?:[\)\]\.:,\*]|$)")
_LEADING_BARE = re.compile(r"^([A-J])\s+(\S)")
_BRACKETED = re.compile(r"[\(\[]([A-J])[\)\]]")
_PUNCTUATED = re.compile(r"(?<![A-Za-z0-9])([A-J])[\.\):](?![A-Za-z0-9])")
_ISOLATED = re.compile(r"(?<![A-Za-z0-9'])([A-J])(?![A-Za-z0-9'])")
_OPTION_LINE = re.compile(r"^\s*\(?([A-J])[\.\):]\s*(.+?)\s*$", re.MULTILINE)
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)?")
_NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve".split()
    )
}


def extract_choice(response: str, options: Sequence[str] = (), num_options: int = 0) -> str | None:
    """The option letter a free-form response picks, or None when it names none.

    Tried in order: an answer phrase ("Answer: B", "the answer is (C)", "Option D"); a leading
    letter ("B", "(B) ...", "B. ...", "B) ...", "B: ..."; a bare leading "A"/"I" followed by a word
    is read as an article or pronoun); a bracketed "(B)"; a punctuated "B." / "B)"; an isolated
    capital letter; finally the one option whose text the response contains. Only letters of the
    question's options count.
    """
    n = num_options or len(options) or 5
    valid = LETTERS[:n]
    text = response.strip()
    if not text:
        return None

    for match in _ANSWER_PHRASE.finditer(text):
        if match.group(1) in valid:
            return match.group(1)
    match = _LEADING.match(text)
    if match and match.group(1) in valid:
        return match.group(1)
    match = _LEADING_BARE.match(text)
    if (
        match
        and match.group(1) in valid
        and not (match.group(1) in "AI" and match.group(2).islower())
    ):
        return match.group(1)
    for pattern in (_BRACKETED, _PUNCTUATED):
        for match in pattern.finditer(text):
            if match.group(1) in valid:
                return match.group(1)
    for match in _ISOLATED.finditer(text):
        letter, rest = match.group(1), text[match.end() :]
        if letter in valid and not (letter in "AI" and re.match(r"\s+[a-z]", rest)):
            return letter
    lowered = _normalize(text)
    hits = [i for i, option in enumerate(options) if option and _normalize(option) in lowered]
    if len(hits) == 1:
        return valid[hits[0]]
    return None


def extract_number(response: str) -> float | None:
    """The first number in a response ("3", "2.5 meters", "three"), or None."""
    match = _NUMBER.search(response)
    if match:
        return float(match.group(0).replace(",", "."))
    for word in re.findall(r"[a-z]+", response.lower()):
        if word in _NUMBER_WORDS:
            return float(_NUMBER_WORDS[word])
    return None


def mean_relative_accuracy(pred: float | None, target: float) -> float:
    """VSI-Bench MRA: mean over theta in {0.50, 0.55, ..., 0.95} of [|pred - target| / target <=
    1 - theta]; 0 for a missing prediction."""
    if pred is None or target == 0:
        return float(pred == target)
    error = abs(pred - target) / abs(target)
    thresholds = [0.5 + 0.05 * i for i in range(10)]
    return sum(error <= 1 - t + 1e-9 for t in thresholds) / len(thresholds)


def score(sample: Sample, response: str) -> tuple[str | None, float]:
    """(parsed prediction, score in [0, 1]) of a response to `sample`."""
    if sample.kind == "number":
        value = extract_number(response)
        pred = None if value is None else f"{value:g}"
        return pred, mean_relative_accuracy(value, float(sample.answer))
    pred = extract_choice(response, sample.options)
    return pred, float(pred == sample.answer)


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


# -- annotation readers ----------------------------------------------------------------------------


def read_rows(path: str) -> list[dict[str, Any]]:
    """Rows of a JSON file (a list, or a dict keyed by id: the key becomes "id" when absent) or a
    JSON Lines file."""
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: neither JSON nor JSON Lines ({e})") from e
    if isinstance(data, dict):
        return [{"id": key, **row} if "id" not in row else row for key, row in data.items()]
    if isinstance(data, list):
        return data
    raise ValueError(f"{path}: expected a list or a dict of rows, got {type(data).__name__}")


def _annotation_files(path: str) -> list[str]:
    """The file itself, or the *.json / *.jsonl files of a directory (sorted)."""
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, f) for f in os.listdir(path) if f.endswith((".json", ".jsonl"))
        )
        if not files:
            raise FileNotFoundError(f"{path}: no .json / .jsonl annotation files")
        return files
    if not os.path.exists(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    return [path]


def _first_existing(*paths: str) -> str:
    return next((p for p in paths if os.path.exists(p)), paths[0])


def _letter(index: int, n: int) -> str:
    if not 0 <= index < n:
        raise ValueError(f"answer index {index} out of range for {n} options")
    return LETTERS[index]


def _answer_letter(answer: Any, options: Sequence[str]) -> str:
    """A gold answer given as an index, a letter ("B", "(B)") or the correct option's text."""
    if isinstance(answer, int):
        return _letter(answer, len(options))
    text = str(answer).strip()
    if text in options:
        return LETTERS[list(options).index(text)]
    match = re.fullmatch(r"\(?([A-J])\)?\.?", text)
    if match:
        return match.group(1)
    raise ValueError(f"cannot read the gold answer {answer!r} against options {list(options)}")


def _format_options(options: Sequence[str], style: str) -> str:
    fmt = {"dot": "{}. {}", "paren": "({}) {}"}[style]
    return "\n".join(fmt.format(LETTERS[i], o) for i, o in enumerate(options))


def _options_in_text(question: str) -> tuple[str, ...]:
    return tuple(text for _, text in _OPTION_LINE.findall(question))


def load_longvideobench(annotations: str, video_dir: str) -> list[Sample]:
    samples = []
    for path in _annotation_files(annotations):
        for row in read_rows(path):
            if "candidates" in row:
                options = tuple(row["candidates"])
            else:
                options = tuple(
                    row[f"option{i}"]
                    for i in range(5)
                    if row.get(f"option{i}") not in (None, "N/A", "")
                )
            prompt = f"{row['question']}\n{_format_options(options, 'dot')}\n{LETTER_INSTRUCTION}\n"
            samples.append(
                Sample(
                    id=str(row["id"]),
                    video=os.path.join(video_dir, row["video_path"]),
                    prompt=prompt,
                    options=options,
                    answer=_letter(int(row["correct_choice"]), len(options)),
                    groups={
                        "question_category": str(row.get("question_category", "all")),
                        "duration_group": str(row.get("duration_group", "all")),
                    },
                )
            )
    return samples


def load_mlvu(annotations: str, video_dir: str) -> list[Sample]:
    samples = []
    for path in _annotation_files(annotations):
        stem = os.path.splitext(os.path.basename(path))[0]
        default_type = re.sub(r"^\d+_", "", stem)
        for i, row in enumerate(read_rows(path)):
            options = tuple(row.get("candidates") or ())
            if not options:
                continue  # Open-ended generation tasks (sub-scene captioning, summary).
            video = row.get("video") or row["video_name"]
            question = row["question"]
            if not _options_in_text(question):
                question = f"{question}\n{_format_options(options, 'paren')}"
            task_type = str(row.get("question_type") or row.get("task_type") or default_type)
            samples.append(
                Sample(
                    id=str(row.get("question_id") or row.get("id") or f"{stem}/{i}"),
                    video=_first_existing(
                        os.path.join(video_dir, stem, video), os.path.join(video_dir, video)
                    ),
                    prompt=f"{question}\nOnly give the best option.\nBest option: (",
                    options=options,
                    answer=_answer_letter(row["answer"], options),
                    groups={"task_type": task_type},
                )
            )
    return samples


def load_timescope(annotations: str, video_dir: str) -> list[Sample]:
    samples = []
    for path in _annotation_files(annotations):
        for i, row in enumerate(read_rows(path)):
            question = row.get("question") or row["input"]
            options = tuple(row.get("options") or row.get("candidates") or ())
            if options:
                question = f"{question}\n{_format_options(options, 'dot')}"
            else:
                options = _options_in_text(question)
            video = row["video"]
            samples.append(
                Sample(
                    id=str(row.get("id", i)),
                    video=_first_existing(
                        *(
                            os.path.join(video_dir, video.replace(".mp4", ext))
                            for ext in (".mp4", ".MP4", ".mkv")
                        )
                    ),
                    prompt=f"{question}\n{LETTER_INSTRUCTION}",
                    options=options,
                    answer=_answer_letter(row["answer"], options),
                    groups={
                        "type": str(row.get("type", "all")),
                        "length": str(row.get("length", "all")),
                    },
                )
            )
    return samples


def tomato_prompt(question: str, options: Sequence[str]) -> str:
    """Our TOMATO instruction: the question, lettered options, and a request to pick one letter."""
    return (
        "Watch the video frames in order and answer the multiple-choice question about the motion "
        "in them. Use only what the frames show.\n"
        f"Question: {question}\nOptions:\n{_format_options(options, 'dot')}\n"
        "If unsure, still choose the most likely option. Reply with the option's letter."
    )


def load_tomato(annotations: str, video_dir: str) -> list[Sample]:
    samples = []
    for path in _annotation_files(annotations):
        stem = os.path.splitext(os.path.basename(path))[0]
        for row in read_rows(path):
            options = tuple(str(o) for o in row["options"])
            reason = str(row.get("reason_type") or row.get("motion_type") or stem)
            demo = str(row.get("demonstration_type", "all"))
            if row.get("video_path"):
                video = os.path.join(video_dir, row["video_path"])
            else:
                video = os.path.join(video_dir, demo, f"{row['key']}.mp4")
            samples.append(
                Sample(
                    id=f"{reason}/{row['id']}",
                    video=video,
                    prompt=tomato_prompt(row["question"], options),
                    options=options,
                    answer=_answer_letter(int(row["answer"]), options),
                    groups={"reasoning_type": reason, "demonstration_type": demo},
                )
            )
    return samples


def load_vsibench(annotations: str, video_dir: str) -> list[Sample]:
    samples = []
    for path in _annotation_files(annotations):
        for i, row in enumerate(read_rows(path)):
            qtype = str(row["question_type"])
            category = re.sub(r"^(object_rel_direction)_(easy|medium|hard)$", r"\1", qtype)
            video = os.path.join(video_dir, str(row["dataset"]), f"{row['scene_name']}.mp4")
            raw_options = row.get("options") or []
            common = dict(id=str(row.get("id", i)), video=video, groups={"question_type": category})
            if raw_options:
                options = tuple(re.sub(r"^\s*[A-J][\.\)]\s*", "", o) for o in raw_options)
                prompt = "\n".join(
                    [
                        "These are frames of a video.",
                        row["question"],
                        "Options:",
                        *raw_options,
                        LETTER_INSTRUCTION,
                    ]
                )
                answer = _answer_letter(row["ground_truth"], options)
                samples.append(Sample(prompt=prompt, options=options, answer=answer, **common))
            else:
                prompt = (
                    f"These are frames of a video.\n{row['question']}\n"
                    "Please answer the question using a single word or phrase."
                )
                answer = f"{float(row['ground_truth']):g}"
                samples.append(
                    Sample(prompt=prompt, options=(), answer=answer, kind="number", **common)
                )
    return samples


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("longvideobench", load_longvideobench, max_new_tokens=32, headline="micro"),
        Task("mlvu", load_mlvu, max_new_tokens=16, headline="macro"),
        Task("timescope", load_timescope, max_new_tokens=16, headline="micro"),
        Task("tomato", load_tomato, max_new_tokens=1024, headline="micro"),
        Task("vsibench", load_vsibench, max_new_tokens=16, headline="macro"),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]


def check_videos(samples: Sequence[Sample], limit: int = 5) -> None:
    """Raises FileNotFoundError naming the first missing videos (before a long run starts)."""
    missing = sorted({s.video for s in samples if not os.path.exists(s.video)})
    if missing:
        shown = "\n  ".join(missing[:limit])
        more = f"\n  ... and {len(missing) - limit} more" if len(missing) > limit else ""
        raise FileNotFoundError(
            f"{len(missing)} video file(s) of the annotations are missing:\n  {shown}{more}"
        )
