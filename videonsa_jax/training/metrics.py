"""TensorBoard event files (tensorboardX) and the console progress line.

Only process 0 writes summaries and logs progress. Scalars logged by the loop: `train/loss`,
`train/learning_rate`, `train/grad_norm`, `train/tokens_per_sec`, `train/step_time`,
`train/nonfinite`, `train/skipped_samples`, `train/gate_*` (mean gate per NSA branch when the
model reports them) and `eval/*`.
"""

from __future__ import annotations

import glob
import os
import struct
import time
from collections.abc import Mapping

import jax
from absl import logging
from tensorboardX import SummaryWriter
from tensorboardX.proto import event_pb2


class MetricWriter:
    """Writes scalars to `<workdir>/tensorboard` (a no-op on processes other than 0)."""

    def __init__(self, workdir: str):
        self._writer = None
        if jax.process_index() == 0:
            self._writer = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(name, float(value), global_step=step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_scalars(workdir: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from the event files of `<workdir>/tensorboard` (later files win).

    Reads the TFRecord framing directly (length, crc, payload, crc; crcs not checked).
    """
    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            payload = data[offset + 12 : offset + 12 + length]
            offset += 12 + length + 4
            if len(payload) < length:
                break  # a record cut short by a killed writer
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Step timing, tokens/s and a one-line progress report with ETA.

    `step_time` spans one step (data, host preparation, device step; not eval or checkpoints).
    The ETA extrapolates the wall time per step since the first step (which includes compilation),
    evaluations and checkpoints included.
    """

    def __init__(self, first_step: int, num_steps: int):
        self.num_steps = num_steps
        self._start = time.perf_counter()
        self._first_step = first_step
        self._step_start = self._steady_start = self._start

    def start_step(self) -> None:
        self._step_start = time.perf_counter()

    def end_step(self, step: int, tokens: int) -> dict[str, float]:
        """Call once step `step` finished on the device; returns step time and tokens/s."""
        now = time.perf_counter()
        secs = now - self._step_start
        if step == self._first_step + 1:
            self._steady_start = now
        return {"step_time": secs, "tokens_per_sec": tokens / max(secs, 1e-9)}

    def line(self, step: int, scalars: Mapping[str, float]) -> str:
        """`step 120/400 (30%) | loss 1.234 | ... | 12.3 s elapsed | ETA 4m10s`."""
        now, done = time.perf_counter(), step - self._first_step - 1
        per_step = (now - self._steady_start) / done if done > 0 else None
        eta = format_duration(per_step * (self.num_steps - step)) if per_step else "?"
        parts = [f"step {step}/{self.num_steps} ({100 * step // max(self.num_steps, 1)}%)"]
        for name, value in scalars.items():
            parts.append(f"{name} {value:.4g}")
        parts.append(f"{format_duration(now - self._start)} elapsed")
        parts.append(f"ETA {eta}")
        return " | ".join(parts)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        if jax.process_index() == 0:
            logging.info("%s", self.line(step, scalars))
