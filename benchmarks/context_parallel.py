r"""Sequence-parallel training steps on one host: context = 1, 2, 4, 8; VideoNSA vs dense attention.

On one 8-GPU node (one process that sees all 8 GPUs; every configuration runs in a subprocess):

    export XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true
    python3 benchmarks/context_parallel.py \
        [--config configs/long128k.py] [--layers 2] [--vision-layers 2] [--contexts 1,2,4,8] \
        [--kinds videonsa,dense] [--steps 3] [--frames 1024] [--grad-accum 1] [--timeout 1800]

The same on a Slurm cluster: one task that holds a whole node (not launch/slurm_gpu.sbatch, which
starts one training process per GPU):

    export XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true
    srun --nodes=1 --ntasks=1 --gpus-per-node=8 --cpus-per-task=16 --time=01:00:00 \
        .venv/bin/python benchmarks/context_parallel.py

There is no multi-node variant: the `context` axis all-gathers K / V in every layer and belongs
inside one NVLink domain (configs/long128k.py). CPU smoke run (8 fake devices, a minute or two on
2 cores; tests/test_context_parallel_bench.py):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python3 benchmarks/context_parallel.py --tiny

What runs: `--config` (`path[:arg]`, as `train.py --config`) with `--layers` decoder layers and a
`--vision-layers`-block ViT (the config's full-attention blocks below that depth, else the last
one), randomly initialised from `config.seed` (no checkpoint), with the config's dtype, remat,
optimizer, loss and sharding rules; state, shardings and the jitted `make_train_step` are built as
`videonsa_jax/train.py` builds them. Mesh: data 1, fsdp 1, context c, tensor 1 over the first c
devices (configs/long128k.py:h200 at c = 8: parameters and optimizer state FSDP-sharded over
`context`). A step is `--grad-accum` micro-batches of `data.batch_size` sequences (default 1; the
:h200 config's 8 multiplies the step time and the replicated input batch, not tokens/s).
`--tiny`: the model (fp32; `--config`'s remat) and video of configs/tiny.py, 32 frames of 56 x 56.

Input: one synthetic sequence per batch row, at the model-input level: `PREFIX_TOKENS` text
tokens, <vision_start>, the video's pad tokens, <vision_end>, a question and `ANSWER_TOKENS`
answer tokens (the loss mask), random ids; random normal patch rows for a video_grid_thw of
(frames / 2, side / 14, side / 14) at the config's fps (side from data.max_pixels: 1024 frames of
448 x 448 -> 131,072 vision tokens, + 1,024 text tokens). It goes through the trainer's
`inputs.model_batch` -> `stack` -> `place`; every configuration gets the same batch and the same
initial parameters, so their losses are comparable.

Measured per (kind, context), each in its own process (peak memory is per process; an out of memory
error is reported as OOM): the loss of every step (step 1 = the initial parameters; the first
update has the warm-up's learning rate 0, so step 2 repeats it); the median wall time of `--steps`
steps after the compile step; tokens/s per device = tokens per step / step time / c; peak memory
per device = max over the c devices of `peak_bytes_in_use` (state, batch and step together; "-" on
a CPU); the collective share: one more step under `jax.profiler`, the device time of all-gather
kernels (and of all collectives: + reduce-scatter, all-reduce, send / recv) per device, averaged
over the devices that ran kernels, over that step's wall time. Collectives overlap compute, and an
NCCL kernel's time includes waiting for the slowest peer, so the share bounds the exposed
communication from above ("-" when the trace has no device lines, as on a CPU). Loss check: step-1
loss of every context vs context 1 (or the smallest context that ran), max relative difference,
against 1e-5 for fp32 compute (the same arithmetic up to summation order;
tests/test_context_parallel.py uses the same bound) and 1e-2 for bf16 (2.5 bf16 roundings of 2^-8:
the shard shapes change XLA's tiling, so where bf16 roundings fall).
Prints markdown tables: every configuration, then VideoNSA vs dense per context.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import MARKER, run_worker  # noqa: E402
from videonsa_jax.config import ModelConfig  # noqa: E402
from videonsa_jax.parallel import context, create_mesh  # noqa: E402
from videonsa_jax.processing import chat  # noqa: E402
from videonsa_jax.training import configs  # noqa: E402
from videonsa_jax.training import inputs as inputs_lib  # noqa: E402
from videonsa_jax.training import state as state_lib  # noqa: E402
from videonsa_jax.training import step as step_lib  # noqa: E402

TINY_CONFIG = ROOT / "configs" / "tiny.py"
PREFIX_TOKENS, ANSWER_TOKENS = 16, 32  # text before the video; target tokens at the end
FIRST_TEXT_ID = 20  # random text ids are drawn from [FIRST_TEXT_ID, vocab), minus special ids
# Step-1 loss vs context 1, relative: fp32 compute; bf16 / fp16 compute (see the docstring).
FP32_TOLERANCE, HALF_TOLERANCE = 1e-5, 1e-2
COLLECTIVES = {  # kind -> pattern of kernel (GPU) / op (TPU) names, lower case
    "all-gather": r"(?<![a-z])all[-_]?gather",
    "reduce-scatter": r"reduce[-_]?scatter",
    "all-reduce": r"(?<![a-z])all[-_]?reduce",
    "send/recv": r"send[-_]?recv|collective[-_]?permute|(?<![a-z])all[-_]?to[-_]?all",
}
GIB = 2**30


# -- the configuration of one job ------------------------------------------------------------------


def full_attention_blocks(indexes: tuple[int, ...], depth: int) -> tuple[int, ...]:
    """The full-attention ViT blocks of a `depth`-block tower: those of `indexes` below `depth`,
    else the last block."""
    return tuple(i for i in indexes if i < depth) or (depth - 1,)


def frame_side(config: ml_collections.ConfigDict) -> int:
    """Frame side in pixels: the largest multiple of one merged token (28 px) in max_pixels."""
    v = config.model.vision
    unit = v.patch_size * v.spatial_merge_size
    return max(unit, math.isqrt(int(config.data.max_pixels)) // unit * unit)


def set_frames(config: ml_collections.ConfigDict, frames: int) -> None:
    """Sets the data fields to `frames` frames, keeping the config's text budget (max_length minus
    the vision tokens of max_frames) and 4 patch rows per vision token."""
    v, d = config.model.vision, config.data
    if frames <= 0 or frames % v.temporal_patch_size:
        raise ValueError(f"--frames must be a positive multiple of {v.temporal_patch_size}")
    per_step = (frame_side(config) // (v.patch_size * v.spatial_merge_size)) ** 2
    text = d.max_length - d.max_frames // v.temporal_patch_size * per_step
    vision = frames // v.temporal_patch_size * per_step
    d.max_frames = d.min_frames = frames
    d.max_length = vision + text
    d.num_patches = v.spatial_merge_size**2 * vision * d.batch_size


def bench_config(job: dict) -> ml_collections.ConfigDict:
    """The `--config` config reduced to one job: model size, attention kind, frames, mesh."""
    path, _, arg = job["config"].partition(":")
    c = configs.load_config_file(path, arg or None)
    if job["tiny"]:
        tiny = configs.load_config_file(str(TINY_CONFIG))
        for key in ("text", "vision", "attention", "dtype"):
            c.model[key] = tiny.model[key]
        c.data.update(max_length=tiny.data.max_length, max_frames=tiny.data.synthetic.num_frames)
        c.data.min_pixels = c.data.max_pixels = tiny.data.max_pixels
    c.model.init_from = ""
    c.model.attention.kind = job["kind"]
    c.model.text.num_layers = job["layers"]
    indexes = tuple(c.model.vision.fullatt_block_indexes)
    c.model.vision.depth = job["vision_layers"]
    c.model.vision.fullatt_block_indexes = full_attention_blocks(indexes, job["vision_layers"])
    set_frames(c, job["frames"] or c.data.max_frames)
    c.train.grad_accum = job["grad_accum"]
    c.mesh.update(data=1, fsdp=1, context=job["context"], tensor=1)
    return c


def special_ids(tiny: bool) -> dict[str, int]:
    """The vision token ids: the synthetic tokenizer's (chat.SPECIAL_TOKEN_NAMES in order, ids
    0..13) for the tiny model; {} keeps ModelConfig's Qwen2.5-VL ids."""
    if not tiny:
        return {}
    ids = {name: i for i, name in enumerate(chat.SPECIAL_TOKEN_NAMES)}
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


