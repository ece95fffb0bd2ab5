"""Optimizer, token loss and the jitted training step.

Mixed precision: parameters, gradients and optimizer moments are fp32; the model computes in its
`dtype` (bf16 for real runs) and the loss is taken in fp32. A step gets `accum` micro-batches
stacked on a leading axis, sums their gradients in fp32 (a `lax.scan`), normalises by the number
of target tokens of the whole step, clips and applies AdamW. A step whose loss or gradient norm is
not finite leaves parameters and optimizer state untouched and increments `nonfinite` (reset to
0 by the next finite step); the loop stops when it reaches the configured limit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

Batch = Mapping[str, jax.Array]
# loss_fn(model, micro_batch) -> (sum of token NLLs, number of target tokens, aux scalars)
LossFn = Callable[[nnx.Module, Batch], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
    """Everything a step updates (and a checkpoint holds, with the data iterator)."""

    step: jax.Array  # int32 []: steps taken (including skipped ones)
    params: nnx.State  # fp32 master parameters
    opt_state: optax.OptState
    nonfinite: jax.Array  # int32 []: consecutive steps skipped for a non-finite loss / gradient


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup over `warmup_ratio` of the steps, then cosine decay to `lr * end_lr_ratio`."""
    o = config.optim
    warmup = int(round(o.warmup_ratio * config.train.num_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=o.lr,
        warmup_steps=warmup,
        decay_steps=max(config.train.num_steps, warmup + 1),
        end_value=o.lr * o.end_lr_ratio,
    )


def _decay_mask(params: nnx.State) -> nnx.State:
    """Weight decay on matrices only (not on biases, norm scales), ignoring a stacked layer axis."""

    def is_matrix(v: nnx.Variable) -> bool:
        axes = v.get_metadata().get("out_sharding") or (None,) * v.ndim
        return sum(a != "layers" for a in axes) >= 2

    return jax.tree.map(is_matrix, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping followed by AdamW with the warmup-cosine schedule."""
    o = config.optim
    return optax.chain(
        optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity(),
        optax.adamw(
            learning_rate_schedule(config),
            b1=o.b1,
            b2=o.b2,
            eps=o.eps,
            weight_decay=o.weight_decay,
            mask=_decay_mask,
        ),
    )


def token_nll(
    hidden: jax.Array,
    project: Callable[[jax.Array], jax.Array],
    targets: jax.Array,
    weights: jax.Array,
    *,
    chunk_size: int,
) -> jax.Array:
    """sum(weights * -log softmax(project(hidden))[targets]) in fp32, chunk by chunk.

    Only one chunk of logits ([B, chunk_size, vocab]) exists at a time, also in the backward pass
    (each chunk is rematerialised); chunks without a target token are skipped.

    Args:
      hidden: [B, L, D] final hidden states.
      project: hidden [B, C, D] -> logits [B, C, V].
      targets: [B, L] int token ids to predict at each position.
      weights: [B, L] float, 0 where no loss is taken.
    """
    b, length, d = hidden.shape
    chunk = min(chunk_size, length)
    n = -(-length // chunk)
    pad = n * chunk - length
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))

    def split(x):
        return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)

    def chunk_nll(h, t, w):
        logits = project(h).astype(jnp.float32)
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return jnp.sum((logz - picked) * w)

    # The checkpoint goes around the cond: a checkpointed branch inside the cond would hand its
    # inputs (the [hidden, vocab] projection weight among them) out of the cond as residuals, and
    # the scan would stack one copy per chunk.
    @jax.checkpoint
    def skip_or_nll(h, t, w):
        zero = lambda *_: jnp.zeros((), jnp.float32)
        return jax.lax.cond(jnp.any(w != 0), chunk_nll, zero, h, t, w)

    def body(total, xs):
        return total + skip_or_nll(*xs), None

    total, _ = jax.lax.scan(
        body, jnp.zeros((), jnp.float32), (split(hidden), split(targets), split(weights))
    )
    return total


def next_token_targets(input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Position t predicts token t+1: (targets, weights), both [B, L], the last position unused."""
    targets = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))
    weights = jnp.pad(loss_mask[:, 1:].astype(jnp.float32), ((0, 0), (0, 1)))
    return targets, weights


def _schedule_count(state: TrainState) -> jax.Array:
    """Updates applied so far: the optimizer's schedule count (skipped steps do not advance it),
    or the step when the optimizer has no schedule."""
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
    counts = [
        x.count for x in jax.tree.leaves(state.opt_state, is_leaf=is_schedule) if is_schedule(x)
    ]
    return counts[0] if counts else state.step


def accumulate_gradients(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    params: nnx.State,
    rest: nnx.State,
    batch: Batch,
    param_shardings: Any = None,
) -> tuple[nnx.State, jax.Array, jax.Array, dict[str, jax.Array]]:
    """Sums fp32 gradients over the micro-batches on `batch`'s leading axis.

    Returns (gradients of the mean token loss, mean token loss, target tokens, aux means).
    `param_shardings`, if given, pins each micro-batch's gradients to the parameters' sharding
    (a reduce-scatter under FSDP rather than a full all-reduce).
    """

    def micro_loss(p, micro):
        nll, tokens, aux = loss_fn(nnx.merge(graphdef, p, rest), micro)
        return nll, (tokens, aux)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def accumulate(carry, micro):
        grads, nll, tokens, aux = carry
        (m_nll, (m_tokens, m_aux)), m_grads = grad_fn(params, micro)
        if param_shardings is not None:
            m_grads = jax.lax.with_sharding_constraint(m_grads, param_shardings)
        grads = jax.tree.map(lambda g, m: g + m.astype(jnp.float32), grads, m_grads)
        aux = jax.tree.map(jnp.add, aux, m_aux)
        return (grads, nll + m_nll, tokens + m_tokens, aux), None

    first = jax.tree.map(lambda x: x[0], batch)
    # The arrays are arguments, not closed over: nnx.remat (ViT blocks) fails on closed-over ones.
    aux_shape = jax.eval_shape(lambda p, m: micro_loss(p, m)[1][1], params, first)
    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
    init = (
        jax.tree.map(zeros, params),
        jnp.zeros(()),
        jnp.zeros(()),
        jax.tree.map(zeros, aux_shape),
    )
    (grads, nll, tokens, aux), _ = jax.lax.scan(accumulate, init, batch)
    denom = jnp.maximum(tokens, 1.0)
    num_micro = jax.tree.leaves(batch)[0].shape[0]
    grads = jax.tree.map(lambda g: g / denom, grads)
    return grads, nll / denom, tokens, {k: v / num_micro for k, v in aux.items()}


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    schedule: optax.Schedule,
    param_shardings: Any = None,
) -> Callable[[TrainState, nnx.State, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The (unjitted) step `(state, rest, batch) -> (state, metrics)`.

    `rest` is the model's non-parameter state (not trained, not checkpointed); `batch` holds
    `grad_accum` micro-batches on a leading axis.
    """

    def step(state: TrainState, rest: nnx.State, batch: Batch):
        grads, loss, tokens, aux = accumulate_gradients(
            graphdef, loss_fn, state.params, rest, batch, param_shardings
        )
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            nonfinite=jnp.where(finite, 0, state.nonfinite + 1),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": schedule(_schedule_count(state)),
            "target_tokens": tokens,
            "nonfinite": new_state.nonfinite,
            **aux,
        }
        return new_state, metrics

    return step
