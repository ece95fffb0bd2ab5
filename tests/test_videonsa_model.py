"""VideoNSA attention inside the model: both hybrid kinds, gates, checkpoints, long-video gradients.

Layer tests compare `Attention` (kinds "videonsa" / "videonsa_release") with torch compositions of
fla's naive NSA pieces (`nsa_oracle`) that follow shared/design/NSA_SEMANTICS.md; model tests use a
tiny random Qwen2.5-VL (`hf_tiny`). All fp32 on CPU.
"""

from __future__ import annotations

import logging

import hf_tiny as H
import jax
import jax.numpy as jnp
import nsa_oracle as oracle  # skips this module without torch / fla-core
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from videonsa_jax.checkpoints import from_pretrained, save_pretrained
from videonsa_jax.config import ModelConfig
from videonsa_jax.model import rope, videonsa
from videonsa_jax.model.attention import Attention, AttentionBatch
from videonsa_jax.model.qwen2_5_vl import Qwen2_5_VL, decode_inputs

torch = oracle.torch
F = torch.nn.functional
TOL = dict(rtol=2e-5, atol=2e-5)
HEADS, KV_HEADS, HEAD_DIM = 28, 4, 16  # the 7B grouping; small head_dim


def _config(kind: str, *, heads=4, kv_heads=2, head_dim=16, **attention) -> ModelConfig:
    text = dict(num_attention_heads=heads, num_key_value_heads=kv_heads)
    hf = H.tiny_config(hidden_size=heads * head_dim, **text).to_dict()
    return ModelConfig.from_hf_dict(hf, attention=kind, **attention)


def _pop(module) -> dict:
    """{name: last sown value} of the module's nnx.Intermediate values (removed from it)."""
    state = nnx.pop(module, nnx.Intermediate)
    return {str(p[-1]): v.get_value()[-1] for p, v in nnx.to_flat_state(state)}


# -- layer-level inputs and the torch composition -----------------------------------------------


def _layout(n_prefix: int, frames: int, grid_hw: int, n_suffix: int):
    """Token kinds and M-RoPE positions of text + one video (T index 2 * frame) + text.

    Returns (vision [T] bool, positions [3, 1, T] int32) as `get_rope_index` lays them out.
    """
    pos = [[i, i, i] for i in range(n_prefix)]
    ti, hi, wi = np.meshgrid(
        np.arange(frames), np.arange(grid_hw), np.arange(grid_hw), indexing="ij"
    )
    video = np.stack([2 * ti, hi, wi], -1).reshape(-1, 3) + n_prefix
    pos += video.tolist()
    start = video.max() + 1
    pos += [[start + i] * 3 for i in range(n_suffix)]
    vision = np.array([False] * n_prefix + [True] * len(video) + [False] * n_suffix)
    return vision, np.asarray(pos, np.int32).T[:, None, :]


def _layer(kind: str, seed: int = 0, **attention) -> Attention:
    """An fp32 Attention with 28/4 heads; gate weights scaled up so gates spread over (0, 1)."""
    cfg = _config(kind, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, **attention)
    attn = Attention(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.g_proj_1, attn.g_proj_2):
        lin.kernel[...] = jnp.asarray(0.08 * rng.standard_normal(lin.kernel.shape), jnp.float32)
        lin.bias[...] = jnp.asarray(0.1 * rng.standard_normal(lin.bias.shape), jnp.float32)
    return attn


def _batch(attn: Attention, vision: np.ndarray, positions: np.ndarray, text_rows=True):
    cfg = attn.nsa_config
    t = vision.size
    model_cfg = _config(cfg.kind, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    cos, sin = rope.mrope_cos_sin(
        jnp.asarray(positions), head_dim=HEAD_DIM, theta=1e4, mrope_section=(2, 3, 3)
    )
    ids = np.where(vision, H.VIDEO_PAD, 1)[None]
    rows = videonsa.text_rows(model_cfg, ids, np.ones_like(ids), positions) if text_rows else None
    return AttentionBatch(
        cos=cos,
        sin=sin,
        q_index=jnp.arange(t, dtype=jnp.int32),
        kv_valid=jnp.ones((1, t), bool),
        vision_mask=jnp.asarray(vision[None]),
        positions=jnp.asarray(positions),
        text_rows=None if rows is None else jnp.asarray(rows),
    )


def _torch_params(attn: Attention) -> dict:
    out = {}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "g_proj_1", "g_proj_2"):
        lin = getattr(attn, name)
        out[name] = oracle.to_torch(lin.kernel[...])
        out[name + ".b"] = None if lin.bias is None else oracle.to_torch(lin.bias[...])
    return out


