"""Model configuration: frozen dataclasses parsed from (and written back to) HF `config.json`.

Both transformers layouts are accepted:
    * 4.x: text fields at the top level, `rope_scaling = {"type": "mrope", "mrope_section": [...]}`,
        `rope_theta` at the top level;
    * 5.x: a nested `text_config`, `rope_parameters = {"rope_theta": ..., "mrope_section": [...]}`.
`to_hf_dict` writes the 5.x layout, which transformers 4.5x and 5.x both read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal

AttentionKind = Literal["dense", "videonsa", "videonsa_release"]
ATTENTION_KINDS = ("dense", "videonsa", "videonsa_release")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Qwen2.5-VL vision tower (ViT with window attention and a 2x2 patch merger)."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 3584
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # pixels
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: int = 2
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per patch row: channels x temporal patch x patch x patch (1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_window(self) -> int:
        """Attention window side in merged tokens (112 px -> 4)."""
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Qwen2.5 decoder with multimodal RoPE and grouped-query attention."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Which attention the decoder layers run, and the NSA budget for video-token queries.

    kind: "dense" (Qwen2.5-VL), "videonsa" (the paper's design: NSA for vision rows, dense for
        text rows) or "videonsa_release" (bit-compatible with the released VideoNSA checkpoint).
    block_size / block_count / window_size: NSA block length, selected blocks, sliding window.
    gate_temperature: gate logits are divided by it before the sigmoid.
    impl: NSA implementation, see `pallas_kernels.nsa.nsa`.
    """

    kind: AttentionKind = "dense"
    block_size: int = 64
    block_count: int = 32
    window_size: int = 256
    gate_temperature: float = 0.3
    impl: str = "auto"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The whole Qwen2.5-VL (+ VideoNSA) model.

    rope_time_rule: how the temporal M-RoPE index of a video grid is computed.
        "float": t * tokens_per_second * second_per_grid_t (transformers 5.x);
        "int": second_per_grid_t truncated to an int first (0.5 -> 0, 1.5 -> 1), the rule the
        released VideoNSA was trained and evaluated with.
    remat: rematerialisation policy of the decoder layers and the ViT blocks ("none", "full",
        "dots", "dots_no_batch"); a runtime setting, not written to config.json.
    """

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645
    pad_token_id: int | None = None
    rope_time_rule: Literal["float", "int"] = "float"
    remat: str = "none"

    def replace(self, **overrides: Any) -> ModelConfig:
        """Returns a copy with `overrides` applied.

        Keys may name a field of ModelConfig (`attention` / `text` / `vision` take a whole
        sub-config; `attention="videonsa"` sets the kind), or of its `attention` (e.g.
        `block_count`, `window_size`), `text` or `vision` sub-config. An unknown key raises
        ValueError.
        """
        top, sub = {}, {"attention": {}, "text": {}, "vision": {}}
        for key, value in overrides.items():
            if key == "attention" and isinstance(value, str):
                sub["attention"]["kind"] = _check_kind(value)
            elif key in sub and isinstance(value, _SUBCONFIGS[key]):
                top[key] = value
            elif key in _field_names(ModelConfig) and key not in sub:
                top[key] = value
            else:
                owners = [name for name, cls in _SUBCONFIGS.items() if key in _field_names(cls)]
                if not owners:
                    raise ValueError(
                        f"Unknown config override {key!r}. Valid keys: {sorted(_all_keys())}"
                    )
                sub[owners[0]][key] = value
        new = dataclasses.replace(self, **top)
        for name, values in sub.items():
            if values:
                new = dataclasses.replace(
                    new, **{name: dataclasses.replace(getattr(new, name), **values)}
                )
        return new

    # -- HF config.json --------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides: Any) -> ModelConfig:
        """Parses a Qwen2.5-VL / VideoNSA `config.json` dict (transformers 4.x or 5.x layout)."""
        text = dict(d.get("text_config") or {})
        for key, value in d.items():  # 4.x: text fields live at the top level.
            if key not in ("text_config", "vision_config"):
                text.setdefault(key, value)
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        theta = rope.get("rope_theta", text.get("rope_theta", TextConfig.rope_theta))
        mrope_section = rope.get("mrope_section", TextConfig.mrope_section)
        num_heads = text.get("num_attention_heads", TextConfig.num_heads)
        tie = bool(d.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
        text_cfg = TextConfig(
            vocab_size=text.get("vocab_size", TextConfig.vocab_size),
            hidden_size=text.get("hidden_size", TextConfig.hidden_size),
            intermediate_size=text.get("intermediate_size", TextConfig.intermediate_size),
            num_layers=text.get("num_hidden_layers", TextConfig.num_layers),
            num_heads=num_heads,
            num_kv_heads=text.get("num_key_value_heads") or num_heads,
            rms_norm_eps=text.get("rms_norm_eps", TextConfig.rms_norm_eps),
            rope_theta=float(theta),
            mrope_section=tuple(mrope_section),
            max_position_embeddings=text.get(
                "max_position_embeddings", TextConfig.max_position_embeddings
            ),
            tie_word_embeddings=tie,
        )
        v = d.get("vision_config") or {}
        vision_cfg = VisionConfig(
            depth=v.get("depth", VisionConfig.depth),
            hidden_size=v.get("hidden_size", VisionConfig.hidden_size),
            intermediate_size=v.get("intermediate_size", VisionConfig.intermediate_size),
            num_heads=v.get("num_heads", VisionConfig.num_heads),
            out_hidden_size=v.get("out_hidden_size", text_cfg.hidden_size),
            in_channels=v.get("in_channels", v.get("in_chans", VisionConfig.in_channels)),
            patch_size=v.get("patch_size", VisionConfig.patch_size),
            temporal_patch_size=v.get("temporal_patch_size", VisionConfig.temporal_patch_size),
            spatial_merge_size=v.get("spatial_merge_size", VisionConfig.spatial_merge_size),
            window_size=v.get("window_size", VisionConfig.window_size),
            fullatt_block_indexes=tuple(
                v.get("fullatt_block_indexes", VisionConfig.fullatt_block_indexes)
            ),
            tokens_per_second=v.get("tokens_per_second", VisionConfig.tokens_per_second),
        )
        nsa = d.get("videonsa") or {}
        is_videonsa = (
            bool(nsa) or "block_counts" in text or "VideoNSA" in str(d.get("architectures"))
        )
        attention = AttentionConfig(
            kind=_check_kind(nsa.get("kind", "videonsa" if is_videonsa else "dense")),
            block_size=nsa.get("block_size", text.get("block_size", AttentionConfig.block_size)),
            block_count=nsa.get(
                "block_count", text.get("block_counts", AttentionConfig.block_count)
            ),
            window_size=nsa.get("window_size", AttentionConfig.window_size),
            gate_temperature=nsa.get("gate_temperature", AttentionConfig.gate_temperature),
        )
        eos = d.get("eos_token_id", text.get("eos_token_id", ModelConfig.eos_token_id))
        config = cls(
            vision=vision_cfg,
            text=text_cfg,
            attention=attention,
            image_token_id=d.get("image_token_id", ModelConfig.image_token_id),
            video_token_id=d.get("video_token_id", ModelConfig.video_token_id),
            vision_start_token_id=d.get("vision_start_token_id", ModelConfig.vision_start_token_id),
            vision_end_token_id=d.get("vision_end_token_id", ModelConfig.vision_end_token_id),
            bos_token_id=d.get("bos_token_id", text.get("bos_token_id", ModelConfig.bos_token_id)),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=d.get("pad_token_id", text.get("pad_token_id")),
            rope_time_rule=nsa.get("rope_time_rule", "float"),
        )
        return config.replace(**overrides) if overrides else config

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str], **overrides: Any) -> ModelConfig:
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_hf_dict(d, **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers 5.x `config.json` layout (+ a `videonsa` section for NSA settings)."""
        t, v, a = self.text, self.vision, self.attention
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        text_config = {
            "model_type": "qwen2_5_vl_text",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "hidden_act": "silu",
            "max_position_embeddings": t.max_position_embeddings,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": t.rope_theta,
                "mrope_section": list(t.mrope_section),
            },
            "tie_word_embeddings": t.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
        }
        vision_config = {
            "model_type": "qwen2_5_vl_vision",
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "out_hidden_size": v.out_hidden_size,
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "tokens_per_second": v.tokens_per_second,
            "hidden_act": "silu",
        }
        d = {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "text_config": text_config,
            "vision_config": vision_config,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": t.tie_word_embeddings,
        }
        if a.kind != "dense":
            d["videonsa"] = {
                "kind": a.kind,
                "block_size": a.block_size,
                "block_count": a.block_count,
                "window_size": a.window_size,
                "gate_temperature": a.gate_temperature,
                "rope_time_rule": self.rope_time_rule,
            }
        return d


_SUBCONFIGS = {"attention": AttentionConfig, "text": TextConfig, "vision": VisionConfig}


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _all_keys() -> set[str]:
    keys = _field_names(ModelConfig)
    for cls in _SUBCONFIGS.values():
        keys |= _field_names(cls)
    return keys


def _check_kind(kind: str) -> str:
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {kind!r}")
    return kind
