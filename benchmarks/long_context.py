"""Decoder forward and forward+backward at 128K tokens on one GPU: VideoNSA vs dense attention.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python3 benchmarks/long_context.py \
        [--seqs 131072] [--layers 2,4] [--kinds videonsa,dense] [--reps 3] [--no-check] [--tiny]

Model: the Qwen2.5-VL-7B text decoder (28 / 4 heads, hidden 3584, MLP 18944; NSA block 64,
32 blocks, window 256, as configs/qwen2_5_vl_7b_videonsa.py) with `--layers` decoder layers,
random init, bf16 parameters and activations, remat "full" (configs/long128k.py). No vision tower
and no lm head: random input embeddings go straight into the decoder (`TextModel`), and the loss
is mean(hidden ** 2) of its final-normed output, so no [T, vocab] array exists.
Input: the layout of configs/long128k.py for `seqs` vision tokens: a 16-token text prefix, one
video of seqs / 256 grid steps (2 frames at 448 x 448 each; 1024 frames for 131,072 tokens) and
1008 text tokens after it (question + answer), T = seqs + 1024 tokens; M-RoPE positions and the
VideoNSA text rows as `Qwen2_5_VL.prepare_inputs` computes them.
Measured per (kind, layers): median of `--reps` jitted calls of the forward (loss) and of the
forward+backward (grads of the layer parameters), peak device memory, and the attention alone
(`Attention._attend` of one layer on random q/k/v, forward and forward+backward). Each
(kind, layers) runs in its own subprocess: the peak-memory counter is per process. Per-layer
cost = the difference between the two layer counts. Then the extrapolation to the 28-layer model
with the sequence split over 8 GPUs (configs/long128k.py:h200, `videonsa_jax.parallel.context`).
On a GPU it first compares `cudnn_causal_attention` with the chunked XLA `dense_attention`
(T = 4096, bf16, right padding). `--tiny`: a 64-wide model with 1 and 2 layers on a 320-token
input, run in this process (no peak memory on a CPU), for the CPU smoke test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT_TOKENS, PREFIX_TOKENS = 1024, 16  # configs/long128k.py: up to 1,024 text tokens
TINY_TEXT_TOKENS = 64
FULL_LAYERS, CONTEXT = 28, 8  # Qwen2.5-VL-7B; configs/long128k.py:h200 (8 GPUs, context 8)
GIB = 2**30


# -- one measurement (runs in a subprocess) --------------------------------------------------------


def model_config(kind: str, layers: int, tiny: bool):
    """The 7B decoder (or the tiny one) with `layers` layers, `kind` attention, full remat."""
    from videonsa_jax.config import AttentionConfig, ModelConfig, TextConfig

    if tiny:
        text = TextConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_layers=layers,
            num_heads=4,
            num_kv_heads=2,
            mrope_section=(2, 3, 3),
        )
        nsa = AttentionConfig(kind=kind, block_size=8, block_count=2, window_size=16)
    else:
        text = TextConfig(num_layers=layers)
        nsa = AttentionConfig(kind=kind, block_size=64, block_count=32, window_size=256)
    return ModelConfig(text=text, attention=nsa, remat="full")


def decoder_inputs(config, seq: int, tiny: bool):
    """input_ids [1, T], positions [3, 1, T], vision_mask [1, T], text_rows [1, n] (numpy)."""
    import numpy as np

    from videonsa_jax.model import rope, videonsa

    side = 112 if tiny else 448  # frame side in pixels; one video token per 28 x 28 pixels
    per_step = (side // 28) ** 2
    if seq % per_step:
        raise ValueError(f"--seqs must be a multiple of {per_step} vision tokens")
    text = TINY_TEXT_TOKENS if tiny else TEXT_TOKENS
    ids = np.full((1, seq + text), 1000 % config.text.vocab_size, np.int32)
    ids[0, PREFIX_TOKENS : PREFIX_TOKENS + seq] = config.video_token_id
    grid = np.array([[seq // per_step, side // 14, side // 14]])  # 2 frames per grid step
    mask = np.ones_like(ids)
    positions, _ = rope.get_rope_index(ids, mask, None, grid, [1.0], config=config)
    rows = (
        videonsa.text_rows(config, ids, mask, positions)
        if config.attention.kind != "dense"
        else None
    )
    return ids, positions, ids == config.video_token_id, rows


def peak_bytes() -> int | None:
    import jax

    stats = jax.local_devices()[0].memory_stats()
    return None if stats is None else stats.get("peak_bytes_in_use")


def run_phase(result: dict, name: str, fn, args: tuple, reps: int) -> None:
    """Compiles and times `fn(*args)`; stores name_plan (XLA's planned bytes: temporaries +
    arguments + outputs), then name_ms and name_peak (the process's peak so far) or name_error."""
    import jax

    from benchmarks.common import bench

    try:
        compiled = jax.jit(fn).lower(*args).compile()
        m = compiled.memory_analysis()
        if m is not None:
            plan = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
            result[f"{name}_plan"] = plan
        result[f"{name}_ms"] = bench(compiled, *args, reps=reps)
        result[f"{name}_peak"] = peak_bytes()
    except jax.errors.JaxRuntimeError as e:  # out of memory: keep the other phases
        result[f"{name}_error"] = str(e).split("\n")[0][:160]


def measure(kind: str, layers: int, seq: int, tiny: bool, reps: int, attention: bool) -> dict:
    """Times the decoder (and, if `attention`, one layer's attention) in phases: fwd_bwd first
    (the largest; its peak is the process peak), then fwd, attn_fwd_bwd, attn_fwd."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from videonsa_jax.model.attention import Attention, AttentionBatch
    from videonsa_jax.model.text import TextModel

    config = model_config(kind, layers, tiny)
    dtype = jnp.float32 if tiny else jnp.bfloat16  # bf16 matmuls are slow on a CPU
    ids, positions, vision_mask, rows = decoder_inputs(config, seq, tiny)
    t, hidden = ids.shape[1], config.text.hidden_size
    inputs = tuple(None if a is None else jnp.asarray(a) for a in (positions, vision_mask, rows))
    model = TextModel(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, layer_params, rest = nnx.split(model, nnx.PathContains("layers"), ...)
    del model
    keys = jax.random.split(jax.random.key(1), 5)
    embeds = jax.random.normal(keys[0], (1, t, hidden), dtype)

    def loss(layer_params, rest, embeds, inputs):
        positions, vision_mask, rows = inputs
        text = nnx.merge(graphdef, layer_params, rest)
        out, _ = text(embeds, positions, vision_mask=vision_mask, text_rows=rows)
        return jnp.mean(jnp.square(out.astype(jnp.float32)))

    result = {"kind": kind, "layers": layers, "seq": seq, "T": t}
    result["device"] = f"{jax.devices()[0].device_kind}, jax {jax.__version__}"
    args = (layer_params, rest, embeds, inputs)
    run_phase(result, "fwd_bwd", jax.value_and_grad(loss), args, reps)
    run_phase(result, "fwd", loss, args, reps)
    if not attention:
        return result
    del layer_params, rest, args

    # The attention of one layer alone (the path `Attention._attend` takes in the model).
    t_cfg = config.text
    attn = Attention(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    q = jax.random.normal(keys[1], (1, t, t_cfg.num_heads, t_cfg.head_dim), dtype)
    k, v = (
        jax.random.normal(key, (1, t, t_cfg.num_kv_heads, t_cfg.head_dim), dtype)
        for key in keys[2:4]
    )
    x = jax.random.normal(keys[4], (1, t, hidden), dtype)
    attn_graph, attn_state = nnx.split(attn)

    def attend(x, q, k, v, inputs):
        positions, vision_mask, rows = inputs
        batch = AttentionBatch(
            cos=None,
            sin=None,
            q_index=jnp.arange(t, dtype=jnp.int32),
            kv_valid=jnp.ones((1, t), bool),
            vision_mask=vision_mask,
            positions=positions,
            text_rows=rows,
        )
        out = nnx.merge(attn_graph, attn_state)._attend(x, q, k, v, batch)
        return jnp.mean(jnp.square(out.astype(jnp.float32)))

    args = (x, q, k, v, inputs)
    run_phase(result, "attn_fwd_bwd", jax.grad(attend, argnums=(0, 1, 2, 3)), args, reps)
    run_phase(result, "attn_fwd", attend, args, reps)
    return result


def check_cudnn(t: int = 4096) -> dict:
    """cuDNN vs chunked XLA dense attention, bf16, B=2 right-padded to lengths (t, 0.7 t)."""
    import jax
    import jax.numpy as jnp

    from videonsa_jax.model.attention import cudnn_causal_attention, dense_attention

    keys = jax.random.split(jax.random.key(2), 4)
    q = jax.random.normal(keys[0], (2, t, 28, 128), jnp.bfloat16)
    k, v = (jax.random.normal(key, (2, t, 4, 128), jnp.bfloat16) for key in keys[1:3])
    cot = jax.random.normal(keys[3], q.shape, jnp.float32)
    valid = jnp.arange(t)[None, :] < jnp.array([[t], [int(0.7 * t)]])
    index = jnp.arange(t, dtype=jnp.int32)
    fns = {
        "cudnn": lambda q, k, v: cudnn_causal_attention(q, k, v, valid),
        "xla": lambda q, k, v: dense_attention(q, k, v, q_index=index, kv_valid=valid),
    }
    outs, grads = {}, {}
    for name, fn in fns.items():
        outs[name] = jax.jit(fn)(q, k, v).astype(jnp.float32)
        loss = lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32) * cot)
        grads[name] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    diff = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
    rel = lambda a, b: diff(a, b) / float(jnp.max(jnp.abs(b.astype(jnp.float32))))
    return {
        "T": t,
        "out_max_abs_diff": diff(outs["cudnn"], outs["xla"]),
        "out_max_abs": float(jnp.max(jnp.abs(outs["xla"]))),
        "grad_rel_diff": [rel(a, b) for a, b in zip(grads["cudnn"], grads["xla"], strict=True)],
    }


# -- the driver ------------------------------------------------------------------------------------


def run_job(job: dict, timeout: float, in_process: bool) -> dict:
    """Runs one job in a fresh process (`common.run_worker`) or in this one; returns its result
    or the job with an "error"."""
    if in_process:
        return check_cudnn() if job.get("check") else measure(**job)
    from benchmarks.common import run_worker

    return run_worker(__file__, job, timeout)


def fmt(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def gib(x) -> str:
    return "-" if x is None else f"{x / GIB:.1f}"


def cell(r: dict, phase: str) -> str:
    """A phase's time in ms, or "OOM" / "failed"."""
    if f"{phase}_error" in r:
        return "OOM" if "RESOURCE_EXHAUSTED" in r[f"{phase}_error"] else "failed"
    return fmt(r.get(f"{phase}_ms"))


def per_layer(results: list[dict], kind: str, seq: int) -> dict | None:
    """Slopes between the smallest and largest layer count measured (per layer), the non-layer
    fwd+bwd time and the attention alone; None without two layer counts."""
    runs = sorted(
        (r for r in results if r["kind"] == kind and r["seq"] == seq and "error" not in r),
        key=lambda r: r["layers"],
    )
    if len(runs) < 2:
        return None
    lo, hi = runs[0], runs[-1]
    s = {"kind": kind, "T": lo["T"]}
    for key in ("fwd_ms", "fwd_bwd_ms", "fwd_plan", "fwd_bwd_plan", "fwd_bwd_peak"):
        if lo.get(key) is not None and hi.get(key) is not None:
            s[key] = (hi[key] - lo[key]) / (hi["layers"] - lo["layers"])
    for phase in ("fwd", "fwd_bwd"):
        if f"{phase}_ms" in s:
            s[f"rest_{phase}_ms"] = lo[f"{phase}_ms"] - lo["layers"] * s[f"{phase}_ms"]
    s.update({key: lo.get(key) for key in ("attn_fwd_ms", "attn_fwd_bwd_ms")})
    return s


def extrapolate(s: dict, cfg, phase: str) -> dict | None:
    """28 layers, sequence split over CONTEXT GPUs: per-GPU time of one sequence's `phase`.

    Every per-token op and every query's attention runs on T / CONTEXT rows: 1/CONTEXT of the
    one-GPU time ("balanced"). Causal attention is not balanced over contiguous shards: the last
    shard's queries see all keys, (2 * CONTEXT - 1) / CONTEXT**2 of the causal work (15/64 for 8),
    and the slowest shard bounds the step, so the "slowest shard" figure scales the attention's
    share (fwd_bwd with remat: forward twice, backward once) by that instead. For NSA only
    compression and top-k scoring grow with the position: its slowest-shard figure is an upper
    bound. None if `phase` or the attention alone was not measured.
    """
    attn = [s.get("attn_fwd_ms")] + ([s.get("attn_fwd_bwd_ms")] if phase == "fwd_bwd" else [])
    if f"{phase}_ms" not in s or None in attn:
        return None
    layer, attn = s[f"{phase}_ms"], sum(attn)
    balanced = layer / CONTEXT
    slowest = max(layer - attn, 0.0) / CONTEXT + attn * (2 * CONTEXT - 1) / CONTEXT**2
    steps = [FULL_LAYERS * ms + s[f"rest_{phase}_ms"] / CONTEXT for ms in (balanced, slowest)]
    t = cfg.text
    return {
        "phase": phase,
        "attn_share": attn / layer,
        "balanced_ms": balanced,
        "slowest_ms": slowest,
        "step_s": [ms / 1e3 for ms in steps],
        "tokens_s": [s["T"] / (ms / 1e3) for ms in steps],
        "kv_bytes": 2 * s["T"] * t.num_kv_heads * t.head_dim * 2,  # K and V, bf16, all rows
    }


def print_tables(results: list[dict], check: dict | None, tiny: bool) -> None:
    """The markdown tables: measurements, per-layer costs, the 28-layer / 8-GPU extrapolation."""
    print()
    if check is not None:
        g = ", ".join(f"{x:.1e}" for x in check["grad_rel_diff"])
        print(
            f"cuDNN vs chunked XLA dense attention, T={check['T']}, bf16, B=2 right-padded: "
            f"output max abs diff {check['out_max_abs_diff']:.2e} (max |out| "
            f"{check['out_max_abs']:.2f}); dq/dk/dv max abs diff / max |grad| {g}"
        )
        print()
    device = next((r["device"] for r in results if "device" in r), "?")
    print(
        f"Device: {device}. plan = XLA's buffers of the executable (temporaries + arguments + "
        "outputs); peak = the process's peak_bytes_in_use after fwd+bwd (it runs first)."
    )
    print()
    print(
        "| kind | vision tokens | T | layers | fwd ms | fwd+bwd ms | tokens/s (fwd+bwd) "
        "| plan fwd GiB | plan fwd+bwd GiB | peak fwd+bwd GiB | attention fwd ms "
        "| attention fwd+bwd ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for r in results:
        if "error" in r:
            print(f"| {r['kind']} | {r['seq']:,} | - | {r['layers']} | failed | failed |")
            notes.append(f"{r['kind']}, {r['layers']} layers: {r['error']}")
            continue
        ms = r.get("fwd_bwd_ms")
        print(
            f"| {r['kind']} | {r['seq']:,} | {r['T']:,} | {r['layers']} | {cell(r, 'fwd')} "
            f"| {cell(r, 'fwd_bwd')} | {fmt(None if ms is None else r['T'] / ms * 1e3, 0)} "
            f"| {gib(r.get('fwd_plan'))} | {gib(r.get('fwd_bwd_plan'))} "
            f"| {gib(r.get('fwd_bwd_peak'))} | {cell(r, 'attn_fwd')} | {cell(r, 'attn_fwd_bwd')} |"
        )
        notes += [f"{r['kind']}, {r['layers']} layers, {k[:-6]}: {v}" for k, v in r.items()
                  if k.endswith("_error")]  # fmt: skip
    for note in notes:
        print(f"- {note}")
    slopes = [
        per_layer(results, kind, seq) for kind, seq in {(r["kind"], r["seq"]) for r in results}
    ]
    slopes = sorted((s for s in slopes if s is not None), key=lambda s: (s["T"], s["kind"]))
    if not slopes:
        return
    print()
    print(
        "| kind | T | fwd ms / layer | fwd+bwd ms / layer | plan fwd+bwd GiB / layer "
        "| peak GiB / layer | non-layer fwd+bwd ms | attention share: fwd | fwd+bwd |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    extra = []
    for s in slopes:
        cfg = model_config(s["kind"], FULL_LAYERS, tiny)
        es = [extrapolate(s, cfg, phase) for phase in ("fwd", "fwd_bwd")]
        extra += [(s, e) for e in es if e is not None]
        share = ["-" if e is None else f"{e['attn_share']:.0%}" for e in es]
        print(
            f"| {s['kind']} | {s['T']:,} | {fmt(s.get('fwd_ms'))} | {fmt(s.get('fwd_bwd_ms'))} "
            f"| {gib(s.get('fwd_bwd_plan'))} | {gib(s.get('fwd_bwd_peak'))} "
            f"| {fmt(s.get('rest_fwd_bwd_ms'))} | {share[0]} | {share[1]} |"
        )
    print()
    print(
        f"Extrapolation: {FULL_LAYERS} layers, sequence split over {CONTEXT} GPUs "
        f"(context={CONTEXT}), per GPU; 'balanced' = 1/{CONTEXT} of every op, 'slowest shard' "
        f"= attention x {2 * CONTEXT - 1}/{CONTEXT**2} (causal, contiguous shards) + the rest "
        f"/ {CONTEXT}. No communication time included."
    )
    print()
    print(
        "| kind | T | phase | ms / layer (balanced) | ms / layer (slowest shard) "
        f"| {FULL_LAYERS}-layer step s | tokens/s ({CONTEXT} GPUs, one sequence) "
        "| K+V all-gather / layer / pass (received per GPU) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for s, e in extra:
        recv = e["kv_bytes"] * (CONTEXT - 1) / CONTEXT
        print(
            f"| {s['kind']} | {s['T']:,} | {e['phase']} | {fmt(e['balanced_ms'])} "
            f"| {fmt(e['slowest_ms'])} | {e['step_s'][0]:.2f} - {e['step_s'][1]:.2f} "
            f"| {fmt(e['tokens_s'][1], 0)} - {fmt(e['tokens_s'][0], 0)} "
            f"| {e['kv_bytes'] / 2**20:.0f} MiB ({recv / 2**20:.0f} MiB) |"
        )
    print()
    print(
        "K/V traffic per layer per step with remat: the forward gathers K and V twice (forward, "
        "recomputation) and the backward reduce-scatters dK and dV (the same bytes): 3 passes."
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", default=None, help="vision tokens, comma separated (131072)")
    p.add_argument("--layers", default=None, help="decoder layer counts (2,4)")
    p.add_argument("--kinds", default="videonsa,dense")
    p.add_argument("--reps", type=int, default=None, help="timed calls per variant (3; tiny 1)")
    p.add_argument("--tiny", action="store_true", help="a small CPU-sized model and input")
    p.add_argument("--timeout", type=float, default=300, help="seconds per subprocess")
    p.add_argument("--no-check", action="store_true", help="skip the cuDNN vs XLA check")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        result = check_cudnn() if job.get("check") else measure(**job)
        print(f"measured: {json.dumps(result)}", flush=True)
        return

    seqs = [int(s) for s in (args.seqs or ("256" if args.tiny else "131072")).split(",")]
    layers = [int(n) for n in (args.layers or ("1,2" if args.tiny else "2,4")).split(",")]
    kinds = args.kinds.split(",")
    check = None
    if not (args.tiny or args.no_check):
        check = run_job({"check": True}, args.timeout, in_process=False)
        print(f"cuDNN check: {json.dumps(check)}", flush=True)
        check = None if "error" in check else check
    results = []
    for seq in seqs:
        for n in layers:
            for kind in kinds:
                reps = args.reps or (1 if args.tiny else 3)
                job = dict(kind=kind, layers=n, seq=seq, tiny=args.tiny, reps=reps)
                job["attention"] = n == min(layers)  # the same for every layer count
                results.append(run_job(job, args.timeout, in_process=args.tiny))
                print(f"measured: {json.dumps(results[-1])}", flush=True)
    print_tables(results, check, args.tiny)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