def _torch_qkv_gates(attn: Attention, x, batch):
    """q, k, v (post-RoPE) and gate logits [B, T, H, 3] in torch, from the layer's parameters."""
    p = _torch_params(attn)
    cos, sin = (oracle.to_torch(a)[:, :, None, :] for a in (batch.cos, batch.sin))

    def proj(name, heads):
        y = x @ p[name] + p[name + ".b"]
        return y.reshape(*x.shape[:2], heads, HEAD_DIM)

    def rotate(y):
        half = y.shape[-1] // 2
        return y * cos + torch.cat([-y[..., half:], y[..., :half]], dim=-1) * sin

    q, k = rotate(proj("q_proj", HEADS)), rotate(proj("k_proj", KV_HEADS))
    v = proj("v_proj", KV_HEADS)
    hidden = F.gelu(x @ p["g_proj_1"] + p["g_proj_1.b"])  # exact GELU
    logits = (hidden @ p["g_proj_2"] + p["g_proj_2.b"]) / attn.nsa_config.gate_temperature
    return q, k, v, logits.reshape(*x.shape[:2], HEADS, 3), p["o_proj"]


def _torch_dense(q, k, v):
    """Dense causal GQA over all keys (query head h reads KV head h // G)."""
    g = q.shape[2] // k.shape[2]
    k, v = (y.repeat_interleave(g, dim=2) for y in (k, v))
    s = torch.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5
    t = q.shape[1]
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", s.softmax(-1), v)


def _run_layer(attn: Attention, x: np.ndarray, batch) -> tuple[np.ndarray, dict]:
    attn.capture_internals = True
    out, _ = attn(jnp.asarray(x), batch)
    return np.asarray(out), _pop(attn)


# -- (a) kind "videonsa" vs the composition ------------------------------------------------------


