"""Generation: token-for-token parity with transformers' greedy `generate`, batching, sampling,
stop tokens, streaming, and one compilation of the decode step for all tokens."""

import hf_tiny as H
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from videonsa_jax import generate as gen
from videonsa_jax.checkpoints import from_pretrained

MAX_NEW = 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_ckpt")
    hf = H.save_tiny(path)
    model = from_pretrained(path, dtype=jnp.float32)
    return path, hf, model


def _prompts():
    rng = np.random.default_rng(0)
    grid = (2, 4, 4)
    video = H.random_text(rng, 5) + H.vision_span(grid, H.VIDEO_PAD) + H.random_text(rng, 7)
    text = H.random_text(rng, 4)
    pixels = H.random_pixels(rng, [grid])
    return [video, text], pixels, np.array([grid])


def _hf_generate(hf, ids, pixels=None, grid=None, **kwargs):
    ids = np.asarray([ids])
    inputs = {"input_ids": torch.from_numpy(ids).long()}
    if pixels is not None:
        inputs["pixel_values_videos"] = torch.from_numpy(pixels).float()
        inputs["video_grid_thw"] = torch.from_numpy(grid).long()
        inputs["mm_token_type_ids"] = torch.from_numpy(H.token_types(ids)).int()
    with torch.no_grad():
        out = hf.generate(
            **inputs,
            max_new_tokens=MAX_NEW,
            do_sample=False,
            eos_token_id=289,
            pad_token_id=0,
            **kwargs,
        )
    return out[0, ids.shape[1] :].tolist()


def _ours(model, prompts, pixels, grid, config, **kwargs):
    ids, mask = gen.pad_prompts(prompts, config.pad_token_id, multiple=32)
    has_video = [H.VIDEO_PAD in p for p in prompts]
    vision = {}
    if any(has_video):
        vision = dict(pixel_values_videos=pixels, video_grid_thw=grid)
    inputs = model.prepare_inputs(ids, mask, **vision)
    return gen.generate(model, inputs, config, **kwargs)


def test_generation_config_from_checkpoint(tiny):
    path, _, _ = tiny
    config = gen.GenerationConfig.from_pretrained(path, max_new_tokens=7)
    assert config.eos_token_ids == (289,) and config.pad_token_id == 0
    assert config.max_new_tokens == 7 and not config.do_sample


@pytest.mark.parametrize("penalty", [1.0, 1.05])
def test_greedy_matches_transformers(tiny, penalty):
    path, hf, model = tiny
    prompts, pixels, grid = _prompts()
    config = gen.GenerationConfig.from_pretrained(
        path, max_new_tokens=MAX_NEW, repetition_penalty=penalty
    )
    for prompt in prompts:
        vision = (pixels, grid) if H.VIDEO_PAD in prompt else (None, None)
        expected = _hf_generate(hf, prompt, *vision, repetition_penalty=penalty)
        out = _ours(model, [prompt], *vision, config)
        assert out.tokens[0].tolist()[: len(expected)] == expected


def test_batched_prompts_of_different_lengths(tiny):
    path, _, model = tiny
    prompts, pixels, grid = _prompts()
    config = gen.GenerationConfig.from_pretrained(path, max_new_tokens=MAX_NEW)
    batched = _ours(model, prompts, pixels, grid, config)
    single = [
        _ours(model, [prompts[0]], pixels, grid, config),
        _ours(model, [prompts[1]], None, None, config),
    ]
    for row, out in enumerate(single):
        n = out.tokens.shape[1]
        assert batched.tokens[row, :n].tolist() == out.tokens[0].tolist()


def test_decode_step_compiles_once(tiny):
    path, _, model = tiny
    prompts, pixels, grid = _prompts()
    config = gen.GenerationConfig.from_pretrained(path, max_new_tokens=MAX_NEW)
    before = gen._decode_step._cache_size()
    _ours(model, prompts[:1], pixels, grid, config)
    after_first = gen._decode_step._cache_size()
    _ours(model, prompts[:1], pixels, grid, config)
    assert after_first - before <= 1  # One compilation for all MAX_NEW - 1 steps...
    assert gen._decode_step._cache_size() == after_first  # ...and none for the same shapes again.


