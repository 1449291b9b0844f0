"""The tuner's context-parallel (CP, head-parallel all-to-all) model: activations per local token
against a hand count and against the tensors autograd saves at CP=2, the optimizer share over
DP x CP, the all-to-all volume, the refusals (heads, sequence), the search policy (long
sequences; short ones only when no CP=1 plan fits) and the launch flags.

Static bytes at CP=2 are checked against the real trainer in ``test_static_memory.py``.
"""
from __future__ import annotations

import pytest
import torch

from megatron_hybrid.config import preset_config
from megatron_hybrid.config.arguments import ArgumentError, parse_args
from megatron_hybrid.tuner import cli
from megatron_hybrid.tuner.measure import measure_command
from megatron_hybrid.tuner.memory import rank_memory
from megatron_hybrid.tuner.params import static_memory
from megatron_hybrid.tuner.plans import Job, Pins, Plan, refusal
from megatron_hybrid.tuner.report import parallel_flags, script_invocation
from megatron_hybrid.tuner.search import search
from megatron_hybrid.tuner.throughput import Efficiencies, Hardware, cp_layer_comm, estimate
from tests.dist import run_distributed
from tests.tuner.test_tuner import dry_run_7b_script

LONG_7B = ["--model-preset", "olmo_hybrid_7b", "--num-gpus", "8", "--gpu-memory-gb", "80",
           "--seq-length", "65536", "--global-batch-size", "64"]
JOB_LONG = Job(num_gpus=8, seq_length=65536, global_batch_size=64, gpus_per_node=8)
CFG_7B = preset_config("olmo_hybrid_7b")


def _plan(tp=1, pp=1, dp=4, cp=2, mbs=1, m=16, recompute="none", distopt=True, stages=(32,)):
    return Plan(tp, pp, dp, cp, mbs, m, recompute, distopt, stages)


