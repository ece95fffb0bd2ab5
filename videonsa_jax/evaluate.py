"""Evaluate a checkpoint on a long-video benchmark.

    python -m videonsa_jax.evaluate --config=configs/eval/longvideobench.py --model DIR \
        [--workdir /tmp/eval_lvb] [--config.fps=4 --config.limit=100 ...]

The config (ml_collections, `get_config()`) names the task, the annotation file or directory and the
local video directory, the frame sampling and pixel budget, and optionally the attention kind and
NSA budget. Predictions are cached per sample in the workdir, so re-running the same command resumes
an interrupted run; results.json, results.md (accuracy overall and per category) and samples.jsonl
(every response, parsed answer and score) are written there at the end.

Parallelism: one model replica per local device (`config.num_devices`, default all), each fed by its
own worker thread; across hosts (after `jax.distributed.initialize()`), samples are split by process
and process 0 writes the reports (the workdir must be on a shared filesystem).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from flax import nnx

from videonsa_jax import infer
from videonsa_jax.evaluation import harness
from videonsa_jax.evaluation import tasks as tasks_lib
from videonsa_jax.generate import GenerationConfig, generate


def _replicas(model, devices: Sequence[jax.Device]) -> list:
    """The model on each device (parameters copied once per device)."""
    graphdef, state = nnx.split(model)
    return [nnx.merge(graphdef, jax.device_put(state, d)) for d in devices]


def make_predictor(model, device: jax.Device, tokenizer, gen_config: GenerationConfig, config):
    """samples -> responses on one device: decode videos, build prompts, generate."""

    def predict(samples: Sequence[tasks_lib.Sample]) -> list[str]:
        questions = [
            infer.encode_video_question(
                tokenizer,
                s.video,
                s.prompt,
                fps=config.fps,
                max_frames=config.max_frames,
                min_pixels=config.min_pixels,
                max_pixels=config.max_pixels,
                processor_fps=config.processor_fps,
            )
            for s in samples
        ]
        with jax.default_device(device):
            inputs = infer.batch_inputs(
                model, questions, gen_config.pad_token_id, config.length_multiple
            )
            return generate(model, inputs, gen_config).texts(tokenizer)

    return predict


def run(config: ml_collections.ConfigDict, model_dir: str, **overrides: Any) -> dict[str, Any]:
    """Evaluates `model_dir` as `config` says; `overrides` replace config fields (e.g. the NSA
    budget in a sweep). Returns the metrics (on process 0; other processes return {})."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.update(overrides)
    task = tasks_lib.get_task(config.task)
    samples = task.load(config.annotations, config.video_dir)
    if config.limit:
        samples = samples[: config.limit]
    tasks_lib.check_videos(samples)

    model_overrides = {
        k: config[k] for k in ("block_count", "window_size") if config.get(k) is not None
    }
    model, tokenizer, gen_config = infer.load(
        model_dir, attention=config.attention, dtype=infer.DTYPES[config.dtype], **model_overrides
    )
    gen_config = gen_config.replace(
        max_new_tokens=config.max_new_tokens or task.max_new_tokens, do_sample=False
    )
    devices = jax.local_devices()[: config.num_devices or None]
    replicas = [model] if len(devices) == 1 else _replicas(model, devices)
    predictors = [
        make_predictor(m, d, tokenizer, gen_config, config)
        for m, d in zip(replicas, devices, strict=True)
    ]
    run_config = {
        "model": os.path.abspath(model_dir),
        "attention": model.config.attention.kind,
        "block_count": model.config.attention.block_count,
        "window_size": model.config.attention.window_size,
        "generation": {k: str(v) for k, v in vars(gen_config).items()},
        **{
            k: config[k]
            for k in (
                "annotations",
                "fps",
                "max_frames",
                "min_pixels",
                "max_pixels",
                "processor_fps",
                "dtype",
                "limit",
            )
        },
    }
    barrier = None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        barrier = lambda: multihost_utils.sync_global_devices(f"eval {config.workdir}")
    result = harness.evaluate(
        task,
        samples,
        predictors,
        config.workdir,
        run_config=run_config,
        batch_size=config.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        barrier=barrier,
    )
    return result or {}


def main(argv: Sequence[str]) -> None:
    del argv
    config = _CONFIG.value
    if _WORKDIR.value:
        config.workdir = _WORKDIR.value
    try:
        result = run(config, _MODEL.value)
    except (FileNotFoundError, ValueError) as e:  # bad annotations, task, model dir, checkpoint
        sys.exit(f"error: {e}")
    if result:
        task = tasks_lib.get_task(config.task)
        print(harness.markdown_report(task, result))
        print(f"written to {config.workdir}")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/eval/<task>.py")
    _MODEL = flags.DEFINE_string("model", None, "checkpoint directory (HF format)", required=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "output directory (default: config.workdir)")
    flags.mark_flag_as_required("config")
    app.run(main)