def test_stop_tokens_padding_and_streaming(tiny):
    path, _, model = tiny
    prompts, pixels, grid = _prompts()
    greedy = gen.GenerationConfig.from_pretrained(path, max_new_tokens=MAX_NEW)
    first = _ours(model, prompts[:1], pixels, grid, greedy).tokens[0].tolist()
    stop = first[3]
    config = greedy.replace(eos_token_ids=(stop,))
    streamed = []
    out = _ours(model, prompts, pixels, grid, config, on_token=streamed.append)
    row = out.tokens[0].tolist()
    cut = row.index(stop)
    assert row[: cut + 1] == first[: cut + 1] and set(row[cut + 1 :]) <= {config.pad_token_id}
    assert out.finished[0] and out.sequences()[0] == first[:cut]
    assert np.array_equal(np.stack(streamed, axis=1), out.tokens)

    class Tok:
        def decode(self, ids):
            return " ".join(map(str, ids))

    written = []
    streamer = gen.TextStreamer(Tok(), config.eos_token_ids, written.append)
    for tokens in streamed:
        streamer(tokens)
    assert "".join(written) == " ".join(map(str, first[:cut]))


def test_sampling(tiny):
    path, _, model = tiny
    prompts, pixels, grid = _prompts()
    config = gen.GenerationConfig.from_pretrained(
        path, max_new_tokens=MAX_NEW, do_sample=True, temperature=0.7, top_k=50, top_p=0.9
    )
    a = _ours(model, prompts, pixels, grid, config, rng=jax.random.key(1)).tokens
    b = _ours(model, prompts, pixels, grid, config, rng=jax.random.key(1)).tokens
    assert np.array_equal(a, b)
    # top_p -> 0 keeps only the most likely token: sampling becomes greedy.
    greedy = _ours(model, prompts, pixels, grid, config.replace(do_sample=False)).tokens
    nucleus = _ours(model, prompts, pixels, grid, config.replace(top_p=1e-6)).tokens
    assert np.array_equal(greedy, nucleus)


def test_process_logits_matches_transformers_warpers():
    from transformers.generation import logits_process as lp

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 50)).astype(np.float32) * 3
    ids = rng.integers(0, 50, (2, 6))
    seen = np.zeros((2, 50), bool)
    np.put_along_axis(seen, ids, True, axis=1)
    config = gen.GenerationConfig(
        do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3
    )
    params = gen._Params.of(config)
    ours = np.asarray(gen._process_logits(jnp.asarray(logits), jnp.asarray(seen), params)[1])
    processors = lp.LogitsProcessorList(
        [
            lp.RepetitionPenaltyLogitsProcessor(1.3),
            lp.TemperatureLogitsWarper(0.7),
            lp.TopKLogitsWarper(20),
            lp.TopPLogitsWarper(0.8),
        ]
    )
    theirs = processors(torch.from_numpy(ids), torch.from_numpy(logits)).numpy()
    assert np.array_equal(np.isfinite(ours), np.isfinite(theirs))
    np.testing.assert_allclose(ours[np.isfinite(ours)], theirs[np.isfinite(theirs)], rtol=1e-6)


def test_context_limit(tiny):
    _, _, model = tiny
    ids, mask = gen.pad_prompts([[1, 2, 3]], 0)
    config = gen.GenerationConfig(max_new_tokens=model.config.text.max_position_embeddings)
    with pytest.raises(gen.ContextLengthError, match="context of 4096 tokens"):
        gen.generate(model, model.prepare_inputs(ids, mask), config)


def test_videonsa_cached_generation_matches_recompute():
    """Hybrid-attention prefill + dense decode over the cache == re-running the whole sequence."""
    import tiny_videonsa as T
    from flax import nnx

    from videonsa_jax.model.qwen2_5_vl import Qwen2_5_VL

    config = T.tiny_config(attention="videonsa", block_size=4, block_count=2, window_size=8)
    model = Qwen2_5_VL(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    grid = (2, 4, 4)
    prompt = [1, 5, 6] + [9] + [13] * 8 + [10] + rng.integers(20, 400, 9).tolist()
    pixels = H.random_pixels(rng, [grid])
    n = 4
    ids, mask = gen.pad_prompts([prompt], 0, multiple=len(prompt) + n)
    vision = dict(pixel_values_videos=pixels, video_grid_thw=np.array([grid]))
    out = gen.generate(
        model,
        model.prepare_inputs(ids, mask, **vision),
        gen.GenerationConfig(max_new_tokens=n, eos_token_ids=(2,), pad_token_id=0),
    )
    tokens = list(prompt)
    for _ in range(n):  # Greedy without a cache: the full (fixed-length) sequence every step.
        ids[0, : len(tokens)], mask[0, : len(tokens)] = tokens, 1
        logits = model(ids, mask, **vision)
        tokens.append(int(np.argmax(np.asarray(logits)[0, len(tokens) - 1])))
    assert out.tokens[0].tolist() == tokens[len(prompt) :]
