"""Dry run of a training config: will the step fit in device memory? Nothing is allocated.

    python -m videonsa_jax.train --config=configs/long128k.py:h200 --workdir=/tmp/x --dry_run=auto

The model and optimizer state are built abstractly (`nnx.eval_shape`) and sharded by the config's
mesh and rules, so the per-device state size is exact. The rest of the step's memory comes from:

* "compile": XLA's memory analysis of the compiled training step (`jit(...).lower(...).compile()
  .memory_analysis()`), on the devices of this process; needs as many devices as the mesh and a
  backend that reports it (the step is compiled for this backend: run it on the target machine);
* "analytic": an estimate whose formula is printed term by term (any mesh, any machine).

"auto" compiles when this process sees the mesh's devices on a GPU or TPU backend, else estimates.
"""

from __future__ import annotations

import math
import os

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from videonsa_jax.config import ModelConfig
from videonsa_jax.model.vision import GROUP_LOGITS_BYTES
from videonsa_jax.parallel import context
from videonsa_jax.parallel.mesh import MESH_AXES, create_mesh, resolve_mesh_shape
from videonsa_jax.training import configs
from videonsa_jax.training import inputs as inputs_lib
from videonsa_jax.training import state as state_lib
from videonsa_jax.training import step as step_lib

MODES = ("auto", "analytic", "compile")
GIB = 2**30
# Usable memory per device of common targets (bytes), for the "fits" verdict.
DEVICE_MEMORY = {
    "H100 80GB": 80e9,
    "H200 141GB": 141e9,
    "TPU v5p 95GB": 95e9,
    "TPU v6e 32GB": 32e9,
    "TPU v5e 16GB": 16e9,
}
HEADROOM = 0.9  # keep 10% for XLA's own buffers and fragmentation