def test_videonsa_layer_matches_composition():
    """Vision rows = NSA (fla naive pieces) with the layer's gates; text rows = dense attention."""
    bs, count, window = 16, 4, 40
    attn = _layer("videonsa", block_size=bs, block_count=count, window_size=window)
    vision, positions = _layout(n_prefix=21, frames=6, grid_hw=6, n_suffix=13)  # T = 250
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, vision.size, HEADS * HEAD_DIM)).astype(np.float32)
    batch = _batch(attn, vision, positions)
    out, record = _run_layer(attn, x, batch)

    with torch.no_grad():
        q, k, v, logits, wo = _torch_qkv_gates(attn, oracle.to_torch(x), batch)
        gates = logits.sigmoid()
        o_nsa, *_, idx = oracle.nsa(
            q, k, v, *gates.unbind(-1), block_size=bs, block_count=count, window_size=window,
            scale=HEAD_DIM**-0.5,
        )[:4]  # fmt: skip
        o = torch.where(torch.from_numpy(vision)[None, :, None, None], o_nsa, _torch_dense(q, k, v))
        expected = (o.reshape(1, vision.size, -1) @ wo).numpy()
    np.testing.assert_allclose(out, expected, **TOL)
    np.testing.assert_allclose(record["internal_gates"], gates.numpy(), **TOL)
    assert (record["internal_block_indices"][0, 64:] >= 0).sum(-1).min() == count  # top-k active
    np.testing.assert_array_equal(
        oracle.canonical_indices(record["internal_block_indices"]),
        oracle.canonical_indices(idx.numpy()),
    )
    means = gates.numpy()[0, vision].mean(axis=(0, 1))
    got = [record[name] for name in videonsa.GATE_NAMES]
    np.testing.assert_allclose(got, means, **TOL)

    # The dense kind with the same q/k/v/o weights gives the same text rows.
    dense_cfg = _config("dense", heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    dense = Attention(dense_cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        setattr(dense, name, getattr(attn, name))
    out_dense = np.asarray(dense(jnp.asarray(x), batch)[0])
    np.testing.assert_allclose(out[0, ~vision], out_dense[0, ~vision], **TOL)
    assert np.abs(out[0, vision] - out_dense[0, vision]).max() > 1e-3


# -- (c) kind "videonsa_release" vs the composition ----------------------------------------------


def _torch_release(attn, x, batch, jax_indices):
    """The released layer (spec §5.4) in torch; top-k by `oracle.release_topk`.

    Rows whose queries are zeroed (text by positions) have exactly tied importances, which the
    released bitonic network breaks in its own way (tested in test_nsa_release.py); for them the
    selection uses the JAX layer's blocks. Returns (output, oracle block indices).
    """
    cfg = attn.nsa_config
    pos = torch.from_numpy(np.array(batch.positions))
    is_vision = ~((pos[0] == pos[1]) & (pos[1] == pos[2]))  # [B, T]
    m = is_vision[..., None, None].float()
    q, k, v, logits, wo = _torch_qkv_gates(attn, oracle.to_torch(x), batch)
    gates = (logits * m).sigmoid()

    def pad(y):  # [x | x | zeros] to 64 slots
        return torch.cat([y, y, torch.zeros_like(y[:, :, : 64 - 2 * HEADS])], dim=2)

    q64, km, vm = pad(q * m), k * m, v * m
    g64 = [pad(g) for g in gates.unbind(-1)]
    bs, scale = cfg.block_size, HEAD_DIM**-0.5
    num_selected = 1 << (cfg.block_count - 1).bit_length()
    kc, vc = oracle.mean_pool(km, bs), oracle.mean_pool(vm, bs)
    o_cmp, lse = oracle.release_compression(q64, kc, vc, bs, scale)
    imp = oracle.release_importance(q64, kc, lse, bs, scale)
    idx = oracle.release_topk(imp, bs, num_selected)
    tied = ~is_vision[..., None, None]
    used = torch.where(tied, torch.from_numpy(np.array(jax_indices)).long(), idx)
    o_slc = oracle.fla_naive.naive_nsa_selection(q64, km, vm, used, bs, scale)
    o_swa = oracle.sliding_window(q64, km, vm, cfg.window_size, scale)
    o64 = sum(g[..., None] * o for g, o in zip(g64, (o_cmp, o_slc, o_swa), strict=True))
    o_nsa = 0.5 * (o64[:, :, :HEADS] + o64[:, :, HEADS : 2 * HEADS])
    o = o_nsa + _torch_dense(q * (1 - m), k, v)
    return (o.reshape(*x.shape[:2], -1) @ wo).numpy(), idx.numpy(), is_vision[0].numpy()


@pytest.mark.parametrize(
    "layout, budget",
    [
        # The released budget (BS 64, S 32, W 256) at T = 280 <= 2048: every block 0..cur selected.
        ((15, 4, 8, 9), dict(block_size=64, block_count=32, window_size=256)),
        # BS 16, S 6 -> 8, W 48 at T = 648: top-k active past row 128, for vision and text rows.
        ((30, 9, 8, 42), dict(block_size=16, block_count=6, window_size=48)),
    ],
)
def test_videonsa_release_layer_matches_composition(layout, budget):
    """28/4 heads on the 64-slot layout; ghost text rows (t == h == w) inside the video."""
    attn = _layer("videonsa_release", seed=2, **budget)
    vision, positions = _layout(*layout)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, vision.size, HEADS * HEAD_DIM)).astype(np.float32)
    out, record = _run_layer(attn, x, _batch(attn, vision, positions))
    idx = record["internal_block_indices"]
    with torch.no_grad():
        expected, idx_t, is_vision = _torch_release(attn, x, _batch(attn, vision, positions), idx)
    assert (~is_vision & vision).sum() >= 2  # vision tokens detected as text
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    rows = np.flatnonzero(is_vision)
    np.testing.assert_array_equal(
        oracle.canonical_indices(idx[0, rows]), oracle.canonical_indices(idx_t[0, rows])
    )
    num_selected = 1 << (budget["block_count"] - 1).bit_length()
    top_k_active = vision.size > budget["block_size"] * num_selected
    assert top_k_active == bool((idx[0] >= 0).all(-1).any())


