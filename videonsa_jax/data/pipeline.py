"""grain pipelines: records -> tokenised, preprocessed examples -> padded batches.

Order of operations (per process):
  source[shard_index::shard_count] -> shuffle(seed; reshuffled every epoch) -> repeat
  -> process (decode + preprocess + tokenise; in `worker_count` processes)
  -> batch of `batch_size` good examples, bad ones skipped and counted -> collate.

Over-long policy: a sample whose token count (text + vision pads) exceeds `max_length`
gets fewer video frames -- the sampled frame count drops 2 at a time (one temporal patch;
equivalently a lower fps, frames still spread uniformly over the clip) until it fits.
Text is never cut, so the answer always survives. Frame counts are computed from the
container header before decoding, so the video is decoded once. If even 2 frames do not
fit (or the text alone is too long) the sample is skipped and counted.

Bad samples (VideoDecodeError, malformed records, over-long) never raise: each batch
reports `num_skipped` (skips since the previous batch) and the iterator keeps a total.
"""

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from videonsa_jax.processing import chat
from videonsa_jax.processing import preprocess as preprocess_lib
from videonsa_jax.processing import resize as resize_lib
from videonsa_jax.processing import video as video_lib
from videonsa_jax.processing.errors import VideoDecodeError

PATCH_DIM = 1176


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How records become model inputs."""

    max_length: int = 36864  # tokens per sequence (VideoNSA trained at a 36K limit)
    bucket_lengths: tuple[int, ...] = ()  # pad L up to the smallest bucket; () -> max_length
    fps: float = 2.0
    max_frames: int | None = None
    min_frames: int = 4
    min_pixels: int = resize_lib.VIDEO_MIN_PIXELS
    max_pixels: int = resize_lib.VIDEO_MAX_PIXELS
    total_pixels: int | None = None
    processor_fps: float | None = None  # see preprocess_video
    image_min_pixels: int = resize_lib.IMAGE_MIN_PIXELS
    image_max_pixels: int = resize_lib.IMAGE_MAX_PIXELS
    train: bool = True  # False: drop the final answer, add the generation prompt (eval)
    system_prompt: str = chat.DEFAULT_SYSTEM_PROMPT


class SkipSample(Exception):
    """A record that cannot become a training example (reason in the message)."""


def _messages(record: dict, train: bool) -> list[dict]:
    messages = chat.from_llava(record["conversations"])
    if not train and messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return messages


def _fit_frames(
    info: video_lib.VideoInfo, record: dict, cfg: DataConfig, fixed_tokens: int
) -> tuple[int, int | None]:
    """(frames the fps rule samples, largest even count <= it that fits max_length or None)."""
    first, last = video_lib.clip_range(
        info.total_frames, info.fps, record.get("start"), record.get("end")
    )
    default = video_lib.num_sampled_frames(
        last - first + 1,
        info.fps,
        fps=cfg.fps,
        max_frames=cfg.max_frames,
        min_frames=cfg.min_frames,
    )
    n = default
    while n >= 2:
        grid = preprocess_lib.video_grid_thw(
            n,
            info.height,
            info.width,
            min_pixels=cfg.min_pixels,
            max_pixels=cfg.max_pixels,
            total_pixels=cfg.total_pixels,
        )
        if fixed_tokens + chat.num_vision_tokens(grid) <= cfg.max_length:
            return default, n
        n -= 2
    return default, None


def process_record(record: dict, tokenizer: chat.Tokenizer, cfg: DataConfig) -> dict:
    """One record -> example dict of numpy arrays (see `collate` for the fields).

    Raises:
      SkipSample, VideoDecodeError, KeyError, ValueError: the record is unusable.
    """
    messages = _messages(record, cfg.train)
    out = {
        "pixel_values": np.zeros((0, PATCH_DIM), np.float32),
        "image_grid_thw": np.zeros((0, 3), np.int64),
        "pixel_values_videos": np.zeros((0, PATCH_DIM), np.float32),
        "video_grid_thw": np.zeros((0, 3), np.int64),
        "second_per_grid_ts": np.zeros((0,), np.float32),
    }
    images = record.get("image") or []
    images = [images] if isinstance(images, (str, bytes)) else images
    if images:
        processed = [
            preprocess_lib.preprocess_image(
                video_lib.load_image(src),
                min_pixels=cfg.image_min_pixels,
                max_pixels=cfg.image_max_pixels,
            )
            for src in images
        ]
        out["pixel_values"] = np.concatenate([p["pixel_values"] for p in processed])
        out["image_grid_thw"] = np.concatenate([p["image_grid_thw"] for p in processed])
    build = lambda video_grid: chat.build_conversation(
        tokenizer,
        messages,
        video_grid_thw=video_grid,
        image_grid_thw=out["image_grid_thw"],
        add_generation_prompt=not cfg.train,
        system_prompt=cfg.system_prompt,
    )
    video = record.get("video")
    if video is not None:
        info = video_lib.probe_video(video)
        fixed_tokens = len(build(np.zeros((1, 3), np.int64))[0])  # text + image tokens
        default_n, n = _fit_frames(info, record, cfg, fixed_tokens)
        if n is None:
            raise SkipSample(f"does not fit max_length={cfg.max_length} even with 2 frames")
        max_frames = cfg.max_frames if n == default_n else n
        frames, metadata = video_lib.load_video(
            video,
            fps=cfg.fps,
            max_frames=max_frames,
            min_frames=min(cfg.min_frames, n),
            start=record.get("start"),
            end=record.get("end"),
        )
        out.update(
            preprocess_lib.preprocess_video(
                frames,
                metadata,
                min_pixels=cfg.min_pixels,
                max_pixels=cfg.max_pixels,
                total_pixels=cfg.total_pixels,
                processor_fps=cfg.processor_fps,
            )
        )
    input_ids, loss_mask = build(out["video_grid_thw"])
    if len(input_ids) > cfg.max_length:
        raise SkipSample(f"{len(input_ids)} tokens > max_length={cfg.max_length}")
    out.update(
        input_ids=input_ids,
        loss_mask=loss_mask,
        answer_index=int(record.get("answer_index", -1)),
        choices=list(record.get("choices", [])),
        id=str(record.get("id", "")),
        task=str(record.get("task", "")),
    )
    return out


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Stands in for a record that failed processing."""

    reason: str


