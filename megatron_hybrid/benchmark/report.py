"""Results: per-engine metrics, the JSON file, the markdown table (``docs/performance.md``).

The results dict (``cli.run``) holds: ``spec``, ``environment``, ``model`` (parameters, FLOPs per
token), ``peaks`` (nominal and measured), ``engines`` ({"ours"|"hf"|"mc": metrics or status}),
``breakdown``, ``mc_stack`` (what blocks megatron-core's own hybrid spec, what was assembled),
``autotune``, ``notes``, ``elapsed_s``. Every engine entry has a ``status``: ok, failed, skipped.
"""
from __future__ import annotations

import json
import os

from megatron_hybrid.benchmark.timing import median

ENGINE_TITLES = {"ours": "ours (megatron-hybrid)", "hf": "HF transformers",
                 "mc": "megatron-core GDN stack"}
METRIC_KEYS = ("iteration_ms", "fwd_bwd_ms", "optimizer_ms", "zero_grad_ms", "tokens_per_s",
               "tokens_per_s_fwd_bwd", "tflops", "mfu_peak", "mfu_ceiling", "peak_memory_gib",
               "first_iteration_s", "loss_step0", "loss_last", "timed_iterations", "truncated")


def engine_metrics(train: dict, tokens_per_iteration: int, flops_per_token: float,
                   peak_tflops: float, ceiling_tflops: float | None) -> dict:
    """Medians and throughput of one engine from ``timing.run_timed_iterations``' result.

    tokens/s = B*S / iteration time (the optimizer steps every iteration: one micro-batch);
    ``tokens_per_s_fwd_bwd`` leaves the optimizer and gradient zeroing out. TFLOP/s = tokens/s x
    FLOPs per token (docs/model.md §10); MFU against the nominal peak and the measured matmul ceiling.
    """
    it, fb = median(train["iteration_ms"]), median(train["fwd_bwd_ms"])
    out = {"status": "ok", "iteration_ms": it, "fwd_bwd_ms": fb,
           "optimizer_ms": median(train["optimizer_ms"]),
           "zero_grad_ms": median(train.get("zero_grad_ms") or []),
           "iteration_ms_all": train["iteration_ms"],
           "peak_memory_gib": train["peak_memory_gib"],
           "first_iteration_s": train["first_iteration_s"], "warmup_s": train["warmup_s"],
           "losses": train["losses"], "timed_iterations": train["timed_iterations"],
           "truncated": train["truncated"]}
    out["loss_step0"] = train["losses"][0] if train["losses"] else None
    out["loss_last"] = train["losses"][-1] if train["losses"] else None
    if it:
        tps = tokens_per_iteration / (it * 1e-3)
        out["tokens_per_s"] = tps
        out["tflops"] = tps * flops_per_token / 1e12
        out["mfu_peak"] = out["tflops"] / peak_tflops
        out["mfu_ceiling"] = out["tflops"] / ceiling_tflops if ceiling_tflops else None
    if fb:
        out["tokens_per_s_fwd_bwd"] = tokens_per_iteration / (fb * 1e-3)
    return out


def ratios(results: dict) -> dict:
    """{peer: {"iteration_time": ours/peer, "tokens_per_s": ours/peer, "peak_memory": ...,
    "loss_step0_abs_diff"}} for the peers that ran (a tokens/s ratio above 1: ours is faster)."""
    eng = results.get("engines", {})
    ours = eng.get("ours", {})
    out = {}
    for peer in ("hf", "mc"):
        p = eng.get(peer, {})
        if ours.get("status") != "ok" or p.get("status") != "ok":
            continue
        r = {}
        for key, name in (("iteration_ms", "iteration_time"), ("tokens_per_s", "tokens_per_s"),
                          ("fwd_bwd_ms", "fwd_bwd_time"), ("peak_memory_gib", "peak_memory")):
            if ours.get(key) and p.get(key):
                r[name] = ours[key] / p[key]
        if ours.get("loss_step0") is not None and p.get("loss_step0") is not None:
            r["loss_step0_abs_diff"] = abs(ours["loss_step0"] - p["loss_step0"])
        out[peer] = r
    return out


def write_json(results: dict, path: str | None) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(tmp, path)


def _f(x, fmt="{:,.1f}", none="–"):
    if x is None:
        return none
    if isinstance(x, bool):
        return "yes" if x else "no"
    return fmt.format(x)