def test_cp2_activations_of_the_7b_at_65536_equal_the_hand_count():
    """TP 1, no SP, bf16 (a = 2), D 3840, F 11008, 30 heads of 128, GDN 30 x (96, 192), padded
    vocabulary 100352; each CP rank keeps 65536 / 2 = 32768 tokens' worth."""
    a, D, F, V = 2, 3840, 11008, 100352
    norm = a * D + 4                                         # fla RMSNorm: x, fp32 rstd
    mlp = a * D + 2 * a * F + 3 * a * F
    kd, vd, hv = 30 * 96, 30 * 192, 30
    gdn = (norm + a * D + a * (2 * kd + 2 * vd + 2 * hv) + 12 * hv + 2 * a * kd + 8 * hv
           + a * vd + (4 + a) * hv + a * 64 * hv + (2 * a * vd + 4 * hv) + a * vd + norm + mlp)
    qd = 30 * 128
    attn = (a * D + a * 3 * qd                      # layer input; q|k|v after the all-to-all
            + a * 2 * qd + 8 + a * 2 * qd           # q/k norms (fla at TP 1); q, k after RoPE
            + 4 * a * 128 * 2                       # RoPE cos/sin tables of the whole sequence
            + 4 * 30 + a * qd + a * qd              # log-sum-exp, SDPA output, linear_proj input
            + norm + mlp + norm)
    assert (gdn, attn) == (237_828, 212_104)
    mem = rank_memory(CFG_7B, _plan(), JOB_LONG, 0)
    T = 32768
    assert mem.tokens == T
    assert mem.bytes_per_token == {"G": gdn, "*": attn}
    pad = a * (-(-(2 * kd + 2 * vd + 2 * hv) // 64) * 64) * D      # in_proj's padded weight copy
    assert mem.activations == T * (24 * gdn + 8 * attn) + 24 * pad
    assert mem.head == T * (norm + a * D + 4 * V + 40)              # logits and loss on S/CP
    assert mem.head_transient == T * 4 * V
    # CP 1 keeps the same per token, but the linear_proj input is a view and RoPE is per chunk
    one = rank_memory(CFG_7B, _plan(dp=8, cp=1), JOB_LONG, 0)
    assert one.bytes_per_token == {"G": gdn, "*": attn - a * qd - 4 * a * 128}
    assert one.tokens == 2 * T and one.head == 2 * mem.head


def _layer_worker(rank, cases, S=128, B=2):
    """(measured, predicted) saved bytes of one layer per (kind, recompute) at CP=2, tiny preset,
    bf16; fla's GDN kernels replaced by ``test_activations``' stand-ins (same saved tensors)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.spec_utils import build_module

    from megatron_hybrid.layers.layer_specs import attention_layer_spec, gdn_layer_spec
    from megatron_hybrid.parallel import initialize_distributed
    from megatron_hybrid.tuner.activations import layer_bytes, local_shapes
    from tests.tuner.test_activations import _patch_fla_stand_ins, _saved_bytes

    cp = 2
    initialize_distributed(1, 1, context_parallel_size=cp)
    _patch_fla_stand_ins()  # this forked process only
    cfg = preset_config("tiny")
    out = {}
    for kind, recompute in cases:
        kw = dict(bf16=True, context_parallel_size=cp)  # kernel backend auto: the stand-ins
        if recompute != "none":
            kw["recompute_granularity"] = recompute
        tcfg = cfg.to_transformer_config(1, 1, params_dtype=torch.bfloat16, **kw)
        spec = gdn_layer_spec() if kind == "G" else attention_layer_spec()
        layer = build_module(spec, config=tcfg, layer_number=1)
        x = torch.randn(S // cp, B, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        extra = {}
        if kind == "*":
            rope = RotaryEmbedding(cfg.kv_channels, rotary_percent=1.0,
                                   rotary_base=cfg.rotary_base)
            rope.cp_group = None                   # as model.py: RoPE of the whole sequence
            extra["rotary_pos_emb"] = rope(S)
        s = local_shapes(cfg, 1, False, bf16=True, cp=cp)
        out[(kind, recompute)] = (_saved_bytes(layer, x, **extra),
                                  layer_bytes(s, kind, recompute, B) * (S // cp) * B)
    return out


@pytest.mark.distributed
def test_cp2_saved_bytes_per_layer_match_the_model():
    """Each layer kind at CP=2 on 2 gloo ranks: what autograd keeps equals the model (the fp32
    copies of the norm weights, not per token, are left out). Without the CP terms the attention
    layer would be 4 % off (linear_proj's input is a copy, RoPE spans the whole sequence)."""
    cases = [("*", "none"), ("*", "selective"), ("G", "none")]
    for result in run_distributed(_layer_worker, 2, cases):
        for case, (measured, predicted) in result.items():
            assert abs(measured - predicted) / measured < 0.01, (case, measured, predicted)


def test_optimizer_share_at_dp2_cp2_equals_dp4():
    """megatron-core shards the buffers and the distributed optimizer over DP x CP; weights and
    gradients do not change with CP."""
    for overlap in (False, True):
        kw = dict(overlap_grad_reduce=overlap)
        for r in range(4):
            cp2 = static_memory(CFG_7B, 1, (32,), 0, 2, r, cp=2, **kw)
            dp4 = static_memory(CFG_7B, 1, (32,), 0, 4, r, **kw)
            assert cp2 == dp4
        dp2 = static_memory(CFG_7B, 1, (32,), 0, 2, 0, **kw)
        assert (cp2.params, cp2.grads) == (dp2.params, dp2.grads)
        assert cp2.exp_avg < 0.51 * dp2.exp_avg
    job = Job(num_gpus=4, seq_length=65536, global_batch_size=8)
    a = rank_memory(CFG_7B, _plan(dp=2, cp=2, m=4), job, 0).static
    b = rank_memory(CFG_7B, _plan(dp=4, cp=1, m=2), job, 0).static
    assert a == b


def test_cp_x_tp_not_dividing_the_heads_is_refused(capsys):
    assert cli.main(LONG_7B + ["--tensor-model-parallel-size", "2",
                               "--context-parallel-size", "2"]) == 1
    out = capsys.readouterr().out
    assert "CP 2 (--context-parallel-size pinned)" in out
    assert "refused [a]" in out
    assert ("--context-parallel-size 2 x --tensor-model-parallel-size 2 = 4 does not divide "
            "--num-attention-heads = 30") in out
    assert "at TP 2 the heads allow CP [1, 3, 5, 15]" in out            # the trainer's message
    assert "usable with 8 GPUs at sequence 65536: CP 1" in out          # the tuner's, for this job


@pytest.mark.parametrize("preset,tp,cp,seq", [("olmo_hybrid_7b", 1, 2, 65537),
                                               ("olmo_hybrid_1b", 2, 2, 8194)])
def test_sequence_not_divisible_is_refused_with_the_trainers_message(preset, tp, cp, seq):
    job = Job(num_gpus=8, seq_length=seq, global_batch_size=8)
    reason = refusal(preset_config(preset), _plan(tp=tp, dp=8 // (tp * cp), cp=cp,
                                                  stages=(preset_config(preset).num_layers,)), job)
    with pytest.raises(ArgumentError) as err:
        parse_args(["--model-preset", preset, "--seq-length", str(seq), "--mock-data",
                    "--train-iters", "1", "--lr", "1e-4",
                    "--tensor-model-parallel-size", str(tp), "--context-parallel-size", str(cp),
                    "--sequence-parallel", "--global-batch-size", "8"], world_size=8)
    assert reason == str(err.value)


def test_long_7b_at_tp1_needs_cp2():
    """7B, sequence 65536, 8 GPUs of 64 GiB, TP 1 (the long-context stage's layout): no CP 1
    plan fits (the fp32 logits and the loss's exp of 65536 tokens alone take 49 GiB at TP 1);
    CP 2 halves them."""
    ranked = search(CFG_7B, JOB_LONG, Pins(tp=1), Hardware(memory_gib=64))
    assert ranked.cps == (1, 2, 4, 8) and not ranked.cp_fallback
    best = ranked[0]
    assert best.fits and best.plan.cp == 2 and best.plan.tp == 1
    cp1 = [ev for ev in ranked if ev.plan.cp == 1]
    assert cp1 and all(ev.memory and not ev.fits for ev in cp1)
    assert {ev.reason.split(" (")[0] for ev in ranked if ev.plan.cp in (4, 8)} == {
        f"--context-parallel-size {c} x --tensor-model-parallel-size 1 = {c} does not divide "
        "--num-attention-heads = 30, --num-query-groups = 30, --linear-num-key-heads = 30, "
        "--linear-num-value-heads = 30" for c in (4, 8)}
    # unpinned, TP 2 at CP 1 fits too; CP 2 plans are ranked beside it
    free = search(CFG_7B, JOB_LONG, Pins(), Hardware(memory_gib=80))
    assert free[0].fits and any(ev.fits and ev.plan.cp == 2 for ev in free)


def test_long_7b_explain_shows_the_cp_terms(capsys):
    assert cli.main(LONG_7B + ["--tensor-model-parallel-size", "1", "--explain"]) == 0
    out = capsys.readouterr().out
    for needle in ("CP searched: 1, 2, 4, 8 (sequence >= 16384 tokens",
                   "Context parallel 2 (head-parallel all-to-all): each rank holds 32768 tokens",
                   "tokens per micro-batch (mbs x S/CP)", "CP 2: per local token",
                   "cp all-to-all",
                   "CP all-to-all", "over DP x CP = ", "--context-parallel-size 2"):
        assert needle in out, needle


def test_short_sequences_search_cp_only_when_no_cp1_plan_fits(capsys):
    """olmo_hybrid_1b, sequence 8192, 2 GPUs, TP 1 x PP 1: at 40 GiB DP 2 fits and CP is not
    searched; at 24 GiB only CP 2 (the logits of 4096 tokens per rank) fits."""
    cfg = preset_config("olmo_hybrid_1b")
    job = Job(num_gpus=2, seq_length=8192, global_batch_size=16, gpus_per_node=2)
    pins = Pins(tp=1, pp=1)
    roomy = search(cfg, job, pins, Hardware(memory_gib=40))
    assert roomy.cps == (1,) and not roomy.cp_fallback and roomy[0].fits
    assert {ev.plan.cp for ev in roomy} == {1}
    tight = search(cfg, job, pins, Hardware(memory_gib=24))
    assert tight.cps == (1, 2) and tight.cp_fallback
    assert tight[0].fits and tight[0].plan.cp == 2
    assert not any(ev.fits for ev in tight if ev.plan.cp == 1)
    argv = ["--model-preset", "olmo_hybrid_1b", "--num-gpus", "2", "--seq-length", "8192",
            "--global-batch-size", "16", "--tensor-model-parallel-size", "1",
            "--pipeline-model-parallel-size", "1"]
    assert cli.main(argv + ["--gpu-memory-gb", "24"]) == 0
    assert "CP searched: 1, 2 (no CP 1 plan fits" in capsys.readouterr().out
    assert cli.main(argv + ["--gpu-memory-gb", "40"]) == 0
    assert "CP 1 only: sequences below 16384 tokens" in capsys.readouterr().out


def test_cp_communication_and_compute():
    """All-to-all bytes per layer and micro-batch: (CP-1)/CP of T x a x (input + output width),
    forward and backward (+ the forward again under full recompute); compute per rank halves
    at CP 2; gradients are reduced over DP x CP."""
    hw, eff = Hardware(memory_gib=141), Efficiencies()
    T, a = 32768, 2
    for recompute, reps in (("none", 2), ("full", 3)):
        g = cp_layer_comm(CFG_7B, _plan(recompute=recompute), JOB_LONG, "G", hw, eff)
        assert g["bytes"] == reps * 0.5 * T * a * (17340 + 5760)   # in_proj out, GDN output
    plan = _plan()
    att = cp_layer_comm(CFG_7B, plan, JOB_LONG, "*", hw, eff)
    assert att["bytes"] == 2 * 0.5 * T * a * (3 * 3840 + 3840)
    t2 = estimate(CFG_7B, plan, JOB_LONG, hw, eff)
    g = cp_layer_comm(CFG_7B, plan, JOB_LONG, "G", hw, eff)
    assert t2.volumes["cp per rank"] == pytest.approx(16 * (24 * g["bytes"] + 8 * att["bytes"]))
    assert t2.stage_parts[0]["cp all-to-all"] == pytest.approx(24 * g["s"] + 8 * att["s"])
    t1 = estimate(CFG_7B, _plan(dp=8, cp=1, m=8), JOB_LONG, hw, eff)
    assert "cp all-to-all" not in t1.stage_parts[0]
    assert t2.stage_parts[0]["matmul"] == pytest.approx(t1.stage_parts[0]["matmul"] / 2)
    assert t2.stage_parts[0]["attention core"] == pytest.approx(
        t1.stage_parts[0]["attention core"] / 2)
    static = static_memory(CFG_7B, 1, (32,), 0, 4, 0, cp=2, overlap_grad_reduce=True)
    assert t2.volumes["dp per rank"] == pytest.approx(7 / 8 * (static.grads + static.params))
    # CP ranks on two nodes (TP x CP > GPUs per node): the network carries the all-to-alls
    split = cp_layer_comm(CFG_7B, plan, Job(8, 65536, 64, gpus_per_node=1), "G", hw, eff)
    assert split["s"] > 8 * g["s"]


def test_cp_launch_flags_and_measure_command():
    plan = _plan(pp=2, dp=2, cp=2, m=32, recompute="full", stages=(16, 16))
    flags = parallel_flags(CFG_7B, plan, JOB_LONG)
    assert flags[flags.index("--context-parallel-size") + 1] == "2"
    env, trailing = script_invocation(CFG_7B, plan, JOB_LONG)
    assert trailing == [] and env["CP"] == "2" and env["TP"] == "1"
    cmd = measure_command(CFG_7B, plan, JOB_LONG, 6)
    assert cmd[cmd.index("--nproc-per-node") + 1] == "8"        # TP x PP x CP x DP
    assert "--context-parallel-size" not in parallel_flags(CFG_7B, _plan(cp=1, dp=8), JOB_LONG)


@pytest.mark.slow
def test_cp_plan_passes_the_7b_scripts_dry_run():
    ranked = search(CFG_7B, JOB_LONG, Pins(tp=1, distributed_optimizer=True),
                    Hardware(memory_gib=80))
    best = ranked[0]
    assert best.plan.cp == 2
    run = dry_run_7b_script(CFG_7B, best.plan, JOB_LONG)
    p = best.plan
    assert f"dry run OK: 8 ranks = TP 1 x PP {p.pp} x CP {p.cp} x DP {p.dp};" in run.stdout
    assert "--context-parallel-size 2" in run.stdout
