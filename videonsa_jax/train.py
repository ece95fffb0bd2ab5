r"""Trains Qwen2.5-VL / VideoNSA from a config file.

    python -m videonsa_jax.train --config=configs/tiny.py --workdir=/tmp/videonsa_tiny
    python -m videonsa_jax.train --config=configs/qwen2_5_vl_7b_videonsa.py --workdir=DIR \
        --config.model.init_from=/path/to/Qwen2.5-VL-7B-Instruct --config.data.train_jsonl=F

`--config.key=value` overrides any config key (the config is locked: a misspelt key is an error).
Running the same command again resumes from the newest readable checkpoint in `DIR/checkpoints`
(parameters, optimizer state, step, data position). TensorBoard: `tensorboard --logdir DIR`.
SIGTERM saves a checkpoint and exits; multi-process launches (Slurm, Cloud TPU, or the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID env vars) initialise
`jax.distributed` first.
"""

from __future__ import annotations

import dataclasses
import json
import logging as std_logging
import os
import shutil
import signal
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_flags

from videonsa_jax.checkpoints import save_pretrained
from videonsa_jax.data import (
    DataConfig,
    JsonlSource,
    generate_dataset,
    make_dataset,
    write_synthetic_tokenizer,
)
from videonsa_jax.parallel import (
    BatchBlock,
    context,
    create_mesh,
    maybe_initialize_distributed,
)
from videonsa_jax.processing import chat
from videonsa_jax.training import checkpointing, configs, evaluation, metrics
from videonsa_jax.training import inputs as inputs_lib
from videonsa_jax.training import state as state_lib
from videonsa_jax.training import step as step_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs, generated data.")
_DRY_RUN = flags.DEFINE_enum(
    "dry_run",
    None,
    ["auto", "analytic", "compile"],
    "Print the per-device memory of the config's step and exit; allocates nothing "
    "(videonsa_jax/parallel/dry_run.py): --dry_run=auto | analytic | compile.",
)
flags.mark_flags_as_required(["config", "workdir"])


class TrainingError(RuntimeError):
    """A run cannot start or must stop; the message says why."""


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, str, str]:
    """(train JSONL, eval JSONL or '', tokenizer dir); generates the synthetic task if asked."""
    s, d = config.data.synthetic, config.data
    if not s.task:
        return d.train_jsonl, d.eval_jsonl, d.tokenizer or config.model.init_from
    root = os.path.join(workdir, "data")
    marker = os.path.join(root, "READY")
    spec = json.dumps({**s.to_dict(), "fps": d.fps, "seed": config.seed}, sort_keys=True)
    if jax.process_index() == 0 and _read(marker) != spec:
        logging.info("generating the synthetic %r task in %s", s.task, root)
        kw = dict(num_frames=s.num_frames, size=s.size, fps=d.fps, progress=False)
        generate_dataset(os.path.join(root, "train"), s.task, s.num_train, seed=config.seed, **kw)
        generate_dataset(os.path.join(root, "eval"), s.task, s.num_eval, seed=config.seed + 1, **kw)
        write_synthetic_tokenizer(root)
        with open(marker, "w") as f:
            f.write(spec)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("synthetic_data")
    task_file = f"{s.task}.jsonl"
    return os.path.join(root, "train", task_file), os.path.join(root, "eval", task_file), root


def _read(path: str) -> str | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read()


def special_token_ids(tokenizer: chat.Tokenizer) -> dict[str, int]:
    sp = tokenizer.special
    return dict(
        image_token_id=sp.image_pad,
        video_token_id=sp.video_pad,
        vision_start_token_id=sp.vision_start,
        vision_end_token_id=sp.vision_end,
        bos_token_id=sp.endoftext,
        eos_token_id=sp.im_end,
        pad_token_id=tokenizer.pad_id,
    )


def _check_model_config(model_config, tokenizer: chat.Tokenizer) -> None:
    if model_config.text.vocab_size < tokenizer.vocab_size:
        raise TrainingError(
            f"vocab_size {model_config.text.vocab_size} < the tokenizer's {tokenizer.vocab_size}"
        )
    ids = special_token_ids(tokenizer)
    for key in ("image_token_id", "video_token_id"):
        if getattr(model_config, key) != ids[key]:
            raise TrainingError(
                f"model {key}={getattr(model_config, key)} but the tokenizer's is {ids[key]}"
            )


def _install_sigterm_handler() -> dict[str, bool]:
    """A flag set by SIGTERM (single process; multi-process runs use JAX's preemption sync)."""
    received = {"sigterm": False}
    if jax.process_count() == 1:
        signal.signal(signal.SIGTERM, lambda *_: received.update(sigterm=True))
    return received