def _count(n) -> str:
    if not n:
        return "?"
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n:,}"


def _pct(x):
    return _f(None if x is None else 100 * x, "{:.1f}%")


def engine_table(results: dict) -> list[str]:
    eng = results.get("engines", {})
    names = [n for n in ("ours", "hf", "mc") if n in eng]
    rows = [("status", lambda e: e.get("status", "–") if e.get("status") != "failed"
             else "failed (see below)"),
            ("iteration time, ms (median)", lambda e: _f(e.get("iteration_ms"))),
            ("  forward + backward, ms", lambda e: _f(e.get("fwd_bwd_ms"))),
            ("  optimizer step, ms", lambda e: _f(e.get("optimizer_ms"))),
            ("  gradient zeroing, ms", lambda e: _f(e.get("zero_grad_ms"), "{:,.2f}")),
            ("tokens/s", lambda e: _f(e.get("tokens_per_s"), "{:,.0f}")),
            ("tokens/s, fwd+bwd only", lambda e: _f(e.get("tokens_per_s_fwd_bwd"), "{:,.0f}")),
            ("TFLOP/s (docs/model.md §10 FLOPs)", lambda e: _f(e.get("tflops"))),
            ("MFU vs 989.4 TFLOP/s", lambda e: _pct(e.get("mfu_peak"))),
            ("MFU vs measured matmul ceiling", lambda e: _pct(e.get("mfu_ceiling"))),
            ("peak memory allocated, GiB", lambda e: _f(e.get("peak_memory_gib"))),
            ("first iteration (compile + autotune), s", lambda e: _f(e.get("first_iteration_s"))),
            ("lm loss at step 0", lambda e: _f(e.get("loss_step0"), "{:.5f}")),
            ("lm loss after the timed steps", lambda e: _f(e.get("loss_last"), "{:.5f}")),
            ("timed iterations", lambda e: _f(e.get("timed_iterations"), "{}")
             + (" (cut short)" if e.get("truncated") else ""))]
    lines = ["| | " + " | ".join(ENGINE_TITLES[n] for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(fn(eng[n]) for n in names) + " |")
    rat = results.get("ratios") or {}
    for peer in ("hf", "mc"):
        if peer in rat:
            r = rat[peer]
            lines.append(f"| **ours / {ENGINE_TITLES[peer]}** | iteration time "
                         f"{_f(r.get('iteration_time'), '{:.2f}')}x, tokens/s "
                         f"{_f(r.get('tokens_per_s'), '{:.2f}')}x, peak memory "
                         f"{_f(r.get('peak_memory'), '{:.2f}')}x; step-0 loss differs by "
                         f"{_f(r.get('loss_step0_abs_diff'), '{:.1e}')}" + " |" * len(names))
    return lines


def breakdown_table(bd: dict) -> list[str]:
    red, full = bd["reduced"], bd["full"]
    lines = [f"| kind | fwd+bwd per instance, ms | x (reduced) | ms (reduced) | "
             f"x ({full['layers']['gdn'] + full['layers']['attention']} layers) | "
             f"ms (full, per micro-batch) | share (full) |", "|---|---|---|---|---|---|---|"]
    for r in bd["rows"]:
        lines.append(f"| {r['kind']} | {_f(r['per_instance_ms'], '{:.2f}')} | "
                     f"{r['count_reduced']} | {_f(r['reduced_ms'], '{:.1f}')} | "
                     f"{r['count_full']} | {_f(r['full_ms'], '{:.1f}')} | "
                     f"{_pct(r.get('full_share'))} |")
    if any((r.get("per_instance_ms") or 0) < 0 for r in bd["rows"]):
        lines += ["", "Rows marked negative are residuals (a layer timed whole, minus its mixer and "
                  "MLP timed alone, or the model minus its layers): the parts timed alone took "
                  "longer than inside the whole (separate launches, cache and clock effects). "
                  "The extrapolation uses the whole-layer times, not these residuals."]
    lines += ["", f"Measured (reduced, {red['layers']['gdn']} GDN + {red['layers']['attention']} "
              f"attention layers): fwd+bwd {red['fwd_bwd_ms']:.1f} ms; t_G = "
              f"{red['t_gdn_layer_ms']:.2f} ms, t_A = {red['t_attention_layer_ms']:.2f} ms per "
              f"layer (isolated); t_rest = fwd+bwd - n_G t_G - n_A t_A = {red['t_rest_ms']:.1f} ms "
              f"(isolated embedding + head + loss: {_f(red['t_rest_isolated_ms'], '{:.1f}')} ms).",
              "",
              f"**Full model (docs/design.md §9)**: t_full = t_rest + {full['layers']['gdn']} t_G + "
              f"{full['layers']['attention']} t_A = {full['fwd_bwd_ms']:.1f} ms per micro-batch; "
              f"optimizer step (scaled to {_count(full['parameters'])} parameters) "
              f"{full['optimizer_ms']:.1f} ms, {full['optimizer_amortized_ms']:.1f} ms amortized "
              f"over {full['micro_batches']} micro-batches; iteration "
              f"{full['iteration_ms']:.0f} ms -> {full['tokens_per_s']:,.0f} tokens/s, "
              f"{full['tflops']:.1f} TFLOP/s ({full['flops_per_token'] / 1e9:.1f} GFLOP/token), "
              f"MFU {_pct(full['mfu_peak'])} of 989.4 TFLOP/s, {_pct(full['mfu_ceiling'])} of the "
              f"measured ceiling."]
    return lines


def markdown(results: dict) -> str:
    """The results page (``--output-md``)."""
    env, spec, model, peaks = (results.get(k, {}) for k in ("environment", "spec", "model", "peaks"))
    versions = ", ".join(f"{k} {env.get(k)}" for k in (
        "torch", "triton", "fla-core", "transformers", "megatron-core", "python") if env.get(k))
    ceiling = peaks.get("ceiling") or {}
    widths = "smoke shapes" if spec.get("smoke") else "7B widths"
    clock = "host clock" if spec.get("smoke") else "CUDA events"
    out = ["# Training throughput (generated by `tools/benchmark.py`; do not edit)", "",
           f"- **{env.get('device', '?')}**, {env.get('date', '?')}; {versions}",
           f"- model: {widths} (d {model.get('hidden_size')}, FFN {model.get('ffn_hidden_size')}, "
           f"vocabulary {model.get('vocab_size')}), {spec.get('num_layers')} layers "
           f"(`{model.get('pattern')}`), sequence {spec.get('seq_length')}, micro-batch "
           f"{spec.get('micro_batch_size')}, {spec.get('dtype')}; "
           f"{_count(model.get('parameters_reduced'))} parameters "
           f"({_count(model.get('parameters_full'))} at 32 layers); AdamW lr "
           f"{spec.get('lr')}, betas ({spec.get('adam_beta1')}, {spec.get('adam_beta2')}), "
           f"weight decay {spec.get('weight_decay')}, clip {spec.get('clip_grad')}; the same "
           f"random tokens and (where loaded) the same weights for every engine",
           f"- FLOPs per token (docs/model.md §10, fwd+bwd): {model.get('flops_per_token_reduced', 0) / 1e9:.2f} "
           f"GFLOP at {spec.get('num_layers')} layers, {model.get('flops_per_token_full', 0) / 1e9:.2f} "
           f"GFLOP at 32; peaks: nominal {peaks.get('nominal_tflops')} TFLOP/s (H100/H200 dense "
           f"bf16), measured {_f(ceiling.get('tflops'))} TFLOP/s ({ceiling.get('n', '?')}^3 "
           f"{ceiling.get('dtype', '')} matmul, this run)",
           f"- {spec.get('warmup')} warm-up iterations (the first compiles and autotunes; later "
           f"engines reuse what earlier ones tuned), median of {spec.get('iters')} timed "
           f"iterations ({clock}); run took "
           f"{_f(results.get('elapsed_s'), '{:.0f}')} s", ""]
    out += engine_table(results)
    failed = [(n, e) for n, e in results.get("engines", {}).items() if e.get("status") != "ok"]
    foot = [f"- {ENGINE_TITLES[n]}: **{e.get('status')}**: {e.get('reason', '')}"
            for n, e in failed]
    if mc_footnote(results):
        foot.append(f"- {mc_footnote(results)}")
    if foot:
        out += [""] + foot
    if results.get("breakdown"):
        out += ["", "## Where the time goes (ours, fwd+bwd of each module kind in isolation)", ""]
        out += breakdown_table(results["breakdown"])
    mc = results.get("mc_stack")
    if mc:
        out += ["", "## megatron-core 0.16's own GDN hybrid stack without Transformer Engine", ""]
        out += [f"- {f['step']}: `{f['result'][:400]}`" for f in mc.get("te_only_findings", [])]
        out.append(f"- run instead: {mc.get('assembled')}")
        if mc.get("weights"):
            out.append(f"- weights: {mc['weights']}")
        out.append("- its step-0 loss differs from ours by design, not by a loading error: "
                   "megatron-core 0.16's GatedDeltaNet uses beta = sigmoid (Olmo Hybrid: 2 x "
                   "sigmoid), an out_norm with eps 1e-6 that rounds before the gate, and "
                   "A_log.exp() in bf16 (docs/model.md §7, differences 1-3); the same weights "
                   "give a slightly different model, which does not change its speed")
    out += details(results)
    if results.get("notes"):
        out += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(out) + "\n"


def details(results: dict) -> list[str]:
    """Kernels each engine ran, fla's autotuning and the Hopper self-check, compactly."""
    out = []
    hf = results.get("engines", {}).get("hf", {})
    if hf.get("kernel_bindings"):
        short = "transformers.models.olmo_hybrid.modeling_olmo_hybrid."
        out.append("- HF transformers GDN kernels: " + ", ".join(
            f"`{k}` -> {v.replace(short, 'transformers:')}"
            for k, v in hf["kernel_bindings"].items())
            + f"; attention `{hf.get('attn_implementation')}`; precision {hf.get('precision')}")
    mc = (results.get("mc_stack") or {}).get("kernel_bindings")
    if mc:
        out.append("- megatron-core GDN kernels: " + ", ".join(f"`{k}` -> {v}" for k, v in mc.items()))
    tune = (results.get("autotune") or {}).get("summary")
    if tune:
        out.append(f"- fla autotuners holding results after the run: {tune['kernels']} kernels, "
                   f"{tune['keys']} keys, {tune['candidate_configs']} candidate configs in all "
                   f"({tune['l2norm_candidate_configs']} of them for l2norm); keys tuned in this "
                   f"process compiled every candidate, keys from Triton's disk cache none")
    check = results.get("hopper_selfcheck")
    if check:
        worst = {dt: max(e.values()) for dt, e in check.get("errors", {}).items()}
        out.append(f"- fla Hopper self-check: passed {check.get('passed')}, guard lifted "
                   f"{check.get('guard_lifted')}, worst relative error " + ", ".join(
                       f"{dt} {v:.1e}" for dt, v in worst.items())
                   + f" (Triton {check.get('triton')}, {check.get('seconds')} s)")
    for name, prof in (results.get("profiles") or {}).items():
        top = ", ".join(f"{p['name'][:60]} {p['self_ms']:.1f} ms ({100 * p['share']:.0f}%)"
                        for p in prof[:6])
        out.append(f"- top kernels, {ENGINE_TITLES.get(name, name)} (one profiled iteration): {top}")
    return (["", "## Run details", ""] + out) if out else []


def write_markdown(results: dict, path: str | None) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(markdown(results))


def mc_footnote(results: dict) -> str | None:
    """Why the megatron-core column is a local-spec assembly (the first blocking error)."""
    findings = (results.get("mc_stack") or {}).get("te_only_findings") or []
    blocked = [f for f in findings if not f["result"].startswith(("OK", "spec built"))]
    if not findings:
        return None
    if not blocked:
        return "megatron-core's own GDN hybrid spec built here (Transformer Engine present)"
    return (f"megatron-core's own GDN hybrid spec cannot be built without Transformer Engine "
            f"(`{blocked[0]['result'][:200]}`; details below): its column is megatron-core's "
            f"GatedDeltaNet in a stack assembled from local specs")


def console_summary(results: dict) -> str:
    """The engine table and the full-model line, for the end of the log."""
    lines = engine_table(results)
    if mc_footnote(results):
        lines.append(mc_footnote(results))
    bd = results.get("breakdown")
    if bd:
        f = bd["full"]
        lines.append(f"full 32-layer estimate: {f['fwd_bwd_ms']:.1f} ms fwd+bwd per micro-batch, "
                     f"{f['tokens_per_s']:,.0f} tokens/s, MFU {_pct(f['mfu_peak'])} (989.4), "
                     f"{_pct(f['mfu_ceiling'])} (measured ceiling)")
    return "\n".join(lines)
