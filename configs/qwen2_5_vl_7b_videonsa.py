r"""VideoNSA fine-tuning of Qwen2.5-VL-7B: the paper's run (arXiv 2510.02295).

    python -m videonsa_jax.train --config=configs/qwen2_5_vl_7b_videonsa.py --workdir=DIR \
        --config.model.init_from=/path/to/Qwen2.5-VL-7B-Instruct \
        --config.data.train_jsonl=/path/to/llava_video_train.jsonl

Full fine-tune (ViT, merger, LLM and the new gates) from the Qwen2.5-VL-7B-Instruct weights, 36K
token context, videos at 4 fps and 50,176 pixels per frame, AdamW lr 1e-6 with 10% linear warmup
then cosine decay, weight decay 0.01, gradient clipping 1.0, bf16 compute with fp32 master weights
and optimizer state. NSA: blocks of 64 tokens, 32 selected blocks, a 256-token sliding window.
Batch: 4 sequences per step (1 per micro-batch, 4 accumulated), as in the paper's 8-GPU run, whose
8 GPUs split each sequence (Ulysses sequence parallelism): here the `context` axis takes all
devices (parameters are FSDP-sharded over it too). 3 epochs of the ~216K QA pairs.
The argument picks the attention ("videonsa" or "dense"); see qwen2_5_vl_7b_dense.py.
"""

from videonsa_jax.training.configs import base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.seed = 42
    c.model.init_from = "Qwen2.5-VL-7B-Instruct"  # an HF-format dir; override with the real path
    c.model.attention.update(kind=arg or "videonsa", block_size=64, block_count=32, window_size=256)
    c.model.remat = "full"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"

    c.data.max_length = 36864
    c.data.fps = 4.0
    c.data.max_frames = 768
    c.data.min_pixels = c.data.max_pixels = 64 * 28 * 28  # 50,176 pixels per frame
    c.data.batch_size = 1
    c.data.shuffle = False  # the paper's run reads the data in order
    c.data.read_threads = 4
    c.data.worker_count = 4

    c.optim.lr = 1e-6
    c.optim.warmup_ratio = 0.1
    c.optim.end_lr_ratio = 0.0
    c.optim.weight_decay = 0.01
    c.optim.grad_clip = 1.0

    c.train.num_steps = 3 * 216_000 // 4
    c.train.grad_accum = 4
    c.train.loss_chunk_size = 4096
    c.train.save_every = 200
    c.train.log_every = 10

    c.eval.every = 1000
    c.eval.batch_size = 1
    c.eval.max_batches = 200

    c.mesh.update(data=1, fsdp=1, context=-1, tensor=1)
    return c