# -- the input -------------------------------------------------------------------------------------


def synthetic_batch(cfg: ModelConfig, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A collated batch (the fields `inputs.model_batch` reads) of `data.batch_size` rows of
    `data.max_length` tokens, each [prefix, <vision_start>, video pads, <vision_end>, question,
    answer]; the loss mask covers the answer. Seeded by `config.seed`.

    Returns input_ids / attention_mask int32 [B, L], loss_mask bool [B, L], pixel_values_videos
    float32 [B * patches, patch_dim], video_grid_thw [B, 3], second_per_grid_ts [B].
    """
    d, v = config.data, cfg.vision
    rng = np.random.default_rng(config.seed)
    b, length, side = d.batch_size, d.max_length, frame_side(config)
    steps, cells = d.max_frames // v.temporal_patch_size, side // v.patch_size
    grid = np.array([[steps, cells, cells]] * b)
    vision = int(grid[0].prod()) // v.spatial_merge_size**2
    if length - vision < PREFIX_TOKENS + 3 + ANSWER_TOKENS:
        raise ValueError(f"{length} tokens leave no room for the text around {vision} video tokens")
    ids = rng.integers(FIRST_TEXT_ID, cfg.text.vocab_size, (b, length), dtype=np.int32)
    specials = [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
                cfg.vision_end_token_id]  # fmt: skip
    ids[np.isin(ids, specials)] = FIRST_TEXT_ID
    ids[:, PREFIX_TOKENS] = cfg.vision_start_token_id
    ids[:, PREFIX_TOKENS + 1 : PREFIX_TOKENS + 1 + vision] = cfg.video_token_id
    ids[:, PREFIX_TOKENS + 1 + vision] = cfg.vision_end_token_id
    loss_mask = np.zeros((b, length), bool)
    loss_mask[:, -ANSWER_TOKENS:] = True
    patches = int(grid.prod(-1).sum())
    return {
        "input_ids": ids,
        "attention_mask": np.ones((b, length), np.int32),
        "loss_mask": loss_mask,
        "pixel_values_videos": rng.standard_normal((patches, v.patch_dim), np.float32),
        "video_grid_thw": grid,
        "second_per_grid_ts": np.full(b, v.temporal_patch_size / d.fps, np.float32),
    }


def training_batch(model, config: ml_collections.ConfigDict, mesh, rules) -> dict[str, Any]:
    """`synthetic_batch` through the trainer's input path: `model_batch` -> `stack` (grad_accum
    copies on a leading axis) -> `place` on the mesh."""
    placement = inputs_lib.Placement.of_process(mesh, rules, config.data.batch_size)
    unit = model.config.vision.spatial_merge_size**2
    patches = placement.num_patches(config.data.num_patches, unit)
    micro = inputs_lib.model_batch(model, synthetic_batch(model.config, config), patches)
    host, _ = inputs_lib.stack([micro] * config.train.grad_accum, None, placement.shards)
    return inputs_lib.place(host, placement, leading=1)


# -- one measurement (runs in a subprocess) --------------------------------------------------------


def timed_step(train_step, state, rest, batch) -> tuple[Any, float, float]:
    """One training step: (new state, its loss, wall seconds until state and metrics are ready)."""
    t0 = time.perf_counter()
    state, metrics = train_step(state, rest, batch)
    jax.block_until_ready((state, metrics))
    return state, float(metrics["loss"]), time.perf_counter() - t0


def peak_bytes(mesh: jax.sharding.Mesh) -> int | None:
    """Max over the mesh's devices of the process's peak device memory; None if not reported."""
    stats = [d.memory_stats() or {} for d in mesh.devices.flat]
    peaks = [s.get("peak_bytes_in_use") for s in stats]
    return None if None in peaks else max(peaks)


def trace_events(directory: str) -> list[dict]:
    (path,) = Path(directory).glob("**/perfetto_trace.json.gz")
    with gzip.open(path) as f:
        return json.load(f)["traceEvents"]


def collective_seconds(events: list[dict]) -> dict[str, float] | None:
    """Device seconds of collective kernels / ops by kind (`COLLECTIVES`), per device: averaged
    over the devices ("/device:..." trace processes) that ran anything. None without device lines.

    Kernel lines: a GPU's "Stream" threads; otherwise (TPU) its "XLA Ops" thread, else all threads.
    """
    procs = {e["pid"] for e in events if e.get("name") == "process_name"
             and "/device:" in e["args"]["name"]}  # fmt: skip
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("name") == "thread_name" and e["pid"] in procs}  # fmt: skip
    lines = (
        {k for k, name in threads.items() if "Stream" in name}
        or {k for k, name in threads.items() if name == "XLA Ops"}
        or set(threads)
    )
    ops = [e for e in events if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in lines]
    active = {e["pid"] for e in ops}
    if not active:
        return None
    seconds = dict.fromkeys(COLLECTIVES, 0.0)
    for e in ops:
        name = e["name"].lower()
        kind = next((k for k, pattern in COLLECTIVES.items() if re.search(pattern, name)), None)
        if kind is not None:
            seconds[kind] += e["dur"] / 1e6 / len(active)
    return seconds


def run_steps(config: ml_collections.ConfigDict, mesh, ids: dict[str, int], steps: int) -> dict:
    """Builds the state and the jitted step as train.py does, runs 1 + `steps` steps and one
    profiled step; returns the measurements (see the module docstring)."""
    rules = tuple(tuple(r) for r in config.sharding.rules)
    make_model = state_lib.model_factory(configs.model_config(config, ids), config)
    model = nnx.eval_shape(make_model)
    tx = step_lib.make_optimizer(config)
    graphdef, abstract, shardings = state_lib.abstract_state(model, tx, mesh, rules)
    rest = jax.jit(lambda: nnx.state(make_model(), nnx.Not(nnx.Param)))()
    state = state_lib.init_state(make_model, tx, shardings)
    batch = training_batch(model, config, mesh, rules)
    loss_fn = state_lib.lm_loss(config.train.loss_chunk_size)
    schedule = step_lib.learning_rate_schedule(config)
    train_step = jax.jit(
        context.with_mesh(
            step_lib.make_train_step(graphdef, tx, loss_fn, schedule, shardings.params), mesh
        ),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    losses, times = [], []
    for _ in range(1 + steps):
        state, loss, seconds = timed_step(train_step, state, rest, batch)
        losses.append(loss)
        times.append(seconds)
    peak = peak_bytes(mesh)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            state, _, traced_s = timed_step(train_step, state, rest, batch)
        collectives = collective_seconds(trace_events(d))
    tokens = int(np.sum(batch["inputs"].attention_mask))
    step_s = statistics.median(times[1:])
    return {
        "params": sum(x.size for x in jax.tree.leaves(abstract.params)),
        "T": config.data.max_length,
        "tokens": tokens,
        "losses": losses,
        "compile_s": times[0],
        "step_s": step_s,
        "tokens_per_s_per_device": tokens / step_s / mesh.size,
        "peak_bytes": peak,
        "traced_step_s": traced_s,
        "collective_s": collectives,
    }


def measure(job: dict) -> dict:
    """One (kind, context) job: "skipped" if the context does not divide the device count; an
    error of the JAX runtime (out of memory) becomes "error"."""
    devices = jax.devices()
    result = {**job, "devices": len(devices)}
    result["device"] = f"{devices[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
    if job["context"] > len(devices) or len(devices) % job["context"]:
        return {**result, "skipped": f"context {job['context']} does not divide the devices"}
    config = bench_config(job)
    mesh = create_mesh(config.mesh.to_dict(), devices[: job["context"]])
    result["dtype"] = config.model.dtype
    try:
        result.update(run_steps(config, mesh, special_ids(job["tiny"]), job["steps"]))
    except jax.errors.JaxRuntimeError as e:
        result["error"] = str(e).strip().split("\n")[0][:300]
    return result


# -- the driver ------------------------------------------------------------------------------------


def run_job(job: dict, timeout: float) -> dict:
    """Runs a job in a fresh Python process (`common.run_worker`, NCCL NVLink multicast off)."""
    return run_worker(__file__, job, timeout, env={"NCCL_NVLS_ENABLE": "0"})


def status(r: dict) -> str:
    """What went wrong in a job with an error: OOM, timeout or failed."""
    if "RESOURCE_EXHAUSTED" in r["error"]:
        return "OOM"
    return "timeout" if "timed out" in r["error"] else "failed"


def fmt(x: float | None, spec: str = ",.2f") -> str:
    return "-" if x is None else format(x, spec)


def share(r: dict, kinds: tuple[str, ...]) -> float | None:
    """Device time of these collective kinds over the profiled step's wall time."""
    c = r.get("collective_s")
    return None if c is None else sum(c[k] for k in kinds) / r["traced_step_s"]