class ProcessRecord(grain.transforms.Map):
    """grain transform: record -> example, or `Skipped` for a bad record."""

    def __init__(self, tokenizer: chat.Tokenizer, cfg: DataConfig):
        self.tokenizer, self.cfg = tokenizer, cfg

    def map(self, record: dict) -> dict | Skipped:
        try:
            return process_record(record, self.tokenizer, self.cfg)
        except (VideoDecodeError, SkipSample, KeyError, ValueError, TypeError) as e:
            reason = f"{type(e).__name__}: {e}"
            logging.warning("skipping sample %s: %s", record.get("id", "?"), reason)
            return Skipped(reason)


def bucket_length(length: int, buckets: Sequence[int], max_length: int) -> int:
    """Smallest bucket >= length (max_length if none is)."""
    return min([b for b in buckets if b >= length] or [max_length])


def collate(
    examples: Sequence[dict],
    *,
    pad_id: int,
    max_length: int,
    bucket_lengths: Sequence[int] = (),
    num_skipped: int = 0,
) -> dict[str, Any]:
    """Batches examples from `process_record`.

    Returns numpy arrays
      input_ids int32 [B, L] (right-padded with pad_id; L = bucket of the longest row),
      attention_mask int32 [B, L], loss_mask bool [B, L] (target tokens, see chat.py),
      lengths int32 [B],
      pixel_values_videos float32 [P, 1176]: all videos, batch-row order (= token order),
      video_grid_thw int64 [n, 3], second_per_grid_ts float32 [n],
      pixel_values float32 [Pi, 1176], image_grid_thw int64 [m, 3],
      video_counts / image_counts int32 [B] (videos / images per row),
      answer_index int32 [B] (-1 if none), num_skipped int;
    and python lists choices [B][k], id [B], task [B].
    """
    lengths = np.array([len(e["input_ids"]) for e in examples], np.int32)
    length = bucket_length(int(lengths.max()), bucket_lengths, max_length)
    batch = {
        "input_ids": np.full((len(examples), length), pad_id, np.int32),
        "attention_mask": np.zeros((len(examples), length), np.int32),
        "loss_mask": np.zeros((len(examples), length), bool),
        "lengths": lengths,
    }
    for i, e in enumerate(examples):
        n = lengths[i]
        batch["input_ids"][i, :n] = e["input_ids"]
        batch["attention_mask"][i, :n] = 1
        batch["loss_mask"][i, :n] = e["loss_mask"]
    for key in (
        "pixel_values_videos",
        "video_grid_thw",
        "second_per_grid_ts",
        "pixel_values",
        "image_grid_thw",
    ):
        batch[key] = np.concatenate([e[key] for e in examples])
    batch["video_counts"] = np.array([len(e["video_grid_thw"]) for e in examples], np.int32)
    batch["image_counts"] = np.array([len(e["image_grid_thw"]) for e in examples], np.int32)
    batch["answer_index"] = np.array([e["answer_index"] for e in examples], np.int32)
    batch["num_skipped"] = num_skipped
    for key in ("choices", "id", "task"):
        batch[key] = [e[key] for e in examples]
    return batch


