"""The training config schema shared by `configs/*.py`, and what is derived from it.

Every key a run may set exists in `base_config()`, so a locked config rejects typos (also in
`--config.key=value` overrides). Sections:

  model     init_from (an HF-format checkpoint dir; '' = build from `text` / `vision` from
            scratch), text / vision (architecture fields of `TextConfig` / `VisionConfig`, used only
            from scratch), attention (the `AttentionConfig` fields), remat, dtype, param_dtype.
  data      train / eval JSONL (LLaVA-Video style), tokenizer dir (default: init_from), video
            sampling and pixel budget, max_length, batch_size (global, per micro-batch),
            num_patches (ViT patch rows per micro-batch, fixed for jit), `synthetic` (generate a
            synthetic task into <workdir>/data instead of reading JSONL files).
  optim     AdamW + warmup-cosine: lr, warmup_ratio, end_lr_ratio, b1, b2, eps, weight_decay,
            grad_clip.
  train     num_steps, grad_accum (micro-batches per step), loss_chunk_size, log_every,
            save_every, keep_checkpoints, max_nonfinite_steps, export (save_pretrained at the end).
  eval      every (steps; 0 = never), batch_size, max_batches (0 = the whole split).
  mesh      data / fsdp / context / tensor sizes (-1 = the remaining devices).
  sharding  rules: (logical axis, mesh axes or None) pairs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import ml_collections

from videonsa_jax.config import AttentionConfig, ModelConfig, TextConfig, VisionConfig

# Logical axis -> mesh axes. Parameters: FSDP over `fsdp` (and `context`, which otherwise holds no
# parameters), tensor parallelism over `tensor`; the stacked-layer axis is never split.
# Inputs: batch over (`data`, `fsdp`), sequence over `context`.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("embed", ("fsdp", "context")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("vision_embed", ("fsdp", "context")),
    ("vision_heads", "tensor"),
    ("vision_mlp", "tensor"),
    ("vision_merged", ("fsdp", "context")),
)


def _fields(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def base_config() -> ml_collections.ConfigDict:
    """Defaults of every key; config files change what they need and return it."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.init_from = ""
    c.model.text = _fields(TextConfig())
    c.model.vision = _fields(VisionConfig())
    c.model.attention = _fields(AttentionConfig())
    c.model.remat = "full"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"

    c.data = ml_collections.ConfigDict()
    c.data.train_jsonl = ""
    c.data.eval_jsonl = ""
    c.data.media_root = ""
    c.data.tokenizer = ""
    c.data.max_length = 36864
    c.data.fps = 2.0
    c.data.max_frames = 768
    c.data.min_frames = 4
    c.data.min_pixels = 128 * 28 * 28
    c.data.max_pixels = 768 * 28 * 28
    c.data.batch_size = 1
    c.data.num_patches = 0  # 0: 4 patch rows per token of max_length, for every batch row
    c.data.shuffle = True
    c.data.read_threads = 1
    c.data.worker_count = 0
    c.data.synthetic = ml_collections.ConfigDict()
    c.data.synthetic.task = ""  # "needle" | "counting" | "order"; "" = read JSONL files
    c.data.synthetic.num_train = 0
    c.data.synthetic.num_eval = 0
    c.data.synthetic.num_frames = 32
    c.data.synthetic.size = 56

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-5
    c.optim.warmup_ratio = 0.1
    c.optim.end_lr_ratio = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.01
    c.optim.grad_clip = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000
    c.train.grad_accum = 1
    c.train.loss_chunk_size = 2048
    c.train.log_every = 10
    c.train.save_every = 200
    c.train.keep_checkpoints = 3
    c.train.max_nonfinite_steps = 10
    c.train.export = True

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0
    c.eval.batch_size = 1
    c.eval.max_batches = 0

    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, context=1, tensor=1))
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = DEFAULT_RULES
    return c


def model_config(config: ml_collections.ConfigDict, special_ids: dict[str, int]) -> ModelConfig:
    """The run's `ModelConfig`: `init_from`'s config.json, or `text` / `vision` from scratch.

    The attention fields and remat always come from `config.model`; from scratch, the special
    token ids come from the tokenizer (`special_ids`).
    """
    m = config.model
    attention = m.attention.to_dict()
    if m.init_from:
        return ModelConfig.from_json_file(
            os.path.join(m.init_from, "config.json"),
            attention=attention.pop("kind"),
            remat=m.remat,
            **attention,
        )
    return ModelConfig(
        text=TextConfig(**m.text.to_dict()),
        vision=VisionConfig(**m.vision.to_dict()),
        attention=AttentionConfig(**attention),
        remat=m.remat,
        **special_ids,
    )


def check_paths(config: ml_collections.ConfigDict) -> None:
    """Fails with one clear message when a path the run needs does not exist."""
    init = config.model.init_from
    if init and not os.path.isfile(os.path.join(init, "config.json")):
        raise FileNotFoundError(
            f"config.model.init_from={init!r} is not a checkpoint directory (no config.json); "
            "pass an HF-format dir (config.json + *.safetensors): --config.model.init_from=DIR"
        )
    if config.data.synthetic.task:
        return
    for key in ("train_jsonl", "eval_jsonl"):
        path = config.data[key]
        if (path or key == "train_jsonl") and not os.path.isfile(path):
            raise FileNotFoundError(
                f"config.data.{key}={path!r} is not a file; pass --config.data.{key}=FILE.jsonl"
            )
    if not (config.data.tokenizer or init):
        raise ValueError("set config.data.tokenizer (a dir with tokenizer.json) or model.init_from")


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of a python config file (`configs/long128k.py`, "h200"), or
    `get_config()` without an argument (what `--config=path[:arg]` does)."""
    spec = importlib.util.spec_from_file_location(os.path.basename(path).removesuffix(".py"), path)
    if spec is None or not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)
