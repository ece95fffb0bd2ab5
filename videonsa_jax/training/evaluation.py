"""Periodic multiple-choice evaluation on a held-out split.

Eval batches are built without the answer and end with the generation prompt
(`<|im_start|>assistant\\n`), so the logits at each row's last real token score the next token.
The prediction is the choice letter (A, B, ...) with the highest logit among the row's choices;
accuracy is the fraction of rows whose prediction is `answer_index`.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from videonsa_jax.training import inputs as inputs_lib

LETTERS = string.ascii_uppercase


def letter_token_ids(tokenizer, num_letters: int = 10) -> np.ndarray:
    """Token ids of "A", "B", ... (each must be a single token)."""
    ids = []
    for letter in LETTERS[:num_letters]:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise ValueError(f"choice letter {letter!r} is not a single token: {encoded}")
        ids.append(encoded[0])
    return np.asarray(ids, np.int32)


def choice_scores(model: nnx.Module, inputs: Any, letter_ids: jax.Array) -> jax.Array:
    """[B, num_letters] logits of the choice letters at each row's last real token."""
    hidden, _ = model.hidden_states(inputs)
    last = jnp.sum(inputs.attention_mask, axis=1) - 1  # right padding
    hidden_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    logits = model.logits(hidden_last).astype(jnp.float32)
    return jnp.take(logits, letter_ids, axis=-1)


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
    """(params, rest, inputs, letter_ids) -> [B, num_letters] scores (unjitted)."""

    def step(params, rest, inputs, letter_ids):
        return choice_scores(nnx.merge(graphdef, params, rest), inputs, letter_ids)

    return step


def evaluate(
    eval_step: Callable,
    params: Any,
    rest: Any,
    model: nnx.Module,
    batches: Iterable[dict[str, Any]],
    letter_ids: np.ndarray,
    *,
    mesh: jax.sharding.Mesh,
    rules,
    num_patches: int,
    max_batches: int = 0,
) -> dict[str, float]:
    """Multiple-choice accuracy over `batches` (collated eval batches with choices/answer_index,
    read in full by every process)."""
    correct = total = 0
    per_task: dict[str, list[int]] = {}
    sizes = None  # shared ViT group / text-row sizes: few compilations of eval_step
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        # Every process reads the whole eval batch: one block.
        placement = inputs_lib.Placement.whole(mesh, rules, len(batch["input_ids"]))
        unit = model.config.vision.spatial_merge_size**2
        (padded,), sizes = inputs_lib.uniform_sizes(
            [inputs_lib.model_batch(model, batch, placement.num_patches(num_patches, unit))],
            sizes,
            placement.shards,
        )
        sharded = inputs_lib.place(padded["inputs"], placement)
        scores = np.asarray(eval_step(params, rest, sharded, letter_ids))
        for row, (choices, answer) in enumerate(
            zip(batch["choices"], batch["answer_index"], strict=True)
        ):
            if answer < 0 or not choices:
                continue
            hit = int(np.argmax(scores[row, : len(choices)]) == answer)
            correct += hit
            total += 1
            stats = per_task.setdefault(batch["task"][row] or "all", [0, 0])
            stats[0] += hit
            stats[1] += 1
    if not total:
        logging.warning("evaluation: no multiple-choice rows in the eval split")
        return {}
    metrics = {"accuracy": correct / total, "examples": float(total)}
    if len(per_task) > 1:
        metrics.update({f"accuracy_{task}": c / n for task, (c, n) in per_task.items()})
    return metrics
