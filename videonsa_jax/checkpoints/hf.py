"""HF safetensors checkpoints <-> `Qwen2_5_VL`.

Every parameter leaf of the model has one HF name (Hub layout: `model.layers.*`, `visual.*`,
`lm_head.weight`), derived from its path by `hf_name`; leaves stacked over decoder layers (leading
`layers` axis) map to one tensor per layer. transformers 5.x in-memory names
(`model.language_model.*`, `model.visual.*`) are normalised to the Hub names on load.

Loading builds the model abstractly (`nnx.eval_shape`), checks every tensor name and shape in the
file headers before reading any data, then fills one leaf at a time from the files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from videonsa_jax.config import ModelConfig
from videonsa_jax.model.qwen2_5_vl import Qwen2_5_VL

logger = logging.getLogger(__name__)

Path = tuple[Any, ...]

# Our dotted path (stacked layer index as "{i}") -> HF name, applied in order.
_RENAMES = (
    (r"^text\.embed_tokens$", "model.embed_tokens.weight"),
    (r"^text\.", "model."),
    (r"^visual\.patch_embed\.kernel$", "visual.patch_embed.proj.weight"),
    (r"\.mlp_(\d+)\.", r".mlp.\1."),
    (r"\.kernel$", ".weight"),
)
# transformers 5.x in-memory names -> Hub names.
_LAYOUTS = (
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^model\.visual\."), "visual."),
)
# Ignored when present in a checkpoint.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# HF names that may be absent (the leaf keeps its fresh initialisation) or present without a
# model leaf (skipped, e.g. VideoNSA gates loaded with attention="dense"); both logged.
OPTIONAL_KEYS: tuple[str, ...] = (r"\.self_attn\.g_proj_\d\.",)

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_SAFETENSORS_SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint does not match the model (missing / unexpected tensors, shape mismatches)."""


def hf_name(path: Path) -> str:
    """HF Hub name of a parameter leaf; stacked leaves contain a "{i}" layer placeholder."""
    name = ".".join(str(p) for p in path)
    for pattern, repl in _RENAMES:
        name = re.sub(pattern, repl, name)
    return name


def _is_stacked(var: nnx.Variable) -> bool:
    axes = var.get_metadata().get("out_sharding") or ()
    return bool(axes) and axes[0] == "layers"


def _leaf_names(path: Path, var: nnx.Variable) -> list[str]:
    """HF names of one leaf: one per layer for stacked leaves."""
    if not _is_stacked(var):
        return [hf_name(path)]
    i = path.index("layers") + 1
    template = hf_name((*path[:i], "{i}", *path[i:]))
    return [template.format(i=layer) for layer in range(var.shape[0])]


def _hf_shape(name: str, shape: tuple[int, ...], stacked: bool, config: ModelConfig) -> tuple:
    """Shape of the HF tensor for our (per-layer) leaf shape."""
    shape = shape[1:] if stacked else shape
    if name.endswith("patch_embed.proj.weight"):
        v = config.vision
        return (shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    if _is_linear(name, len(shape)):
        return shape[::-1]
    return shape


def _is_linear(name: str, ndim: int) -> bool:
    """torch Linear weight [out, in] stored transposed as our kernel [in, out]."""
    return ndim == 2 and name.endswith(".weight") and "embed_tokens" not in name


def _to_ours(name: str, tensor: np.ndarray) -> np.ndarray:
    if name.endswith("patch_embed.proj.weight"):
        return tensor.reshape(tensor.shape[0], -1).T
    return tensor.T if _is_linear(name, tensor.ndim) else tensor


def _to_hf(name: str, value: np.ndarray, hf_shape: tuple) -> np.ndarray:
    if name.endswith("patch_embed.proj.weight"):
        return value.T.reshape(hf_shape)
    return value.T if _is_linear(name, value.ndim) else value


def _canonical(key: str) -> str:
    for pattern, repl in _LAYOUTS:
        key = pattern.sub(repl, key)
    return key


def _checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, _SAFETENSORS_INDEX)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(path, _SAFETENSORS_SINGLE)
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"{path}: neither {_SAFETENSORS_INDEX} nor {_SAFETENSORS_SINGLE} found")


