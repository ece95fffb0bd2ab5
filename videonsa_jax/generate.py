"""Autoregressive generation with a preallocated KV cache.

    inputs = model.prepare_inputs(ids, mask, pixel_values_videos=..., video_grid_thw=...)
    out = generate(model, inputs, GenerationConfig.from_pretrained(model_dir))
    texts = out.texts(tokenizer)

* Prefill runs the prompt through the model's own attention (the hybrid VideoNSA attention for a
  VideoNSA config) and writes every layer's keys and values into a cache of
  `prompt length + max_new_tokens` slots. Each decode step feeds one token per row; its attention
  is dense over the cached keys (a generated token is text). The step is one jitted function with
  fixed shapes, so it compiles once per (batch, cache length) and never per token.
* Batches of prompts of different lengths are padded on the RIGHT (`pad_prompts`). Right padding
  keeps every prompt at absolute positions 0..n-1, as when it runs alone, which the NSA branches
  rely on (their blocks are aligned to position 0). Each row's first token comes from its last real
  position; generated tokens then go to the same cache slot for all rows, and padding slots are
  masked out of attention. M-RoPE positions of generated tokens count real tokens only, so the
  padding never shifts them.
* Decoding follows transformers' `generate`: repetition penalty on every token of the prompt and of
  the output so far (applied even when greedy), then greedy argmax, or sampling with temperature,
  top-k and top-p. Rows stop at any stop token and are filled with the pad token afterwards.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from videonsa_jax.model.qwen2_5_vl import ModelInputs, Qwen2_5_VL, decode_inputs
from videonsa_jax.model.text import KVCache

# Used when a checkpoint has no generation_config.json (and its config.json no eos / pad ids):
# greedy, no repetition penalty, Qwen2.5-VL's stop tokens <|im_end|> and <|endoftext|>.
DEFAULT_EOS_TOKEN_IDS = (151645, 151643)
DEFAULT_PAD_TOKEN_ID = 151643


class ContextLengthError(ValueError):
    """The prompt plus the tokens to generate do not fit the model's context."""


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings (transformers' names and meanings).

    do_sample: False = greedy argmax (temperature / top_k / top_p are ignored).
    top_k: keep the k most likely tokens (0 = off). top_p: nucleus sampling (1.0 = off).
    repetition_penalty: logits of tokens already in the prompt or output are divided by it when
        positive and multiplied by it when negative (1.0 = off).
    eos_token_ids: stop tokens. pad_token_id: fills a row after it stopped.
    """

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] = DEFAULT_EOS_TOKEN_IDS
    pad_token_id: int = DEFAULT_PAD_TOKEN_ID

    def replace(self, **overrides: Any) -> GenerationConfig:
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **overrides: Any) -> GenerationConfig:
        """Reads `generation_config.json` of a checkpoint directory.

        Missing fields (or a missing file) fall back to config.json's eos / pad ids and then to the
        class defaults. A file that sets do_sample with top_k == 1 (Qwen2.5-VL ships this) is
        greedy in effect and is read as greedy.
        """
        path = os.fspath(path)
        values: dict[str, Any] = {}
        for name in ("config.json", "generation_config.json"):  # The latter wins.
            file = os.path.join(path, name)
            if os.path.exists(file):
                with open(file) as f:
                    d = json.load(f)
                text = d.get("text_config") or {}
                for key in ("eos_token_id", "pad_token_id"):
                    value = d.get(key, text.get(key))
                    if value is not None:
                        values[key] = value
                if name == "generation_config.json":
                    for key in (
                        "max_new_tokens",
                        "do_sample",
                        "temperature",
                        "top_k",
                        "top_p",
                        "repetition_penalty",
                    ):
                        if d.get(key) is not None:
                            values[key] = d[key]
        eos = values.pop("eos_token_id", None)
        if eos is not None:
            values["eos_token_ids"] = tuple(eos) if isinstance(eos, list) else (eos,)
        config = cls(**values)
        if config.do_sample and config.top_k == 1:
            config = config.replace(do_sample=False)
        return config.replace(**overrides)


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """tokens: [B, N] generated ids (stop token included, pad after it); finished: [B] stopped."""

    tokens: np.ndarray
    finished: np.ndarray
    eos_token_ids: tuple[int, ...]

    def sequences(self) -> list[list[int]]:
        """Each row's tokens up to (excluding) its first stop token."""
        out = []
        for row in self.tokens.tolist():
            end = next((i for i, t in enumerate(row) if t in self.eos_token_ids), len(row))
            out.append(row[:end])
        return out

    def texts(self, tokenizer) -> list[str]:
        return [tokenizer.decode(seq) for seq in self.sequences()]


def pad_prompts(
    prompts: Sequence[Sequence[int]], pad_token_id: int, multiple: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads token lists to one length (rounded up to `multiple`, to reuse compilations).

    Returns:
        input_ids int32 [B, L] and attention_mask int32 [B, L].
    """
    length = max(len(p) for p in prompts)
    length = -(-length // multiple) * multiple
    ids = np.full((len(prompts), length), pad_token_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
        mask[i, : len(p)] = 1
    return ids, mask


def check_context(model: Qwen2_5_VL, prompt_length: int, max_new_tokens: int) -> None:
    """Raises ContextLengthError when prompt + output exceed max_position_embeddings."""
    limit = model.config.text.max_position_embeddings
    if prompt_length + max_new_tokens > limit:
        raise ContextLengthError(
            f"the prompt has {prompt_length} tokens; with max_new_tokens={max_new_tokens} that is "
            f"{prompt_length + max_new_tokens} > the model's context of {limit} tokens. Use fewer "
            "frames (--max_frames / --fps) or fewer pixels per frame (--max_pixels)."
        )


class _Params(NamedTuple):
    """The decoding settings as traced arrays: changing them never recompiles."""

    do_sample: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    repetition_penalty: jax.Array
    eos_token_ids: jax.Array
    pad_token_id: jax.Array

    @classmethod
    def of(cls, config: GenerationConfig) -> _Params:
        f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
        i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
        return cls(
            jnp.asarray(config.do_sample),
            f32(config.temperature),
            i32(config.top_k),
            f32(config.top_p),
            f32(config.repetition_penalty),
            i32(config.eos_token_ids),
            i32(config.pad_token_id),
        )


def _process_logits(logits: jax.Array, seen: jax.Array, params: _Params):
    """(penalized, warped) fp32 [B, V] logits.

    penalized: the repetition penalty applied (what greedy decoding takes the argmax of);
    warped: then temperature, top-k and top-p (what sampling draws from).
    """
    logits = logits.astype(jnp.float32)
    p = params.repetition_penalty
    penalized = jnp.where(seen, jnp.where(logits > 0, logits / p, logits * p), logits)
    warped = penalized / params.temperature
    ordered = jnp.sort(warped, axis=-1)[..., ::-1]
    k = jnp.clip(params.top_k, 1, warped.shape[-1])
    kth = jnp.take(ordered, k - 1, axis=-1)[..., None]
    warped = jnp.where((params.top_k > 0) & (warped < kth), -jnp.inf, warped)
    ordered = jnp.sort(warped, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # Mass of the tokens ranked above.
    kept = jnp.where(before < params.top_p, ordered, jnp.inf)
    warped = jnp.where(warped < jnp.min(kept, axis=-1, keepdims=True), -jnp.inf, warped)
    return penalized, warped


def _step_outputs(logits, seen, finished, key, params: _Params):
    """Picks the next token per row; updates the seen-token mask and the finished flags."""
    key, sub = jax.random.split(key)
    penalized, warped = _process_logits(logits, seen, params)
    sampled = jax.random.categorical(sub, warped, axis=-1)
    token = jnp.where(params.do_sample, sampled, jnp.argmax(penalized, axis=-1)).astype(jnp.int32)
    token = jnp.where(finished, params.pad_token_id, token)
    seen = seen.at[jnp.arange(token.shape[0]), token].set(True)
    finished = finished | jnp.isin(token, params.eos_token_ids)
    return token, seen, finished, key


@functools.partial(jax.jit, static_argnames="graphdef")
def _prefill(graphdef, state, inputs: ModelInputs, cache: KVCache, key, params: _Params):
    model = nnx.merge(graphdef, state)
    hidden, cache = model.hidden_states(inputs, cache)
    mask = jnp.asarray(inputs.attention_mask).astype(bool)
    b = mask.shape[0]
    last = jnp.sum(mask, axis=1) - 1
    logits = model.logits(hidden[jnp.arange(b), last])
    vocab = logits.shape[-1]
    ids = jnp.where(mask, jnp.asarray(inputs.input_ids), vocab)  # Padding -> a dropped column.
    seen = jnp.zeros((b, vocab + 1), bool).at[jnp.arange(b)[:, None], ids].set(True)[:, :vocab]
    finished = jnp.zeros((b,), bool)
    token, seen, finished, key = _step_outputs(logits, seen, finished, key, params)
    return token, cache, seen, finished, key


@functools.partial(jax.jit, static_argnames="graphdef", donate_argnames=("cache", "seen"))
def _decode_step(graphdef, state, token, cache: KVCache, rope_deltas, seen, finished, key, params):
    model = nnx.merge(graphdef, state)
    inputs = decode_inputs(token[:, None], cache, rope_deltas)
    hidden, cache = model.hidden_states(inputs, cache)
    logits = model.logits(hidden[:, -1])
    token, seen, finished, key = _step_outputs(logits, seen, finished, key, params)
    return token, cache, seen, finished, key


def generate(
    model: Qwen2_5_VL,
    inputs: ModelInputs,
    config: GenerationConfig = GenerationConfig(),
    *,
    rng: jax.Array | None = None,
    on_token: Callable[[np.ndarray], None] | None = None,
) -> GenerationOutput:
    """Generates up to `config.max_new_tokens` tokens per prompt row.

    Args:
        model: the model; its attention kind decides the prefill attention.
        inputs: `model.prepare_inputs(...)` of right-padded prompts (see `pad_prompts`).
        config: decoding settings.
        rng: PRNG key for sampling (default: key 0).
        on_token: called after every step with the new token of each row ([B] numpy; the pad
            token for rows that already stopped), e.g. to stream text.

    Raises:
        ContextLengthError: prompt length + max_new_tokens > the model's context.
    """
    b, length = np.shape(inputs.input_ids)
    check_context(model, length, config.max_new_tokens)
    graphdef, state = nnx.split(model)
    cache = model.init_cache(b, length + config.max_new_tokens)
    key = jax.random.key(0) if rng is None else rng
    rope_deltas = jnp.asarray(inputs.rope_deltas)
    params = _Params.of(config)
    token, cache, seen, finished, key = _prefill(graphdef, state, inputs, cache, key, params)
    tokens = []
    for step in range(config.max_new_tokens):
        if step:
            state_in = (token, cache, rope_deltas, seen, finished, key, params)
            token, cache, seen, finished, key = _decode_step(graphdef, state, *state_in)
        host_token = np.asarray(token)
        tokens.append(host_token)
        if on_token is not None:
            on_token(host_token)
        if bool(np.all(finished)):
            break
    return GenerationOutput(
        tokens=np.stack(tokens, axis=1),
        finished=np.asarray(finished),
        eos_token_ids=config.eos_token_ids,
    )


class TextStreamer:
    """An `on_token` callback that writes batch row 0's text as it is generated.

    Decodes the whole output so far at each step and writes the new suffix, holding back an
    incomplete UTF-8 character (a trailing U+FFFD) until its remaining bytes arrive.
    """

    def __init__(self, tokenizer, eos_token_ids: Sequence[int], write: Callable[[str], Any]):
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.write = write
        self.ids: list[int] = []
        self.printed = 0
        self.done = False

    def __call__(self, tokens: np.ndarray) -> None:
        token = int(tokens[0])
        if self.done or token in self.eos_token_ids:
            self.done = True
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.write(text[self.printed :])
        self.printed = len(text)
