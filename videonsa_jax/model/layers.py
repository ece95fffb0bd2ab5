"""Basic layers shared by the vision tower and the decoder.

Every parameter carries logical axis names (`out_sharding` metadata, e.g. ("embed", "mlp")); the
training code maps them to mesh axes with the rules in its config. Variables are created without
eager sharding so that models can be built outside a mesh.

Dtypes: parameters are stored in `param_dtype`; the matmul runs in `dtype` (the activation dtype).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]
_NORMAL_INIT = nnx.initializers.normal(0.02)

# `ModelConfig.remat`: what a rematerialised decoder layer / ViT block keeps for the backward pass.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def param(rngs: nnx.Rngs | None, init, shape: tuple[int, ...], axes: Axes, dtype) -> nnx.Param:
    """A parameter initialised by `init(key, shape, dtype)` and annotated with logical `axes`."""
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, shape, dtype), out_sharding=axes, eager_sharding=False)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] (the transpose of torch's Linear.weight)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool,
        axes: Axes,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        kernel_init=_NORMAL_INIT,
    ):
        self.dtype = dtype
        self.kernel = param(rngs, kernel_init, (in_features, out_features), axes, param_dtype)
        self.bias = (
            param(rngs, nnx.initializers.zeros, (out_features,), axes[1:], param_dtype)
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """Qwen RMSNorm: normalise in fp32, cast back to the input dtype, then scale by the weight."""

    def __init__(self, dim: int, *, eps: float, axis_name: str = "embed", param_dtype=jnp.float32):
        self.eps = eps
        self.weight = param(None, nnx.initializers.ones, (dim,), (axis_name,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)
