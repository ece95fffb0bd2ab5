"""Synthetic long-video question answering: needle, counting and temporal order.

Each sample is a real mp4 (H.264, written with PyAV) plus a LLaVA-Video-style JSONL row:

  {"id": "needle_00003", "video": "videos/needle_00003.mp4", "task": "needle",
   "conversations": [{"from": "human", "value": "<video>\\nWhat colour ...\\nA. red\\n..."},
                     {"from": "gpt", "value": "B"}],
   "choices": ["red", "green", "blue", "yellow"], "answer": "B", "answer_index": 1,
   "event_frames": [[12, 13]], "num_frames": 32, "fps": 2.0, "size": 56}

Frames are grey noise with grey distractor shapes; an *event* is a large solid shape in a
saturated colour that lasts `event_len` frames starting at an even frame (so it fills
whole temporal patches). Tasks:
  needle:   one event; "what colour is the shape?" (4 colour choices)
  counting: 1-4 separated events; "how many times ...?" (choices 1-4)
  order:    two events of different colours; "which colour appears first?"
Choices are in a fixed order by default (the tiny model then only has to learn the
colour -> letter mapping); `shuffle_choices=True` permutes them per sample.

Token cost (Qwen2.5-VL, 14 px patches, 2x2 merge, 2-frame temporal patch): a frame of
S x S pixels processed at min_pixels = max_pixels = S*S gives (S/28)^2 tokens per 2
frames, e.g. 56 px -> 4, 224 px -> 64. So `num_frames` x `size` spans 1K..128K tokens:
(size 224, 4096 frames) is ~131K vision tokens.

CLI:  python -m videonsa_jax.data.synthetic --out DIR --task needle --n 200 \\
          --num-frames 32 --size 56 --fps 2 --seed 0
writes DIR/needle.jsonl, DIR/videos/*.mp4 and DIR/tokenizer.json (+ tokenizer_config.json),
a small byte-level BPE whose special tokens are the Qwen2.5-VL ones by name.
"""

import argparse
import fractions
import json
import os
import string
from collections.abc import Sequence

import av
import numpy as np
import tokenizers
from tqdm import tqdm

from videonsa_jax.processing import chat

TASKS = ("needle", "counting", "order")
COLOURS = {
    "red": (230, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 60, 230),
    "yellow": (235, 225, 30),
}
LETTERS = string.ascii_uppercase
PROMPT_SUFFIX = "Answer with the option's letter from the given choices directly."
QUESTIONS = {
    "needle": "What colour is the shape that appears in the video?",
    "counting": "How many times does a coloured shape appear in the video?",
    "order": "Which colour appears first in the video?",
}
SYNTHETIC_VOCAB_SIZE = 512


def _noise_frame(rng: np.random.Generator, size: int) -> np.ndarray:
    grey = rng.integers(70, 170, (size, size, 1), dtype=np.uint8)
    return np.repeat(grey, 3, axis=2)


def _disk_mask(size: int, cy: float, cx: float, radius: float) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    return (y - cy) ** 2 + (x - cx) ** 2 <= radius**2


def _square_mask(size: int, cy: float, cx: float, half: float) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    return (np.abs(y - cy) <= half) & (np.abs(x - cx) <= half)