def reference(runs: list[dict]) -> dict | None:
    """The run the losses of a kind are compared with: context 1, else the smallest that ran."""
    ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["context"])
    return ok[0] if ok else None


def rel_diff(r: dict, ref: dict) -> float:
    return abs(r["losses"][0] - ref["losses"][0]) / abs(ref["losses"][0])


def setting(r: dict | None, args: argparse.Namespace) -> str:
    """One line: device, model and sequence of the run (`r`: a configuration that ran)."""
    model = f"{args.config}{' (tiny)' if args.tiny else ''}: {args.layers} decoder layers, "
    model += f"{args.vision_layers} ViT blocks"
    if r is None:
        return model + "; no configuration ran."
    return (
        f"Device: {r['device']}. {model}, {r['dtype']}, {r['params'] / 1e6:,.1f}M parameters; "
        f"T = {r['T']:,} tokens per sequence, {r['tokens']:,} per step; median of {args.steps} "
        "steps after the compile step."
    )


def print_tables(results: list[dict], args: argparse.Namespace) -> None:
    """Every configuration, the loss check per kind, and VideoNSA vs dense per context."""
    ok = [r for r in results if "error" not in r]
    print()
    print(setting(ok[0] if ok else None, args))
    print()
    print(
        "| kind | context | step s | tokens/s per device | peak GiB per device | all-gather share "
        "| collectives share | compile + step 1 s | loss step 1 | loss last step "
        "| step-1 loss rel. diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for r in results:
        if "error" in r:
            print(f"| {r['kind']} | {r['context']} | {status(r)} |" + " - |" * 8)
            notes.append(f"- {r['kind']}, context {r['context']}: {r['error']}")
            continue
        ref = reference([x for x in results if x["kind"] == r["kind"]])
        peak = None if r["peak_bytes"] is None else r["peak_bytes"] / GIB
        gathers, collectives = share(r, ("all-gather",)), share(r, tuple(COLLECTIVES))
        print(
            f"| {r['kind']} | {r['context']} | {r['step_s']:.3f} "
            f"| {r['tokens_per_s_per_device']:,.0f} | {fmt(peak)} "
            f"| {fmt(gathers, '.1%')} | {fmt(collectives, '.1%')} "
            f"| {r['compile_s']:.1f} | {r['losses'][0]:.6f} | {r['losses'][-1]:.6f} "
            f"| {rel_diff(r, ref):.1e} |"
        )
    for note in notes:
        print(note)
    print()
    for kind in dict.fromkeys(r["kind"] for r in results):
        print_loss_check(kind, [r for r in ok if r["kind"] == kind])
    print_ratios(ok)


def print_loss_check(kind: str, runs: list[dict]) -> None:
    """One line: max relative step-1 loss difference of `kind`'s contexts vs the reference."""
    ref = reference(runs)
    others = [r for r in runs if r is not ref]
    if ref is None or not others:
        print(f"Loss check, {kind}: fewer than two contexts ran.")
        return
    worst = max(rel_diff(r, ref) for r in others)
    tol = FP32_TOLERANCE if ref["dtype"] == "float32" else HALF_TOLERANCE
    contexts = ",".join(str(r["context"]) for r in others)
    print(
        f"Loss check, {kind}: step-1 loss of contexts {contexts} vs context {ref['context']}: max "
        f"relative difference {worst:.1e}, tolerance {tol:.0e} ({ref['dtype']}): "
        f"{'OK' if worst <= tol else 'MISMATCH'}."
    )


def print_ratios(ok: list[dict]) -> None:
    """VideoNSA vs dense at each context where both ran."""
    by = {(r["kind"], r["context"]): r for r in ok}
    pairs = [(c, by[("videonsa", c)], by[("dense", c)]) for kind, c in by
             if kind == "videonsa" and ("dense", c) in by]  # fmt: skip
    if not pairs:
        return
    print()
    print(
        "| context | VideoNSA step s | dense step s | speed-up (dense / VideoNSA time) "
        "| peak memory VideoNSA / dense | all-gather share VideoNSA / dense |"
    )
    print("|---|---|---|---|---|---|")
    for c, nsa, dense in pairs:
        peaks = nsa["peak_bytes"], dense["peak_bytes"]
        memory = None if None in peaks else peaks[0] / peaks[1]
        gathers = share(nsa, ("all-gather",)), share(dense, ("all-gather",))
        gathered = "-" if None in gathers else f"{gathers[0]:.1%} / {gathers[1]:.1%}"
        print(
            f"| {c} | {nsa['step_s']:.3f} | {dense['step_s']:.3f} "
            f"| {dense['step_s'] / nsa['step_s']:.2f}x | {fmt(memory)} | {gathered} |"
        )


def config_path(arg: str) -> str:
    """`path[:arg]` with the path made absolute (relative to the repository if not found here)."""
    path, colon, rest = arg.partition(":")
    if not os.path.isfile(path) and (ROOT / path).is_file():
        path = str(ROOT / path)
    return os.path.abspath(path) + colon + rest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/long128k.py", help="config file[:arg]")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--vision-layers", type=int, default=2, help="ViT blocks")
    p.add_argument("--contexts", default="1,2,4,8", help="context sizes, comma separated")
    p.add_argument("--kinds", default="videonsa,dense", help="attention kinds, comma separated")
    p.add_argument("--steps", type=int, default=3, help="timed steps after the compile step")
    p.add_argument("--frames", type=int, default=None, help="video frames (the config's: 1024)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--tiny", action="store_true", help="configs/tiny.py's model and video")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    if args.worker:
        job = json.loads(args.worker)
        print(MARKER + json.dumps(measure(job)), flush=True)
        return

    base = dict(
        config=config_path(args.config), layers=args.layers, vision_layers=args.vision_layers,
        steps=args.steps, frames=args.frames, grad_accum=args.grad_accum, tiny=args.tiny,
    )  # fmt: skip
    results = []
    for kind in args.kinds.split(","):
        for c in args.contexts.split(","):
            result = run_job({**base, "kind": kind, "context": int(c)}, args.timeout)
            print(MARKER + json.dumps(result), flush=True)
            if "skipped" in result:
                print(f"skipped: {kind}, {result['skipped']} ({result['devices']})", flush=True)
            else:
                results.append(result)
    print_tables(results, args)


if __name__ == "__main__":
    main()
