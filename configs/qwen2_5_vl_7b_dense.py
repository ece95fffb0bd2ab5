r"""The dense-attention baseline of qwen2_5_vl_7b_videonsa.py: the same run with Qwen2.5-VL's own
attention everywhere (no NSA, no gates).

    python -m videonsa_jax.train --config=configs/qwen2_5_vl_7b_dense.py --workdir=DIR \
        --config.model.init_from=/path/to/Qwen2.5-VL-7B-Instruct \
        --config.data.train_jsonl=/path/to/llava_video_train.jsonl
"""

import importlib.util
import os


def get_config(arg: str | None = None):
    del arg
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen2_5_vl_7b_videonsa.py")
    spec = importlib.util.spec_from_file_location("qwen2_5_vl_7b_videonsa", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("dense")
