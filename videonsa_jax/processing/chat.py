"""Tokenizer loading and the Qwen2.5-VL chat template, with answer-only loss masks.

Prompt layout (what HF's Qwen2.5-VL chat template renders, then tokenised in one go):

  <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n      (if no system turn)
  <|im_start|>{role}\\n{content}<|im_end|>\\n                          (every turn)
  <|im_start|>assistant\\n                                            (generation prompt)

A `<video>` / `<image>` placeholder in a content string becomes
`<|vision_start|>` + `<|video_pad|>` * (t*h*w/4) + `<|vision_end|>` (`<|image_pad|>` for
images), consuming the grids in order; the text around it is kept verbatim (so
LLaVA-Video's "<video>\\nQuestion" keeps its newline; VideoNSA's evaluation prompts put
the question right after the video: "<video>Question").

Loss-mask convention: `loss_mask[t]` is True iff token t is a *target*, i.e. the loss
of predicting input_ids[t] from the prefix input_ids[:t]. Targets are the content tokens
of every assistant turn plus its closing `<|im_end|>` (not the role header, not the
newline after `<|im_end|>`). A trainer uses logits[:, :-1] against input_ids[:, 1:]
weighted by loss_mask[:, 1:].

Special-token ids are always read from the loaded tokenizer by name.
"""

import dataclasses
import json
import os
import re
from collections.abc import Sequence

import numpy as np
import tokenizers

from videonsa_jax.processing import resize as resize_lib

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
SPECIAL_TOKEN_NAMES = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Ids in the released Qwen2.5-VL tokenizer, for reference and defaults only.
QWEN_SPECIAL_IDS = {name: 151643 + i for i, name in enumerate(SPECIAL_TOKEN_NAMES)}
VIDEO_PLACEHOLDER = "<video>"
IMAGE_PLACEHOLDER = "<image>"
_PLACEHOLDER_RE = re.compile(f"({VIDEO_PLACEHOLDER}|{IMAGE_PLACEHOLDER})")
_LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens the chat format uses, read from a tokenizer."""

    endoftext: int
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special ids, pad id and eos ids."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, pad_token: str = "<|endoftext|>"):
        self.tokenizer = tokenizer
        ids = {}
        for field, name in [
            ("endoftext", "<|endoftext|>"),
            ("im_start", "<|im_start|>"),
            ("im_end", "<|im_end|>"),
            ("vision_start", "<|vision_start|>"),
            ("vision_end", "<|vision_end|>"),
            ("image_pad", "<|image_pad|>"),
            ("video_pad", "<|video_pad|>"),
        ]:
            ids[field] = self._required_id(name)
        self.special = SpecialTokens(**ids)
        self.pad_id = self._required_id(pad_token)
        self.eos_ids = (self.special.im_end, self.special.endoftext)

    def _required_id(self, name: str) -> int:
        token_id = self.tokenizer.token_to_id(name)
        if token_id is None:
            raise ValueError(f"tokenizer has no {name!r} token")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __getstate__(self):  # Picklable for grain worker processes.
        return {"json": self.tokenizer.to_str(), "pad": self.tokenizer.id_to_token(self.pad_id)}

    def __setstate__(self, state):
        self.__init__(tokenizers.Tokenizer.from_str(state["json"]), state["pad"])


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads `tokenizer.json` from a checkpoint directory (or the file itself).

    The pad token comes from `tokenizer_config.json` when present, else `<|endoftext|>`.
    """
    path = os.fspath(path)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    pad_token = "<|endoftext|>"
    config_file = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(config_file):
        with open(config_file) as f:
            pad = json.load(f).get("pad_token")
        if isinstance(pad, dict):
            pad = pad.get("content")
        pad_token = pad or pad_token
    return Tokenizer(tokenizers.Tokenizer.from_file(file), pad_token)


def from_llava(conversations: Sequence[dict]) -> list[dict]:
    """LLaVA turns [{"from": "human"|"gpt"|"system", "value": s}] -> [{"role", "content"}]."""
    return [
        {"role": _LLAVA_ROLES[turn["from"]], "content": turn["value"]} for turn in conversations
    ]


