"""Per-layer-kind times of the project's model, and the ``docs/design.md`` §9 extrapolation.

Each module kind of the trained model (its own parameters, inside megatron-core's DDP, so the
gradient hooks run as in training) is run forward + backward in isolation on the training shapes
and timed with CUDA events (median of ``spec.breakdown_iters`` after 2 warm-ups):

    gdn_layer        a whole GDN layer: RMS_in, GDN mixer, residual, RMS_mlp, MLP, residual
    attention_layer  a whole attention layer: attention, RMS_attn, residual, MLP, RMS_ffout, residual
    gdn_mixer        in_proj, short conv, gated delta rule (fla), gated RMSNorm, out_proj
    attention_mixer  linear_qkv, QK RMSNorm, RoPE, SDPA, linear_proj
    mlp              linear_fc1, SwiGLU, linear_fc2
    rmsnorm          one RMSNorm [S, B, D]
    embedding        the token embedding lookup
    head_and_loss    final RMSNorm, LM head, cross-entropy + z-loss

Inputs: hidden states [S, B, D] in the model's dtype (random normal), output gradients random
normal. "norms/elementwise" of a layer kind = layer - mixer - mlp (2 norms, 2 residual adds).

Extrapolation (``docs/design.md`` §9): t_full = t_rest + n_G t_G + n_A t_A, with t_G, t_A the
isolated layer times and t_rest = (measured fwd+bwd of the reduced model) - n_G' t_G - n_A' t_A
(embedding, final norm, LM head, loss and the schedule / DDP overheads, measured in the same
run). The optimizer step (with the gradient-buffer zeroing) is scaled by the parameter count
and amortized over ``spec.micro_batches_full`` micro-batches.
"""
from __future__ import annotations

import torch

from megatron_hybrid.benchmark.spec import BenchSpec, layer_counts
from megatron_hybrid.benchmark.timing import Deadline, median, time_fn
from megatron_hybrid.config import OlmoHybridConfig
from megatron_hybrid.config.layout import ATTENTION, GDN
from megatron_hybrid.training.loss import lm_loss_with_z_loss

KINDS = ("gdn_layer", "attention_layer", "gdn_mixer", "attention_mixer", "mlp", "rmsnorm",
         "embedding", "head_and_loss")


def isolated_timings(engine, deadline: Deadline | None = None) -> dict[str, float | None]:
    """Median fwd+bwd milliseconds per module kind of ``engine``'s model (see the module doc).

    Kinds not timed because the deadline passed are None.
    """
    spec: BenchSpec = engine.spec
    m, device = engine.unwrapped, engine.device
    cfg = engine.cfg
    dtype = next(m.parameters()).dtype
    types = [cfg.layout.layer_types[i] for i in m.stage_layers]
    gdn_layer, attn_layer = m.decoder.layers[types.index(GDN)], m.decoder.layers[types.index(ATTENTION)]
    S, B, D = spec.seq_length, spec.micro_batch_size, cfg.hidden_size
    rope = None
    if cfg.position_embedding_type == "rope":
        rope = m.rotary_pos_emb(S)                         # [S, 1, 1, Dh]
    gen = torch.Generator(device=device).manual_seed(spec.seed + 1)
    x0 = torch.randn(S, B, D, generator=gen, device=device, dtype=torch.float32).to(dtype)
    dy = torch.randn(S, B, D, generator=gen, device=device, dtype=torch.float32).to(dtype)
    batch = engine.batch

    def through(fn):
        def run():
            x = x0.detach().requires_grad_()
            fn(x).backward(dy)
        return run

    def head_and_loss():
        x = x0.detach().requires_grad_()
        h = m.decoder.final_layernorm(x)
        logits, _ = m.output_layer(h)                      # [S, B, V]
        total, _, _ = lm_loss_with_z_loss(logits.transpose(0, 1), batch["labels"],
                                          batch["loss_mask"], spec.z_loss_weight)
        total.backward()

    def embedding():
        out = m.embedding(input_ids=batch["tokens"], position_ids=batch["position_ids"])
        out.backward(dy)

    fns = {
        "gdn_layer": through(lambda x: gdn_layer(hidden_states=x, attention_mask=None,
                                                 rotary_pos_emb=rope)[0]),
        "attention_layer": through(lambda x: attn_layer(hidden_states=x, attention_mask=None,
                                                        rotary_pos_emb=rope)[0]),
        "gdn_mixer": through(lambda x: gdn_layer.self_attention(x, attention_mask=None)[0]),
        "attention_mixer": through(lambda x: attn_layer.self_attention(
            x, attention_mask=None, rotary_pos_emb=rope)[0]),
        "mlp": through(lambda x: gdn_layer.mlp(x)[0]),
        "rmsnorm": through(lambda x: gdn_layer.input_layernorm(x)),
        "embedding": embedding,
        "head_and_loss": head_and_loss,
    }
    out: dict[str, float | None] = {}
    m.train()
    for kind in KINDS:
        if deadline is not None and deadline.expired():
            out[kind] = None
            continue
        out[kind] = median(time_fn(fns[kind], device, warmup=2, iters=spec.breakdown_iters))
    # the hooks accumulated into the gradient buffers: leave them clean for whoever steps next
    engine.setup.model.zero_grad_buffer()
    return out