class _BatchIterator(grain.DatasetIterator):
    """Collects `batch_size` good examples; counts `Skipped` markers in between."""

    def __init__(
        self,
        parent: grain.DatasetIterator,
        batch_size: int,
        drop_remainder: bool,
        collate_kwargs: dict,
    ):
        super().__init__(parent)
        self._batch_size, self._drop_remainder = batch_size, drop_remainder
        self._collate_kwargs = collate_kwargs
        self.skipped_total = 0
        self.skip_reasons: list[str] = []  # since the last batch

    def __next__(self) -> dict[str, Any]:
        examples, skipped, self.skip_reasons = [], 0, []
        while len(examples) < self._batch_size:
            try:
                item = next(self._parent)
            except StopIteration:
                self.skipped_total += skipped
                if not examples or self._drop_remainder:
                    raise
                break
            if isinstance(item, Skipped):
                skipped += 1
                self.skip_reasons.append(item.reason)
            else:
                examples.append(item)
        else:
            self.skipped_total += skipped
        return collate(examples, num_skipped=skipped, **self._collate_kwargs)

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "skipped_total": self.skipped_total}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.skipped_total = state["skipped_total"]


class _BatchDataset(grain.IterDataset):
    def __init__(
        self, parent: grain.IterDataset, batch_size: int, drop_remainder: bool, collate_kwargs: dict
    ):
        super().__init__(parent)
        self._args = (batch_size, drop_remainder, collate_kwargs)

    def __iter__(self) -> _BatchIterator:
        return _BatchIterator(self._parent.__iter__(), *self._args)


def make_dataset(
    source: Sequence[dict],
    tokenizer: chat.Tokenizer,
    cfg: DataConfig,
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_count: int = 0,
    read_threads: int = 1,
    drop_remainder: bool = False,
) -> grain.IterDataset:
    """The batched pipeline; `iter()` it for a checkpointable iterator.

    Args:
      source: random-access records (`JsonlSource`, `TfdsSource`, a list of dicts).
      tokenizer: from `chat.load_tokenizer`.
      cfg: preprocessing and length settings.
      batch_size: good examples per batch (per process).
      seed: shuffle seed (each epoch is shuffled differently).
      shuffle: shuffle records (off for evaluation).
      num_epochs: None repeats forever.
      shard_index, shard_count: this process' shard; default jax.process_index() /
        jax.process_count().
      worker_count: processes that decode and preprocess (0: in this process).
      read_threads: threads per process that run `process_record` ahead of the batcher.
      drop_remainder: drop a final partial batch.

    The iterator's get_state()/set_state() capture the position exactly: restoring a
    state reproduces the batches that followed it.
    """
    if shard_index is None or shard_count is None:
        import jax  # pylint: disable=g-import-not-at-top

        shard_index, shard_count = jax.process_index(), jax.process_count()
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).map(ProcessRecord(tokenizer, cfg))
    ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * batch_size)
    )
    if worker_count > 0:
        from absl import flags  # pylint: disable=g-import-not-at-top

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; none given here.
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    collate_kwargs = {
        "pad_id": tokenizer.pad_id,
        "max_length": cfg.max_length,
        "bucket_lengths": tuple(cfg.bucket_lengths),
    }
    return _BatchDataset(ds, batch_size, drop_remainder, collate_kwargs)
