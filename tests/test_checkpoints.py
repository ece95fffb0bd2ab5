"""HF checkpoint I/O: both key layouts, sharded files, round trips through transformers, errors."""

import json
import logging
import shutil

import hf_tiny as H
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from flax import nnx

from videonsa_jax.checkpoints import CheckpointError, from_pretrained, hf, save_pretrained

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("hub")
    return path, H.save_tiny(path)


@pytest.fixture(scope="module")
def prompt():
    return np.array([H.random_text(np.random.default_rng(0), 11)])


def _params(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for key in pa:
        np.testing.assert_array_equal(pa[key], pb[key], err_msg=str(key))


def _rewrite(src, dst, edit):
    """Copies the tiny checkpoint with `edit(tensors)` applied to its (numpy) tensor dict."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = safetensors.numpy.load_file(src / "model.safetensors")
    edit(tensors)
    safetensors.numpy.save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


def test_stacked_layout(tiny):
    path, _ = tiny
    model = from_pretrained(path, dtype=jnp.float32)
    q = model.text.layers.self_attn.q_proj.kernel
    assert q.shape == (2, 64, 64)
    assert q.get_metadata()["out_sharding"] == ("layers", "embed", "heads")
    assert model.text.embed_tokens.dtype == jnp.float32


def test_transformers5_layout(tiny, tmp_path, prompt):
    """model.language_model.* / model.visual.* names (+ an ignored inv_freq buffer) load equal."""
    path, torch_model = tiny
    tensors = {k: v.contiguous() for k, v in torch_model.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in tensors)
    tensors["model.language_model.rotary_emb.inv_freq"] = torch.ones(4)
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(path / "config.json", tmp_path / "config.json")
    new = from_pretrained(tmp_path, dtype=jnp.float32)
    _assert_same_params(new, from_pretrained(path, dtype=jnp.float32))
    np.testing.assert_allclose(new(prompt), H.torch_logits(torch_model, prompt), atol=TOL, rtol=0)


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_through_transformers(tmp_path, prompt, tie):
    """HF -> ours -> save_pretrained (sharded) -> transformers and ours load the same logits."""
    torch_model = H.save_tiny(tmp_path / "hf", tie=tie, seed=3)
    model = from_pretrained(tmp_path / "hf", dtype=jnp.float32)
    assert (model.lm_head is None) == tie
    logits = np.asarray(model(prompt))
    np.testing.assert_allclose(logits, H.torch_logits(torch_model, prompt), atol=TOL, rtol=0)

    save_pretrained(model, tmp_path / "ours", max_shard_size=40_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "model.layers.1.self_attn.q_proj.weight" in index["weight_map"]
    assert "visual.blocks.3.attn.qkv.weight" in index["weight_map"]
    assert ("lm_head.weight" in index["weight_map"]) != tie

    reloaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path / "ours", attn_implementation="eager"
    ).eval()
    np.testing.assert_allclose(H.torch_logits(reloaded, prompt), logits, atol=TOL, rtol=0)
    _assert_same_params(from_pretrained(tmp_path / "ours", dtype=jnp.float32), model)


def test_bfloat16(tiny, tmp_path):
    path, _ = tiny
    model = from_pretrained(path)  # default dtype: bfloat16
    assert {v.dtype for v in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.bfloat16)}
    save_pretrained(model, tmp_path)
    with safetensors.safe_open(tmp_path / "model.safetensors", framework="flax") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    _assert_same_params(from_pretrained(tmp_path), model)


def _drop(tensors):
    del tensors["model.layers.1.mlp.up_proj.weight"]


def _extra(tensors):
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros((3, 5), np.float32)


def _reshape(tensors):
    tensors["visual.blocks.2.attn.proj.weight"] = np.zeros((32, 31), np.float32)


@pytest.mark.parametrize(
    "edit, message",
    [
        (_drop, r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight \(model expects shape "
                r"\(96, 64\)\)"),
        (_extra, r"unexpected tensor model\.layers\.0\.self_attn\.extra\.weight \(checkpoint "
                 r"shape \(3, 5\)"),
        (_reshape, r"tensor visual\.blocks\.2\.attn\.proj\.weight: checkpoint shape \(32, 31\) != "
                   r"model shape \(32, 32\)"),
    ],
)  # fmt: skip
def test_bad_checkpoint(tiny, tmp_path, edit, message):
    path, _ = tiny
    _rewrite(path, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(tmp_path / "bad", dtype=jnp.float32)


def test_optional_tensors(tiny, tmp_path, monkeypatch, caplog):
    """Tensors matching OPTIONAL_KEYS (the VideoNSA gates) may be absent (fresh init) or present
    without a model leaf (skipped), each with a notice."""
    path, _ = tiny
    _rewrite(path, tmp_path / "no_head", lambda t: t.pop("lm_head.weight"))
    _rewrite(path, tmp_path / "extra", _extra)
    with pytest.raises(CheckpointError, match="missing tensor lm_head.weight"):
        from_pretrained(tmp_path / "no_head", dtype=jnp.float32)
    monkeypatch.setattr(hf, "OPTIONAL_KEYS", (r"^lm_head\.", r"\.extra\."))
    with caplog.at_level(logging.WARNING):
        model = from_pretrained(tmp_path / "no_head", dtype=jnp.float32)
        from_pretrained(tmp_path / "extra", dtype=jnp.float32)
    assert "lm_head.weight absent" in caplog.text
    assert "model.layers.0.self_attn.extra.weight is not used by this model" in caplog.text
    head = np.asarray(model.lm_head.kernel[...])
    assert head.shape == (64, H.VOCAB) and 0.01 < head.std() < 0.03


def test_overrides_and_sharding(tiny):
    path, _ = tiny
    device = jax.devices()[-1]
    model = from_pretrained(
        path,
        dtype=jnp.float32,
        attention="dense",
        block_count=7,
        remat="full",
        sharding=lambda p, v: jax.sharding.SingleDeviceSharding(device),
    )
    assert model.config.attention.block_count == 7 and model.config.remat == "full"
    assert {d for v in jax.tree.leaves(nnx.state(model)) for d in v.devices()} == {device}
    with pytest.raises(ValueError, match="Unknown config override"):
        from_pretrained(path, dtype=jnp.float32, no_such_key=1)


def test_missing_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(H.tiny_config().to_dict()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(tmp_path, dtype=jnp.float32)