def _row(kind, per, n_red, n_full):
    return {"kind": kind, "per_instance_ms": per, "count_reduced": n_red,
            "reduced_ms": None if per is None else per * n_red,
            "count_full": n_full, "full_ms": None if per is None else per * n_full}


def extrapolate(train: dict, iso: dict[str, float | None], cfg: OlmoHybridConfig,
                full_cfg: OlmoHybridConfig, params_reduced: int, params_full: int,
                spec: BenchSpec, flops_per_token_full: float, peak_tflops: float,
                ceiling_tflops: float | None) -> dict | None:
    """The breakdown table and the full-model estimate (``docs/design.md`` §9).

    Args:
        train: ``run_timed_iterations`` result of ours (``fwd_bwd_ms``, ``optimizer_ms``, and
            ``zero_grad_ms`` when recorded).
        iso: ``isolated_timings``. cfg / full_cfg: reduced / full model configs.
        params_reduced / params_full: parameter counts (optimizer-step scaling).
        flops_per_token_full: docs/model.md §10 FLOPs per token of the full model (fwd+bwd).
        peak_tflops / ceiling_tflops: the nominal peak and the measured matmul ceiling.

    Returns None when a needed time is missing, else {"rows": [...], "reduced": {...},
    "full": {...}} with times in ms.
    """
    need = ("gdn_layer", "attention_layer", "gdn_mixer", "attention_mixer", "mlp")
    fwd_bwd, opt = median(train.get("fwd_bwd_ms") or []), median(train.get("optimizer_ms") or [])
    if fwd_bwd is None or opt is None or any(iso.get(k) is None for k in need):
        return None
    opt += median(train.get("zero_grad_ms") or []) or 0.0
    red, full = layer_counts(cfg), layer_counts(full_cfg)
    t_g, t_a = iso["gdn_layer"], iso["attention_layer"]
    t_rest = fwd_bwd - red["gdn"] * t_g - red["attention"] * t_a
    norm_g = t_g - iso["gdn_mixer"] - iso["mlp"]
    norm_a = t_a - iso["attention_mixer"] - iso["mlp"]
    rest_iso = None
    if iso.get("embedding") is not None and iso.get("head_and_loss") is not None:
        rest_iso = iso["embedding"] + iso["head_and_loss"]
    rows = [
        _row("GDN mixer", iso["gdn_mixer"], red["gdn"], full["gdn"]),
        _row("attention mixer", iso["attention_mixer"], red["attention"], full["attention"]),
        _row("MLP", iso["mlp"], cfg.num_layers, full_cfg.num_layers),
        _row("norms/elementwise (GDN layers)", norm_g, red["gdn"], full["gdn"]),
        _row("norms/elementwise (attention layers)", norm_a, red["attention"], full["attention"]),
        _row("embedding + final norm + LM head + loss (isolated)", rest_iso, 1, 1),
        _row("other (schedule, DDP hooks, launch gaps)",
             None if rest_iso is None else t_rest - rest_iso, 1, 1),
    ]
    scale = params_full / params_reduced
    mb = spec.micro_batches_full
    opt_full = opt * scale
    rows.append({"kind": "optimizer step + grad zeroing (per iteration)", "per_instance_ms": None,
                 "count_reduced": 1, "reduced_ms": opt, "count_full": 1,
                 "full_ms": opt_full / mb, "note": f"full: scaled x{scale:.2f} by parameters, "
                                                  f"amortized over {mb} micro-batches"})
    t_full = t_rest + full["gdn"] * t_g + full["attention"] * t_a
    t_iter_full = mb * t_full + opt_full
    tokens = mb * spec.tokens_per_iteration
    tps = tokens / (t_iter_full * 1e-3)
    tflops = tps * flops_per_token_full / 1e12
    total_per_mb = t_full + opt_full / mb
    for r in rows:
        r["full_share"] = None if r["full_ms"] is None else r["full_ms"] / total_per_mb
    return {
        "rows": rows,
        "reduced": {"fwd_bwd_ms": fwd_bwd, "t_gdn_layer_ms": t_g, "t_attention_layer_ms": t_a,
                    "t_rest_ms": t_rest, "t_rest_isolated_ms": rest_iso,
                    "optimizer_ms": opt, "layers": red, "parameters": params_reduced},
        "full": {"layers": full, "parameters": params_full, "fwd_bwd_ms": t_full,
                 "optimizer_ms": opt_full, "optimizer_amortized_ms": opt_full / mb,
                 "micro_batches": mb, "iteration_ms": t_iter_full, "tokens_per_s": tps,
                 "tflops": tflops, "mfu_peak": tflops / peak_tflops,
                 "mfu_ceiling": None if not ceiling_tflops else tflops / ceiling_tflops,
                 "flops_per_token": flops_per_token_full},
    }