def _export(graphdef, state: step_lib.TrainState, rest, tokenizer_dir: str, path: str) -> None:
    """`save_pretrained` of the trained model, plus the tokenizer files: an HF-format dir."""
    params = state.params
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() == 0:
        save_pretrained(nnx.merge(graphdef, params, rest), path)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if os.path.exists(os.path.join(tokenizer_dir, name)):
                shutil.copy(os.path.join(tokenizer_dir, name), path)
        logging.info("exported the final model to %s", path)


def make_datasets(
    config: ml_collections.ConfigDict,
    tokenizer: chat.Tokenizer,
    train_jsonl: str,
    eval_jsonl: str,
    block: BatchBlock,
) -> tuple[Any, Any]:
    """(the training iterator, the eval dataset or None).

    The training data is read in `block.count` shards: this process reads shard `block.index`
    in batches of `block.rows` rows, the rows of the global batch its devices hold (see
    training/inputs.py); processes that share a block read the same records. Every process
    reads the whole eval split, without the answers (DataConfig.train=False), once per
    evaluation.
    """
    d = config.data
    data_config = DataConfig(
        max_length=d.max_length,
        fps=d.fps,
        max_frames=d.max_frames,
        min_frames=d.min_frames,
        min_pixels=d.min_pixels,
        max_pixels=d.max_pixels,
    )
    media_root = d.media_root or None
    train_ds = make_dataset(
        JsonlSource(train_jsonl, media_root),
        tokenizer,
        data_config,
        batch_size=block.rows,
        seed=config.seed,
        shuffle=d.shuffle,
        shard_index=block.index,
        shard_count=block.count,
        worker_count=d.worker_count,
        read_threads=d.read_threads,
    )
    eval_ds = None
    if eval_jsonl and config.eval.every:
        eval_ds = make_dataset(
            JsonlSource(eval_jsonl, media_root),
            tokenizer,
            dataclasses.replace(data_config, train=False),
            batch_size=config.eval.batch_size,
            shuffle=False,
            num_epochs=1,
            shard_index=0,
            shard_count=1,
            read_threads=d.read_threads,
        )
    return iter(train_ds), eval_ds


