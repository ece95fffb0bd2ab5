"""videonsa-jax: Qwen2.5-VL with VideoNSA hybrid sparse attention in JAX/Flax.

    import videonsa_jax as vj
    model = vj.from_pretrained(path, dtype=jnp.bfloat16, attention="videonsa")
    logits = model(input_ids, pixel_values_videos=..., video_grid_thw=...)
    vj.save_pretrained(model, out_dir)

Submodules are imported on first use, so `import videonsa_jax.processing` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "from_pretrained": "videonsa_jax.checkpoints",
    "save_pretrained": "videonsa_jax.checkpoints",
    "Qwen2_5_VL": "videonsa_jax.model.qwen2_5_vl",
    "ModelConfig": "videonsa_jax.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'videonsa_jax' has no attribute {name!r}")