def num_vision_tokens(grid_thw: Sequence[int]) -> int:
    """LLM tokens of one image/video grid (t, h, w) in patches: t*h*w / merge**2."""
    t, h, w = (int(x) for x in grid_thw)
    return t * h * w // resize_lib.MERGE_SIZE**2


class _Builder:
    """Accumulates token ids and their target flags."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.mask: list[bool] = []

    def special(self, token_id: int, count: int = 1, target: bool = False):
        self.ids += [token_id] * count
        self.mask += [target] * count

    def text(self, text: str, target_from: int | None = None):
        """Encodes `text`; tokens ending after char `target_from` are targets."""
        if not text:
            return
        enc = self.tok.tokenizer.encode(text, add_special_tokens=False)
        self.ids += enc.ids
        if target_from is None:
            self.mask += [False] * len(enc.ids)
        else:
            self.mask += [end > target_from for _, end in enc.offsets]


def build_conversation(
    tokenizer: Tokenizer,
    messages: Sequence[dict],
    *,
    video_grid_thw: np.ndarray | Sequence | None = None,
    image_grid_thw: np.ndarray | Sequence | None = None,
    add_generation_prompt: bool = False,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenises a conversation in the Qwen2.5-VL chat format (see module docstring).

    Args:
      tokenizer: from `load_tokenizer`.
      messages: [{"role": "system"|"user"|"assistant", "content": str}] or LLaVA turns
        [{"from": ..., "value": ...}]; `<video>`/`<image>` placeholders in user turns.
      video_grid_thw, image_grid_thw: [n, 3] grids, one row per placeholder, in order.
      add_generation_prompt: append `<|im_start|>assistant\\n` (inference).
      system_prompt: inserted as the first turn when messages has no system turn.

    Returns:
      input_ids int32 [L] and loss_mask bool [L] (True on target tokens).
    """
    if messages and "from" in messages[0]:
        messages = from_llava(messages)
    grids = {
        VIDEO_PLACEHOLDER: list(np.asarray(video_grid_thw).reshape(-1, 3))
        if video_grid_thw is not None
        else [],
        IMAGE_PLACEHOLDER: list(np.asarray(image_grid_thw).reshape(-1, 3))
        if image_grid_thw is not None
        else [],
    }
    pads = {
        VIDEO_PLACEHOLDER: tokenizer.special.video_pad,
        IMAGE_PLACEHOLDER: tokenizer.special.image_pad,
    }
    used = {VIDEO_PLACEHOLDER: 0, IMAGE_PLACEHOLDER: 0}
    sp = tokenizer.special
    b = _Builder(tokenizer)
    if not messages or messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    for message in messages:
        role, content = message["role"], message["content"]
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown role {role!r}")
        header = f"{role}\n"
        b.special(sp.im_start)
        if role == "assistant":
            if _PLACEHOLDER_RE.search(content):
                raise ValueError("vision placeholders are only supported in user/system turns")
            b.text(header + content, target_from=len(header))
            b.special(sp.im_end, target=True)
        else:
            parts = _PLACEHOLDER_RE.split(content)
            parts[0] = header + parts[0]
            for i, part in enumerate(parts):
                if i % 2 == 0:
                    b.text(part)
                    continue
                if used[part] >= len(grids[part]):
                    raise ValueError(f"more {part} placeholders than grids")
                grid = grids[part][used[part]]
                used[part] += 1
                b.special(sp.vision_start)
                b.special(pads[part], count=num_vision_tokens(grid))
                b.special(sp.vision_end)
            b.special(sp.im_end)
        b.text("\n")
    for placeholder, rows in grids.items():
        if used[placeholder] != len(rows):
            raise ValueError(
                f"{len(rows)} grids given for {used[placeholder]} {placeholder} placeholders"
            )
    if add_generation_prompt:
        b.special(sp.im_start)
        b.text("assistant\n")
    return np.asarray(b.ids, np.int32), np.asarray(b.mask, bool)