def _global_counts(block: BatchBlock, *counts: float) -> np.ndarray:
    """Sums per-process counts over the batch blocks (processes sharing a block count once)."""
    table = multihost_utils.process_allgather(np.asarray([block.index, *counts], np.float64))
    _, first = np.unique(table[:, 0], return_index=True)
    return table[first, 1:].sum(0)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Runs (or resumes) the training described by `config`, writing everything under `workdir`."""
    try:
        configs.check_paths(config)
    except (FileNotFoundError, ValueError) as e:
        raise TrainingError(str(e)) from None
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    train_jsonl, eval_jsonl, tokenizer_dir = prepare_data(config, workdir)
    tokenizer = chat.load_tokenizer(tokenizer_dir)
    model_config = configs.model_config(config, special_token_ids(tokenizer))
    _check_model_config(model_config, tokenizer)

    mesh = create_mesh(config.mesh.to_dict())
    rules = tuple(tuple(r) for r in config.sharding.rules)
    logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size,
                 jax.process_count())  # fmt: skip
    make_model = state_lib.model_factory(model_config, config)
    model = nnx.eval_shape(make_model)  # abstract: host-side input preparation and shapes
    tx = step_lib.make_optimizer(config)
    graphdef, abstract, shardings = state_lib.abstract_state(model, tx, mesh, rules)
    rest = jax.jit(lambda: nnx.state(make_model(), nnx.Not(nnx.Param)))()
    num_params = sum(x.size for x in jax.tree.leaves(abstract.params))
    logging.info("model: %s attention, %.1fM parameters", model_config.attention.kind,
                 num_params / 1e6)  # fmt: skip

    placement = inputs_lib.Placement.of_process(mesh, rules, config.data.batch_size)
    block = placement.block
    logging.info("process %d reads batch rows [%d, %d) of %d", jax.process_index(),
                 block.index * block.rows, (block.index + 1) * block.rows,
                 config.data.batch_size)  # fmt: skip
    train_iter, eval_ds = make_datasets(config, tokenizer, train_jsonl, eval_jsonl, block)
    num_patches = config.data.num_patches or 4 * config.data.max_length * config.data.batch_size
    unit = model_config.vision.spatial_merge_size**2
    block_patches = placement.num_patches(num_patches, unit)

    checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        save_every=config.train.save_every,
        keep=config.train.keep_checkpoints,
    )
    try:
        restored = checkpointer.restore_latest(abstract, train_iter)
    except checkpointing.CheckpointError as e:
        raise TrainingError(str(e)) from None
    if restored is not None:
        state, start = restored
    else:
        start = 0
        params = None
        if config.model.init_from:
            params = state_lib.load_pretrained_params(config, shardings.params)
        state = state_lib.init_state(make_model, tx, shardings, params)
        logging.info("initialised %s", config.model.init_from or "from scratch")

    schedule = step_lib.learning_rate_schedule(config)
    loss_fn = state_lib.lm_loss(config.train.loss_chunk_size)
    # Traced under the mesh, so the model's sequence-parallel paths see it (parallel/context.py).
    train_step = jax.jit(
        context.with_mesh(
            step_lib.make_train_step(graphdef, tx, loss_fn, schedule, shardings.params), mesh
        ),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    eval_step = jax.jit(
        context.with_mesh(evaluation.make_eval_step(graphdef), mesh), out_shardings=replicated
    )
    letter_ids = evaluation.letter_token_ids(tokenizer)
    eval_patches = config.eval.batch_size * num_patches // config.data.batch_size

    def run_eval(step: int, params: nnx.State) -> None:
        scores = evaluation.evaluate(
            eval_step, params, rest, model, iter(eval_ds), letter_ids, mesh=mesh, rules=rules,
            num_patches=eval_patches, max_batches=config.eval.max_batches,
        )  # fmt: skip
        writer.write_scalars(step, {f"eval/{k}": v for k, v in scores.items()})
        shown = " | ".join(f"{k} {v:.4g}" for k, v in scores.items())
        logging.info("eval at step %d: %s", step, shown)

    writer = metrics.MetricWriter(workdir)
    progress = metrics.Progress(start, config.train.num_steps)
    signals = _install_sigterm_handler()
    num_steps = config.train.num_steps
    logging.info("training steps %d..%d", start + 1, num_steps)
    sizes = None  # ViT group / text-row sizes so far: they only grow (few recompiles)
    for step in range(start + 1, num_steps + 1):
        progress.start_step()
        micro = [next(train_iter) for _ in range(config.train.grad_accum)]
        host, sizes = inputs_lib.stack(
            [inputs_lib.model_batch(model, b, block_patches) for b in micro],
            sizes,
            placement.shards,
        )
        batch = inputs_lib.place(host, placement, leading=1)
        state, step_metrics = train_step(state, rest, batch)
        scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        tokens, skipped = _global_counts(
            block,
            sum(int(np.sum(b["attention_mask"])) for b in micro),
            sum(b["num_skipped"] for b in micro),
        )
        scalars.update(progress.end_step(step, int(tokens)))
        scalars["skipped_samples"] = float(skipped)
        writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
        if scalars["nonfinite"] >= config.train.max_nonfinite_steps:
            raise TrainingError(
                f"{int(scalars['nonfinite'])} consecutive steps (up to step {step}) had a "
                f"non-finite loss or gradient (loss {scalars['loss']}); their updates were "
                "skipped. Stopping: lower optim.lr, check the data, or resume from a checkpoint."
            )
        if step == start + 1 or step % config.train.log_every == 0 or step == num_steps:
            shown = ("loss", "learning_rate", "grad_norm", "tokens_per_sec", "step_time")
            progress.log(step, {k: scalars[k] for k in shown})
        if eval_ds is not None and (step % config.eval.every == 0 or step == num_steps):
            run_eval(step, state.params)
        checkpointer.save(step, state, train_iter)
        if signals["sigterm"] or checkpointer.reached_preemption(step):
            checkpointer.save(step, state, train_iter, force=True)
            checkpointer.wait()
            logging.warning("termination signal: saved step %d, exiting", step)
            checkpointer.close()
            writer.close()
            return
    if start < num_steps:
        checkpointer.save(num_steps, state, train_iter, force=True)
    checkpointer.wait()
    checkpointer.close()
    writer.close()
    if config.train.export:
        _export(graphdef, state, rest, tokenizer_dir, os.path.join(workdir, "export"))


class _QuietLibraries(std_logging.Filter):
    """Drops INFO records of orbax and JAX internals (dozens per checkpoint)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        noisy = any(s in record.pathname for s in ("/orbax/", "/jax/_src/"))
        return record.levelno >= std_logging.WARNING or not noisy


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing; a bad `--config.key=value` override exits with one line, no traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # includes ml_collections' unsupported-override errors
        sys.exit(f"error: {e}")
    except (AttributeError, KeyError) as e:  # raised by ml_collections for an unknown key
        lines = [x.strip("'\" ") for x in str(e).replace("\\n", "\n").replace("\\", "").split("\n")]
        sys.exit(f"error: unknown config key {lines[0]!r} ({' '.join(lines[1:]) or str(e)})")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    maybe_initialize_distributed()
    if _DRY_RUN.value:
        from videonsa_jax.parallel import dry_run  # noqa: PLC0415

        print(dry_run.report(_CONFIG.value, _DRY_RUN.value))
        return
    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except TrainingError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