def _random_shape(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    r = scale * size
    cy, cx = rng.uniform(r, size - r, 2)
    if rng.random() < 0.5:
        return _disk_mask(size, cy, cx, r)
    return _square_mask(size, cy, cx, r * 0.85)


def _render(
    rng: np.random.Generator, num_frames: int, size: int, events: dict[int, str]
) -> np.ndarray:
    """Frames uint8 [T, S, S, 3]; `events` maps frame index -> colour name."""
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    shape = None
    for t in range(num_frames):
        frame = _noise_frame(rng, size)
        for _ in range(rng.integers(1, 3)):  # grey distractors
            frame[_random_shape(rng, size, rng.uniform(0.12, 0.25))] = rng.integers(20, 235)
        if t in events:
            if t - 1 not in events or events[t - 1] != events[t]:
                shape = _random_shape(rng, size, 0.3)  # same shape within one event
            frame[shape] = COLOURS[events[t]]
        frames[t] = frame
    return frames


def write_mp4(path: str, frames: np.ndarray, fps: float) -> None:
    """Writes uint8 RGB frames [T, H, W, 3] (H, W even) as H.264 yuv420p."""
    rate = fractions.Fraction(fps).limit_denominator(1001)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        # One encoder thread: multi-threaded x264 output differs from run to run.
        stream.options = {"crf": "12", "preset": "veryfast", "g": "32", "threads": "1"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _slots(rng: np.random.Generator, num_slots: int, k: int, gap: int) -> list[int]:
    """k sorted slot indices in [0, num_slots) with at least `gap` empty slots between."""
    free = num_slots - (k - 1) * gap
    if free < k:
        raise ValueError(f"{num_slots} slots cannot hold {k} events with gap {gap}")
    chosen = np.sort(rng.choice(free, k, replace=False))
    return [int(c) + i * gap for i, c in enumerate(chosen)]


def make_sample(
    task: str,
    rng: np.random.Generator,
    *,
    num_frames: int,
    size: int,
    event_len: int = 2,
    shuffle_choices: bool = False,
) -> tuple[np.ndarray, dict]:
    """Frames uint8 [T, S, S, 3] and the QA fields of one sample."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}, expected one of {TASKS}")
    num_slots = num_frames // event_len
    colours = list(COLOURS)
    if task == "needle":
        colour = colours[rng.integers(len(colours))]
        slots, slot_colours = _slots(rng, num_slots, 1, 0), [colour]
        choices, answer = colours, colour
    elif task == "counting":
        count = int(rng.integers(1, 5))
        slots = _slots(rng, num_slots, count, 1)
        slot_colours = [colours[i] for i in rng.integers(len(colours), size=count)]
        choices, answer = ["1", "2", "3", "4"], str(count)
    else:
        pair = rng.choice(len(colours), 2, replace=False)
        slots, slot_colours = _slots(rng, num_slots, 2, 0), [colours[i] for i in pair]
        choices, answer = colours, slot_colours[0]
    if shuffle_choices:
        choices = [choices[i] for i in rng.permutation(len(choices))]
    events, event_frames = {}, []
    for slot, colour in zip(slots, slot_colours, strict=True):
        span = list(range(slot * event_len, (slot + 1) * event_len))
        events.update({t: colour for t in span})
        event_frames.append(span)
    frames = _render(rng, num_frames, size, events)
    index = choices.index(answer)
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    question = f"<video>\n{QUESTIONS[task]}\n{options}\n{PROMPT_SUFFIX}"
    qa = {
        "task": task,
        "conversations": [
            {"from": "human", "value": question},
            {"from": "gpt", "value": LETTERS[index]},
        ],
        "choices": list(choices),
        "answer": LETTERS[index],
        "answer_index": index,
        "event_frames": event_frames,
    }
    return frames, qa


def generate_dataset(
    out_dir: str,
    task: str,
    n: int,
    *,
    num_frames: int = 32,
    size: int = 56,
    fps: float = 2.0,
    seed: int = 0,
    event_len: int = 2,
    shuffle_choices: bool = False,
    progress: bool = True,
) -> str:
    """Writes `n` samples of `task` under out_dir; returns the JSONL path.

    Sample i depends only on (seed, task, i), so datasets of different n share prefixes.
    `size` must be even (a multiple of 28 gives exact patches); num_frames must hold the
    events: >= 2 * event_len (needle, order), >= 7 * event_len (counting: 4 separated
    events).
    """
    min_frames = (7 if task == "counting" else 2) * event_len
    if size % 2 or num_frames < min_frames:
        raise ValueError(f"need an even size and num_frames >= {min_frames} for {task!r}")
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    path = os.path.join(out_dir, f"{task}.jsonl")
    task_id = TASKS.index(task)
    with open(path, "w") as f:
        for i in tqdm(range(n), desc=f"{task} videos", disable=not progress):
            rng = np.random.default_rng([seed, task_id, i])
            frames, qa = make_sample(
                task,
                rng,
                num_frames=num_frames,
                size=size,
                event_len=event_len,
                shuffle_choices=shuffle_choices,
            )
            sample_id = f"{task}_{i:05d}"
            video = os.path.join("videos", f"{sample_id}.mp4")
            write_mp4(os.path.join(out_dir, video), frames, fps)
            row = {
                "id": sample_id,
                "video": video,
                **qa,
                "num_frames": num_frames,
                "fps": fps,
                "size": size,
            }
            f.write(json.dumps(row) + "\n")
    return path


def _tokenizer_corpus() -> list[str]:
    lines = [
        chat.DEFAULT_SYSTEM_PROMPT,
        "system\n",
        "user\n",
        "assistant\n",
        PROMPT_SUFFIX,
        *QUESTIONS.values(),
        *COLOURS,
        string.ascii_letters,
        string.digits,
    ]
    lines += [f"\n{letter}. {c}" for letter in LETTERS[:6] for c in [*COLOURS, "1", "2", "3"]]
    return lines * 4


def write_synthetic_tokenizer(out_dir: str, vocab_size: int = SYNTHETIC_VOCAB_SIZE) -> str:
    """Writes a small byte-level BPE `tokenizer.json` (+ tokenizer_config.json) to out_dir.

    Special tokens are the Qwen2.5-VL ones by name (ids 0..13, in Qwen's order), followed by
    the 256 byte symbols and merges learned on the synthetic tasks' text, so any text
    encodes and the chat code path is the one used with real checkpoints. Deterministic.
    Returns the tokenizer.json path.
    """
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    split = pre_tokenizers.Split(
        tokenizers.Regex(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+"
        ),
        behavior="isolated",
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(chat.SPECIAL_TOKEN_NAMES),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.json")
    tok.save(path)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"}, f, indent=1)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--task", default="needle", choices=[*TASKS, "all"])
    parser.add_argument("--n", type=int, default=200, help="samples per task")
    parser.add_argument("--num-frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=56, help="frame side in pixels")
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--event-len", type=int, default=2)
    parser.add_argument("--shuffle-choices", action="store_true")
    args = parser.parse_args(argv)
    for task in TASKS if args.task == "all" else (args.task,):
        path = generate_dataset(
            args.out,
            task,
            args.n,
            num_frames=args.num_frames,
            size=args.size,
            fps=args.fps,
            seed=args.seed,
            event_len=args.event_len,
            shuffle_choices=args.shuffle_choices,
        )
        print(path)
    print(write_synthetic_tokenizer(args.out))


if __name__ == "__main__":
    main()