# -- (b) model-level invariants ------------------------------------------------------------------


def _tiny_model(kind: str, seed: int = 0, **attention) -> Qwen2_5_VL:
    model = Qwen2_5_VL(
        _config(kind, **attention), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(seed)
    )
    gates = model.text.layers.self_attn.g_proj_2
    gates.kernel[...] = gates.kernel[...] * 20  # spread the gates away from 0.5
    return model


def _video_prompt(rng, grid=(4, 8, 8), n_prefix=9, n_suffix=11, batch=1):
    span = H.vision_span(grid, H.VIDEO_PAD)
    ids = [H.random_text(rng, n_prefix) + span + H.random_text(rng, n_suffix) for _ in range(batch)]
    pixels = H.random_pixels(rng, [grid] * batch)
    return np.array(ids), dict(pixel_values_videos=pixels, video_grid_thw=np.array([grid] * batch))


_forward = jax.jit(lambda g, s, inputs: nnx.merge(g, s).forward(inputs), static_argnums=0)
_cached = jax.jit(lambda g, s, i, c: nnx.merge(g, s).forward_cached(i, c), static_argnums=0)


def _logits(model, inputs) -> np.ndarray:
    return np.asarray(_forward(*nnx.split(model), inputs))


@pytest.mark.parametrize("kind", ["videonsa", "videonsa_release"])
def test_model_invariants(kind):
    """Causality; text_rows vs the all-rows fallback; prefill (+ cached decode) = forward."""
    model = _tiny_model(kind, block_size=16, block_count=4, window_size=32)
    rng = np.random.default_rng(0)
    ids, vision = _video_prompt(rng, batch=2)
    mask = np.ones_like(ids)
    mask[1, -4:] = 0  # right padding in row 1
    inputs = model.prepare_inputs(ids, mask, **vision)
    assert inputs.text_rows.shape == (2, 64)
    logits = _logits(model, inputs)

    # Causality: changing the last 3 tokens leaves every earlier row unchanged.
    changed = ids.copy()
    changed[:, -3:] = changed[:, -3:] % 7 + 1
    later = _logits(model, model.prepare_inputs(changed, mask, **vision))
    np.testing.assert_allclose(later[:, :-3], logits[:, :-3], rtol=1e-5, atol=1e-5)
    assert np.abs(later[0, -3:] - logits[0, -3:]).max() > 1e-3

    # The all-rows fallback (dense for every row, no text_rows) agrees on the real rows.
    real = mask.astype(bool)  # padding rows differ (NSA vs dense), and are never read
    fallback = _logits(model, inputs._replace(text_rows=None))
    np.testing.assert_allclose(fallback[real], logits[real], rtol=1e-5, atol=1e-5)
    assert model.prepare_inputs(ids, mask, **vision, num_text_rows=100).text_rows.shape == (2, 100)

    # Prefill into a cache, then one decode step (dense over the cache) = the full forward.
    ids, vision = _video_prompt(rng)
    full = _logits(model, model.prepare_inputs(ids, **vision))
    graphdef, state = nnx.split(model)
    prefill = model.prepare_inputs(ids[:, :-1], **vision)
    cache = model.init_cache(1, ids.shape[1] + 3)
    prefill_logits, cache = _cached(graphdef, state, prefill, cache)
    np.testing.assert_allclose(prefill_logits, full[:, :-1], rtol=1e-5, atol=1e-5)
    if kind == "videonsa_release":
        return  # The released full forward adds the NSA "junk" term to text rows; decode does not.
    step = decode_inputs(jnp.asarray(ids[:, -1:]), cache, jnp.asarray(prefill.rope_deltas))
    decode_logits, _ = _cached(graphdef, state, step, cache)
    np.testing.assert_allclose(decode_logits[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)


# -- (d) checkpoints -----------------------------------------------------------------------------


def _params(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_gate_checkpoints_both_layouts(tmp_path):
    model = _tiny_model("videonsa", seed=1)
    save_pretrained(model, tmp_path / "hub")
    tensors = safetensors.numpy.load_file(tmp_path / "hub" / "model.safetensors")
    assert tensors["model.layers.1.self_attn.g_proj_1.weight"].shape == (64, 64)
    assert tensors["model.layers.1.self_attn.g_proj_2.bias"].shape == (12,)
    np.testing.assert_array_equal(
        tensors["model.layers.0.self_attn.g_proj_2.weight"],
        np.asarray(model.text.layers.self_attn.g_proj_2.kernel[...])[0].T,
    )
    new = tmp_path / "new"
    new.mkdir()
    (new / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
    renamed = {
        "model.language_model." + k[len("model.") :]
        if k.startswith("model.")
        else ("model." + k if k.startswith("visual.") else k): v
        for k, v in tensors.items()
    }
    assert "model.language_model.layers.0.self_attn.g_proj_1.weight" in renamed
    safetensors.numpy.save_file(renamed, new / "model.safetensors", metadata={"format": "pt"})
    want = _params(model)
    for path in (tmp_path / "hub", new):
        loaded = from_pretrained(path, dtype=jnp.float32)
        assert loaded.config.attention == model.config.attention
        got = _params(loaded)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=str(key))


def test_qwen_checkpoint_gets_fresh_gates_and_budget_override(tmp_path, caplog):
    H.save_tiny(tmp_path)
    dense = from_pretrained(tmp_path, dtype=jnp.float32)
    with caplog.at_level(logging.WARNING, logger="videonsa_jax.checkpoints.hf"):
        model = from_pretrained(
            tmp_path, dtype=jnp.float32, attention="videonsa", block_count=7, window_size=48
        )
    notices = [r for r in caplog.records if "absent from the checkpoint" in r.getMessage()]
    assert len(notices) == 1 and "g_proj_1.weight" in notices[0].getMessage()
    a = model.config.attention
    assert (a.kind, a.block_count, a.window_size, a.block_size) == ("videonsa", 7, 48, 64)
    attn = model.text.layers.self_attn
    for lin in (attn.g_proj_1, attn.g_proj_2):
        assert 0.015 < float(jnp.std(lin.kernel[...])) < 0.025
        assert not np.asarray(lin.bias[...]).any()
    dense_params = _params(dense)
    for key, value in _params(model).items():
        if "g_proj" not in str(key):
            np.testing.assert_array_equal(value, dense_params[key], err_msg=str(key))
    release = from_pretrained(tmp_path, dtype=jnp.float32, attention="videonsa_release")
    assert release.config.rope_time_rule == "int"


# -- (e) a >= 4K-token video: forward and gradient on CPU ----------------------------------------


def test_long_video_forward_and_grad():
    """4096 video tokens + prompt through a tiny VideoNSA model, with the released budget."""
    model = _tiny_model("videonsa", block_size=64, block_count=32, window_size=256)
    rng = np.random.default_rng(0)
    ids, vision = _video_prompt(rng, grid=(16, 32, 32), n_prefix=20, n_suffix=30)
    inputs = model.prepare_inputs(ids, **vision)
    assert ids.shape[1] >= 4096 + 50 and inputs.text_rows.shape == (1, 64)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def loss_and_grad(params):
        def loss(params):
            m = nnx.merge(graphdef, params, rest)
            logits = m.forward(inputs)[:, :-1]
            nll = -jnp.take_along_axis(
                jax.nn.log_softmax(logits), jnp.asarray(ids)[:, 1:, None], axis=-1
            )
            return jnp.mean(nll)

        return jax.value_and_grad(loss)(params)

    value, grads = loss_and_grad(params)
    assert np.isfinite(float(value))
    leaves = {str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    assert all(np.isfinite(g).all() for g in leaves.values())
    for name in ("g_proj_1", "g_proj_2", "q_proj", "patch_embed"):
        assert any(name in k and np.abs(g).max() > 0 for k, g in leaves.items()), name
