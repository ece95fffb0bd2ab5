r"""Qwen2.5-VL-7B VideoNSA with a 128K-token vision context, sequence parallel.

    python -m videonsa_jax.train --config=configs/long128k.py:h200 --workdir=DIR \
        --config.model.init_from=/path/to/Qwen2.5-VL-7B-Instruct --config.data.train_jsonl=F
    python -m videonsa_jax.train --config=configs/long128k.py:v5p --workdir=gs://BUCKET/run ...
    python -m videonsa_jax.train --config=configs/long128k.py:h200 --workdir=/tmp/x --dry_run

Vision context: 1024 frames sampled at 2 fps (8.5 minutes of video) at 448 x 448 pixels. The ViT
merges 2 frames x 28 x 28 pixels into one token: 1024 / 2 * (448 / 28) ** 2 = 512 * 256 = 131,072
vision tokens, plus up to 1,024 text tokens: max_length 132,096 = 129 * 1,024, a multiple of
context * block_size on both meshes (no padding).

Meshes (the argument), parameters and optimizer state FSDP-sharded over fsdp x context:
    "h200": 8 x H200 (one host, NVLink): context 8; one sequence per step (grad_accum 8).
    "v5p":  v5p-128 pod slice (64 chips, ICI): fsdp 8 x context 8; 8 sequences per step.
Sequence parallelism stays inside one NVLink domain / TPU slice (the K/V all-gather needs ICI or
NVLink bandwidth). Remat: every decoder layer is recomputed in the backward pass ("full": only the
layer inputs, [B, T / context, hidden] bf16, are kept).
"""

from videonsa_jax.training.configs import base_config

FRAMES = 1024
FPS = 2.0
FRAME_SIDE = 448  # pixels
VISION_TOKENS = FRAMES // 2 * (FRAME_SIDE // 28) ** 2  # 131,072
TEXT_TOKENS = 1024

MESHES = {
    "h200": dict(data=1, fsdp=1, context=8, tensor=1),
    "v5p": dict(data=1, fsdp=8, context=8, tensor=1),
}
BATCH = {"h200": (1, 8), "v5p": (8, 1)}  # (sequences per micro-batch, micro-batches per step)


def get_config(arg: str | None = None):
    target = arg or "h200"
    if target not in MESHES:
        raise ValueError(f"configs/long128k.py:<target> must be one of {sorted(MESHES)}")
    c = base_config()
    c.seed = 42
    c.model.init_from = "Qwen2.5-VL-7B-Instruct"  # an HF-format dir; override with the real path
    c.model.attention.update(kind="videonsa", block_size=64, block_count=32, window_size=256)
    c.model.remat = "full"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"

    c.data.fps = FPS
    c.data.max_frames = c.data.min_frames = FRAMES
    c.data.min_pixels = c.data.max_pixels = FRAME_SIDE * FRAME_SIDE
    c.data.max_length = VISION_TOKENS + TEXT_TOKENS
    c.data.num_patches = 4 * VISION_TOKENS * BATCH[target][0]  # 4 patch rows per vision token
    c.data.batch_size, c.train.grad_accum = BATCH[target]
    c.data.read_threads = 4
    c.data.worker_count = 4

    c.optim.lr = 1e-6
    c.optim.warmup_ratio = 0.1
    c.train.num_steps = 2000
    c.train.loss_chunk_size = 1024
    c.train.save_every = 100
    c.eval.every = 0

    c.mesh.update(MESHES[target])
    return c