def _abstract_model(config: ModelConfig, dtype, param_dtype) -> Qwen2_5_VL:
    return nnx.eval_shape(
        lambda: Qwen2_5_VL(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )


def _fresh_leaves(config: ModelConfig, dtype, param_dtype, paths: set[Path]) -> dict[Path, Any]:
    """Initial values of a few leaves (jit drops the initialisers of all the others)."""
    if not paths:
        return {}

    @jax.jit
    def init():
        model = Qwen2_5_VL(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
        flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
        return {p: v.get_value() for p, v in flat if p in paths}

    return init()


def from_pretrained(
    path: str | os.PathLike[str],
    dtype=jnp.bfloat16,
    attention: str | None = None,
    *,
    param_dtype=None,
    sharding: Callable[[Path, nnx.Variable], jax.sharding.Sharding] | None = None,
    **overrides: Any,
) -> Qwen2_5_VL:
    """Loads a Qwen2.5-VL / VideoNSA HF checkpoint directory.

    Args:
        path: directory with config.json and model.safetensors or a sharded index.
        dtype: activation dtype, and parameter dtype unless `param_dtype` is given.
        attention: "dense" | "videonsa" | "videonsa_release"; default: as the config says.
            "videonsa_release" also sets rope_time_rule="int" unless overridden.
        param_dtype: parameters are cast to it (default `dtype`).
        sharding: optional (path, abstract variable) -> Sharding, to place each leaf directly.
        **overrides: `ModelConfig.replace` overrides (e.g. block_count=64, remat="full").

    Raises:
        CheckpointError: naming every missing, unexpected or mis-shaped tensor (shapes of both
            sides); raised before any tensor data is read.
    """
    path = os.fspath(path)
    if attention is not None:
        overrides["attention"] = attention
    if attention == "videonsa_release":  # The released model's temporal M-RoPE rule.
        overrides.setdefault("rope_time_rule", "int")
    config = ModelConfig.from_json_file(os.path.join(path, "config.json"), **overrides)
    param_dtype = dtype if param_dtype is None else param_dtype
    graphdef, state = nnx.split(_abstract_model(config, dtype, param_dtype))
    flat = list(nnx.to_flat_state(state))

    with contextlib.ExitStack() as stack:
        files = {}  # canonical name -> (handle, stored name)
        for file in _checkpoint_files(path):
            handle = stack.enter_context(safe_open(file, framework="flax"))
            for key in handle.keys():
                if _IGNORED.search(key):
                    continue
                name = _canonical(key)
                if name in files:
                    raise CheckpointError(f"{path}: tensor {name} is stored twice (as {key})")
                files[name] = (handle, key)

        missing_optional = _check(path, flat, files, config)
        fresh = _fresh_leaves(config, dtype, param_dtype, missing_optional)
        leaves = []
        for p, var in flat:
            if p in fresh:
                value = np.asarray(fresh.pop(p))
            else:
                value = _read_leaf(p, var, files)
            target = sharding(p, var) if sharding is not None else None
            leaves.append((p, var.replace(value=jax.device_put(value, target))))
            del value
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def _check(path: str, flat, files: dict, config: ModelConfig) -> set[Path]:
    """Validates names and shapes; returns the paths of absent optional leaves."""
    problems, expected, missing_optional, absent_optional = [], set(), set(), []
    for p, var in flat:
        names = _leaf_names(p, var)
        expected.update(names)
        want = _hf_shape(names[0], tuple(var.shape), _is_stacked(var), config)
        absent = [n for n in names if n not in files]
        optional = any(re.search(pattern, names[0]) for pattern in OPTIONAL_KEYS)
        if optional and len(absent) == len(names):
            missing_optional.add(p)
            layers = f" (x{len(names)} layers)" if len(names) > 1 else ""
            absent_optional.append(names[0] + layers)
            continue
        problems += [f"missing tensor {n} (model expects shape {want})" for n in absent]
        for n in names:
            if n in files:
                handle, key = files[n]
                got = tuple(handle.get_slice(key).get_shape())
                if got != want:
                    problems.append(f"tensor {n}: checkpoint shape {got} != model shape {want}")
    tied_head = config.text.tie_word_embeddings and "lm_head.weight" in files
    for name in sorted(set(files) - expected - ({"lm_head.weight"} if tied_head else set())):
        handle, key = files[name]
        if any(re.search(pattern, name) for pattern in OPTIONAL_KEYS):
            logger.warning("%s: %s is not used by this model; skipped", path, key)
            continue
        shape = tuple(handle.get_slice(key).get_shape())
        problems.append(f"unexpected tensor {key} (checkpoint shape {shape}, not in the model)")
    if problems:
        raise CheckpointError(f"{path} does not match the model:\n  " + "\n  ".join(problems))
    if absent_optional:
        logger.warning(
            "%s: %s absent from the checkpoint; freshly initialised",
            path,
            ", ".join(absent_optional),
        )
    return missing_optional


def _read_leaf(p: Path, var: nnx.Variable, files: dict) -> np.ndarray:
    names = _leaf_names(p, var)
    out = np.empty(var.shape, var.dtype)
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        for i, name in enumerate(names):
            handle, key = files[name]
            tensor = np.asarray(handle.get_tensor(key).astype(var.dtype))
            if _is_stacked(var):
                out[i] = _to_ours(name, tensor)
            else:
                out[...] = _to_ours(name, tensor)
    return out


def _tensors(model: Qwen2_5_VL) -> Iterator[tuple[str, nnx.Variable, int | None, tuple]]:
    """(HF name, variable, layer index or None, HF shape) of every tensor of the model."""
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        stacked = _is_stacked(var)
        for i, name in enumerate(_leaf_names(p, var)):
            shape = _hf_shape(name, tuple(var.shape), stacked, model.config)
            yield name, var, (i if stacked else None), shape


def save_pretrained(
    model: Qwen2_5_VL, path: str | os.PathLike[str], *, max_shard_size: int = 4 << 30
) -> None:
    """Writes config.json + Hub-layout safetensors (sharded with an index above max_shard_size).

    Tensors keep the model's parameter dtype; they are fetched to the host one at a time per shard.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    plan, shards, size = list(_tensors(model)), [[]], 0
    for entry in plan:
        nbytes = int(np.prod(entry[3])) * entry[1].dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    names = (
        [_SAFETENSORS_SINGLE]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    weight_map, total = {}, 0
    for file, shard in zip(names, shards, strict=True):
        tensors = {}
        for name, var, layer, shape in shard:
            value = var[...] if layer is None else var[...][layer]
            tensors[name] = np.ascontiguousarray(_to_hf(name, np.asarray(value), shape))
            weight_map[name] = file
            total += tensors[name].nbytes
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(path, _SAFETENSORS_INDEX), "w") as f:
            json.dump(index, f, indent=2)
    param_dtype = next(iter(plan))[1].dtype if plan else jnp.float32
    hf_config = model.config.to_hf_dict() | {"dtype": jnp.dtype(param_dtype).name}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
