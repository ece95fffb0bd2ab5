"""Building the model and the sharded training state, and the model's loss.

The state is always created against an abstract model first (`nnx.eval_shape`), so shapes and
shardings are known before any weights exist: a fresh run initialises the parameters inside a jit
whose outputs are already sharded (from scratch) or places the loaded HF weights on the mesh
(`init_from`); a resumed run restores straight into the abstract state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from videonsa_jax.checkpoints import from_pretrained
from videonsa_jax.config import ModelConfig
from videonsa_jax.model.qwen2_5_vl import Qwen2_5_VL
from videonsa_jax.parallel.rules import Rules, state_shardings
from videonsa_jax.training.step import LossFn, TrainState, next_token_targets, token_nll

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtypes(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
    """(compute dtype, parameter dtype) named by `config.model`."""
    return DTYPES[config.model.dtype], DTYPES[config.model.param_dtype]


def model_factory(
    model_config: ModelConfig, config: ml_collections.ConfigDict
) -> Callable[[], Qwen2_5_VL]:
    """A function that builds the randomly initialised model (seeded by `config.seed`)."""
    dtype, param_dtype = dtypes(config)
    return lambda: Qwen2_5_VL(
        model_config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(config.seed)
    )


def load_pretrained_params(config: ml_collections.ConfigDict, shardings: nnx.State) -> nnx.State:
    """The parameters of `config.model.init_from`, each placed on the mesh as it is read.

    VideoNSA gates absent from the checkpoint keep their fresh initialisation.
    """
    by_path = {path: v.get_value() for path, v in nnx.to_flat_state(shardings)}
    attention = config.model.attention.to_dict()
    dtype, param_dtype = dtypes(config)
    model = from_pretrained(
        config.model.init_from,
        dtype=dtype,
        attention=attention.pop("kind"),
        param_dtype=param_dtype,
        sharding=lambda path, _: by_path.get(path),
        remat=config.model.remat,
        **attention,
    )
    return nnx.state(model, nnx.Param)


def abstract_state(
    abstract_model: nnx.Module,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    rules: Rules,
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """(graphdef, abstract TrainState with shardings, the TrainState's shardings)."""
    graphdef, params = nnx.split(abstract_model, nnx.Param, ...)[:2]
    state = jax.eval_shape(lambda p: new_state(p, tx), params)
    shardings = state_shardings(state, mesh, rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
    return graphdef, abstract, shardings


def new_state(params: nnx.State, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        nonfinite=jnp.zeros((), jnp.int32),
    )


def init_state(
    make_model: Callable[[], nnx.Module] | None,
    tx: optax.GradientTransformation,
    shardings: TrainState,
    params: nnx.State | None = None,
) -> TrainState:
    """A fresh sharded TrainState from `make_model()` (inside jit) or from loaded `params`."""
    if params is None:
        init = lambda: new_state(nnx.state(make_model(), nnx.Param), tx)
        return jax.jit(init, out_shardings=shardings)()
    return jax.jit(lambda p: new_state(p, tx), out_shardings=shardings, donate_argnums=0)(params)


def gate_means(model: nnx.Module) -> dict[str, jax.Array]:
    """Mean of each `nnx.Intermediate` the model sowed under a name starting with "gate".

    The VideoNSA attention sows its per-branch gate values (e.g. `gate_cmp`, `gate_slc`,
    `gate_swa`); a dense model sows none and this returns {}.
    """
    values: dict[str, list[jax.Array]] = {}
    for path, variable in nnx.to_flat_state(nnx.pop(model, nnx.Intermediate)):
        name = next((str(k) for k in reversed(path) if str(k).startswith("gate")), None)
        if name is not None:
            leaves = jax.tree.leaves(variable.get_value())
            values.setdefault(name, []).extend(jnp.mean(x.astype(jnp.float32)) for x in leaves)
    return {name: jnp.mean(jnp.stack(v)) for name, v in values.items()}


def lm_loss(chunk_size: int) -> LossFn:
    """Summed next-token NLL on the target tokens (`loss_mask`) of one micro-batch."""

    def loss_fn(model, batch):
        inputs = batch["inputs"]
        hidden, _ = model.hidden_states(inputs)
        targets, weights = next_token_targets(inputs.input_ids, batch["loss_mask"])
        nll = token_nll(hidden, model.logits, targets, weights, chunk_size=chunk_size)
        return nll, jnp.sum(weights), gate_means(model)

    return loss_fn