def _size(num_bytes: float) -> str:
    return (
        f"{num_bytes / GIB:8.2f} GiB" if num_bytes >= GIB / 10 else f"{num_bytes / 2**20:8.2f} MiB"
    )


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The run's ModelConfig; without init_from's config.json, the one of `config.model.text` /
    `vision` (the defaults are Qwen2.5-VL-7B's)."""
    init = config.model.init_from
    if init and not os.path.isfile(os.path.join(init, "config.json")):
        config = ml_collections.ConfigDict(config.to_dict())
        config.model.init_from = ""
    return configs.model_config(config, {})


def _mesh_shape(config: ml_collections.ConfigDict) -> dict[str, int]:
    sizes = [config.mesh.to_dict().get(a, 1) for a in MESH_AXES]
    known = math.prod(s for s in sizes if s != -1)
    total = known if -1 not in sizes else max(known, jax.device_count())
    return dict(zip(MESH_AXES, resolve_mesh_shape(sizes, total), strict=True))


def _per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def synthetic_batch(model, config: ml_collections.ConfigDict) -> dict:
    """A host micro-batch of the config's shapes: each row is text + one video as long as
    max_length, max_frames, max_pixels and num_patches allow (zero pixels)."""
    d, cfg = config.data, model.config
    b, length = d.batch_size, d.max_length
    side = max(28, int(math.isqrt(int(d.max_pixels))) // 28 * 28)
    per_step = (side // 28) ** 2  # tokens per temporal patch (2 frames)
    num_patches = d.num_patches or 4 * length * b
    tokens = min(d.max_frames // 2 * per_step, length - 16, num_patches // (4 * b))
    steps = tokens // per_step
    tokens = steps * per_step
    ids = np.full((b, length), 100, np.int32)
    ids[:, 4] = cfg.vision_start_token_id
    ids[:, 5 : 5 + tokens] = cfg.video_token_id
    ids[:, 5 + tokens] = cfg.vision_end_token_id
    grid = np.array([[steps, side // 14, side // 14]] * b)
    pixels = np.zeros((int(grid.prod(-1).sum()), cfg.vision.patch_dim), np.float32)
    inputs = model.prepare_inputs(
        ids, None, pixel_values_videos=pixels, video_grid_thw=grid, num_patches=num_patches
    )
    return {"inputs": inputs, "loss_mask": np.ones((b, length), bool)}


def _compiled(config, model_cfg, mesh) -> dict[str, int]:
    """XLA's memory analysis of the compiled training step on `mesh`."""
    rules = tuple(tuple(r) for r in config.sharding.rules)
    make_model = state_lib.model_factory(model_cfg, config)
    model = nnx.eval_shape(make_model)
    tx = step_lib.make_optimizer(config)
    graphdef, abstract, shardings = state_lib.abstract_state(model, tx, mesh, rules)
    rest = jax.eval_shape(lambda: nnx.state(make_model(), nnx.Not(nnx.Param)))
    micro = synthetic_batch(model, config)
    accum = config.train.grad_accum
    host = jax.tree.map(lambda x: np.broadcast_to(x[None], (accum, *np.shape(x))), micro)
    batch_shardings = inputs_lib.shardings(host, mesh, rules, leading=1)
    batch = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), host, batch_shardings
    )
    step = step_lib.make_train_step(
        graphdef,
        tx,
        state_lib.lm_loss(config.train.loss_chunk_size),
        step_lib.learning_rate_schedule(config),
        shardings.params,
    )
    jitted = jax.jit(context.with_mesh(step, mesh), out_shardings=(shardings, None))
    analysis = jitted.lower(abstract, rest, batch).compile().memory_analysis()
    if analysis is None:
        raise NotImplementedError(f"the {jax.default_backend()} backend gives no memory analysis")
    names = ("argument", "output", "temp", "alias", "generated_code")
    return {n: int(getattr(analysis, f"{n}_size_in_bytes", 0)) for n in names}


def analytic_terms(
    config: ml_collections.ConfigDict,
    model_cfg: ModelConfig,
    mesh: dict[str, int],
    state: int,
    params: int,
) -> list[tuple[str, str, float]]:
    """(name, formula, bytes) per device of the estimate; `state` / `params`: exact bytes of the
    sharded train state / parameters."""
    t, v, a = model_cfg.text, model_cfg.vision, model_cfg.attention
    act = 2 if config.model.dtype in ("bfloat16", "float16") else 4
    batch_ways = mesh["data"] * mesh["fsdp"]
    b = -(-config.data.batch_size // batch_ways)
    cp = mesh["context"]
    seq = -(-config.data.max_length // (cp * a.block_size)) * cp * a.block_size
    tl = seq // cp
    hd, kv = t.hidden_size, t.num_kv_heads * t.head_dim
    patches = config.data.num_patches or 4 * config.data.max_length * config.data.batch_size
    rows = -(-patches // (batch_ways * cp))
    text_rows = configs_text_rows(config)
    saved_per_layer = b * tl * hd * act
    layer = b * tl * (10 * hd + 3 * t.intermediate_size + 4 * t.num_heads * t.head_dim) * act
    gathered = b * 4 * seq * kv * act
    dense = b * min(-(-text_rows // cp), 1024) * t.num_heads * seq * 4 * 2
    logits = b * min(config.train.loss_chunk_size, tl) * t.vocab_size * 4 * 3
    window = v.merge_window**2 * v.spatial_merge_size**2
    full_remat = config.model.remat == "full"
    vit_block = rows * (6 * v.hidden_size + 3 * v.intermediate_size) * act
    vit_block += rows * v.num_heads * window * 4 * 2  # window attention probs (fp32, + grad)
    # full-attention blocks: one query chunk's fp32 logits, probs and their grad
    vit_block += (
        3 * min(GROUP_LOGITS_BYTES, patches * v.num_heads * patches * 4) / (batch_ways * cp)
    )
    vit_saved = v.depth * rows * v.hidden_size * act  # block inputs under remat
    vit = vit_saved + vit_block if full_remat else v.depth * vit_block
    vit_formula = (
        f"depth {v.depth} x patch rows/device {rows} x hidden {v.hidden_size} x {act} B (remat: "
        f"block inputs) + one block: rows x (6 x {v.hidden_size} + 3 x {v.intermediate_size}) x "
        f"{act} B + window attention probs + 3 x full-attention query chunk logits / devices"
        if full_remat
        else f"depth {v.depth} x (patch rows/device {rows} x (6 x {v.hidden_size} + 3 x "
        f"{v.intermediate_size}) x {act} B + window attention probs + full-attention chunk logits)"
    )
    return [
        ("state", "params + optimizer moments, sharded (exact)", state),
        ("grads", "2 x fp32 params (accumulated + micro-batch gradients)", 2 * params),
        (
            "decoder saved",
            f"layers {t.num_layers} x B {b} x T/context {tl} x hidden {hd} x {act} B"
            + ("" if full_remat else " x ~8 (remat != full)"),
            t.num_layers * saved_per_layer * (1 if full_remat else 8),
        ),
        (
            "decoder layer",
            f"B x T/context x (10 hidden + 3 mlp {t.intermediate_size} + 4 q dims) x {act} B",
            layer,
        ),
        ("gathered K/V", f"B x 4 (K, V, dK, dV) x T {seq} x kv dims {kv} x {act} B", gathered),
        (
            "text rows",
            f"B x min(ceil({text_rows} text rows / context), 1024) x heads x T x 4 B x 2",
            dense,
        ),
        ("loss chunk", f"B x chunk x vocab {t.vocab_size} x 4 B x 3", logits),
        ("vision tower", vit_formula, vit),
    ]


def configs_text_rows(config: ml_collections.ConfigDict) -> int:
    """Text rows per sequence: what max_length leaves after the largest video."""
    d = config.data
    side = max(28, int(math.isqrt(int(d.max_pixels))) // 28 * 28)
    video = d.max_frames // 2 * (side // 28) ** 2
    return max(d.max_length - video, 64)


def report(config: ml_collections.ConfigDict, mode: str = "auto") -> str:
    """The dry-run report: mesh, parameters, exact state bytes, and the step's memory per device."""
    if mode not in MODES:
        raise ValueError(f"dry-run mode must be one of {MODES}, got {mode!r}")
    model_cfg = model_config(config)
    shape = _mesh_shape(config)
    devices = math.prod(shape.values())
    mesh = AbstractMesh(tuple(shape.values()), MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    rules = tuple(tuple(r) for r in config.sharding.rules)
    model = nnx.eval_shape(state_lib.model_factory(model_cfg, config))
    tx = step_lib.make_optimizer(config)
    _, abstract, _ = state_lib.abstract_state(model, tx, mesh, rules)
    num_params = sum(x.size for x in jax.tree.leaves(abstract.params))
    state = _per_device_bytes(abstract)
    lines = [
        f"mesh {shape} ({devices} devices); {num_params / 1e6:,.1f}M parameters; "
        f"{config.model.attention.kind} attention; remat {config.model.remat}",
        f"sequence {config.data.max_length} tokens x batch {config.data.batch_size} "
        f"(x {config.train.grad_accum} accumulated)",
        f"state per device (params + optimizer, exact): {_size(state).strip()}",
    ]
    can_compile = jax.device_count() >= devices and (
        mode == "compile" or jax.default_backend() in ("gpu", "tpu")
    )
    if mode != "analytic" and can_compile:
        sizes = _compiled(config, model_cfg, create_mesh(shape, jax.devices()[:devices]))
        lines.append(f"XLA memory analysis of the compiled step ({jax.default_backend()}):")
        lines += [f"  {k:<15} {_size(v)}" for k, v in sizes.items()]
        peak = sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"]
        lines.append(
            f"  peak ~ argument + output + temp - alias = {_size(peak).strip()} per device"
        )
        return "\n".join(lines + [fits(peak)])
    if mode == "compile":
        raise ValueError(
            f"compiling needs {devices} devices; this process sees {jax.device_count()}"
        )
    params = _per_device_bytes(abstract.params)
    terms = analytic_terms(config, model_cfg, shape, state, params)
    lines.append("analytic estimate per device (bytes of each term; transients counted once):")
    lines += [f"  {name:<14} {_size(b)}  = {formula}" for name, formula, b in terms]
    total = sum(b for _, _, b in terms)
    lines.append(f"  total          {_size(total)}  (sum of the terms above)")
    return "\n".join(lines + [fits(total)])


def fits(per_device: float) -> str:
    """One line: on which devices `per_device` bytes fit with HEADROOM (this process's device
    first, when it reports its memory)."""
    targets = dict(DEVICE_MEMORY)
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        targets = {f"this {jax.local_devices()[0].device_kind}": stats["bytes_limit"], **targets}
    verdicts = [
        f"{name} {'yes' if per_device <= HEADROOM * limit else 'no'}"
        for name, limit in targets.items()
    ]
    return f"fits (<= {HEADROOM:.0%} of device memory): " + ", ".join(verdicts)
