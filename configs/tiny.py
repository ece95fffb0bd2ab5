r"""A tiny VideoNSA model trained from scratch on the synthetic needle task (CPU, minutes).

    python -m videonsa_jax.train --config=configs/tiny.py --workdir=/tmp/videonsa_tiny
    python -m videonsa_jax.train --config=configs/tiny.py:dense --workdir=/tmp/videonsa_tiny_dense

The first run writes the needle videos (32 frames of 56 x 56 pixels, 64 video tokens each) and a
small tokenizer into <workdir>/data. The model answers "what colour is the shape?" with one of 4
letters (chance: 25%); eval/accuracy on the held-out split is logged every `eval.every` steps.
The argument picks the attention: "videonsa" (default) or "dense" (the baseline). On a 2-core CPU
(shared, busy): 300 steps in ~6-8 minutes, eval accuracy 84% (VideoNSA) / 83% (dense) at the end.
Model: 2 decoder layers (hidden 64), a 2-block ViT (hidden 32), fp32 compute (bf16 is slow on CPU);
NSA blocks of 8 tokens, 2 selected blocks, a 16-token window.
"""

from videonsa_jax.training.configs import base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.seed = 0
    c.model.text.update(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        mrope_section=(2, 3, 3),
        max_position_embeddings=4096,
    )
    c.model.vision.update(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        fullatt_block_indexes=(1,),
    )
    c.model.attention.update(kind=arg or "videonsa", block_size=8, block_count=2, window_size=16)
    c.model.remat = "none"
    c.model.dtype = "float32"

    c.data.synthetic.update(task="needle", num_train=512, num_eval=64, num_frames=32, size=56)
    c.data.max_length = 192
    c.data.min_pixels = c.data.max_pixels = 56 * 56
    c.data.batch_size = 8
    c.data.num_patches = 8 * 256  # 64 tokens x 4 patch rows per video

    c.optim.lr = 2e-3
    c.optim.warmup_ratio = 0.05
    c.optim.end_lr_ratio = 0.1
    c.optim.b2 = 0.98

    c.train.num_steps = 300
    c.train.log_every = 10
    c.train.save_every = 100
    c.train.export = False

    c.eval.every = 100
    c.eval.batch_size = 16

    c.mesh.update(data=-1, fsdp=1)
    return c
