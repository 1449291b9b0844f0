"""tools/tune_parallelism.py: the 7B on 64 x 80 GiB GPUs, refusals with reasons, the H200
reference run, accounting identities, flags that the 7B launch script accepts, bad input."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from megatron_hybrid.config import preset_config
from megatron_hybrid.training.flops import training_flops_per_token
from megatron_hybrid.tuner import cli
from megatron_hybrid.tuner.measure import measure_command, parse_log, summarise, summary_table
from megatron_hybrid.tuner.memory import GIB, plan_memory
from megatron_hybrid.tuner.params import static_memory
from megatron_hybrid.tuner.plans import Job, Pins, Plan
from megatron_hybrid.tuner.report import script_invocation
from megatron_hybrid.tuner.search import evaluate, search
from megatron_hybrid.tuner.throughput import Hardware, layer_flops

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEVEN_B = ["--model-preset", "olmo_hybrid_7b", "--num-gpus", "64", "--gpu-memory-gb", "80",
           "--seq-length", "4096", "--global-batch-size", "1024"]
JOB_7B = Job(num_gpus=64, seq_length=4096, global_batch_size=1024, gpus_per_node=8)


@pytest.fixture(scope="module")
def ranked_7b():
    return search(preset_config("olmo_hybrid_7b"), JOB_7B, Pins(), Hardware(memory_gib=80))


def test_7b_top_plan_fits_and_is_explained(capsys):
    assert cli.main(SEVEN_B + ["--explain"]) == 0
    out = capsys.readouterr().out
    assert "Plan #1:" in out and "status: ok" in out
    peak = [line for line in out.splitlines() if line.strip().startswith("PEAK")][0]
    assert max(float(x) for x in peak.split()[1:]) <= 72.0          # 80 GiB minus 10 % headroom
    for needle in ("gdn: A = (I+KK^T)^-1 per chunk", "attn: SDPA output", "gdn core",
                   "bubble", "tokens/s/GPU, MFU", "bash examples/train_olmo_hybrid_7b.sh",
                   "CP 1 only: sequences below 16384 tokens"):
        assert needle in out, needle


def test_7b_ranking_is_sane(ranked_7b):
    best = ranked_7b[0]
    assert best.fits and best.plan.tp in (1, 2) and best.plan.dp * best.plan.tp * best.plan.pp == 64
    fitting = [ev.throughput.tokens_per_s_per_gpu for ev in ranked_7b if ev.fits]
    assert fitting == sorted(fitting, reverse=True)
    # no recompute, no pipeline: the 7B's static state and activations exceed 72 GiB at TP 1
    plain = [ev for ev in ranked_7b if (ev.plan.tp, ev.plan.pp, ev.plan.mbs, ev.plan.recompute,
                                        ev.plan.distributed_optimizer) == (1, 1, 1, "none", True)]
    assert plain and not plain[0].fits and plain[0].status.startswith("does not fit")
    # full recompute keeps far less than none on the same layout
    by = {(ev.plan.recompute, ev.plan.tp, ev.plan.pp, ev.plan.mbs, ev.plan.distributed_optimizer,
           ev.plan.stage_sizes): ev for ev in ranked_7b if ev.memory}
    assert by[("full", 1, 1, 1, True, (32,))].peak < 0.7 * by[("none", 1, 1, 1, True, (32,))].peak


def test_7b_tp4_is_refused_with_the_reason(capsys):
    assert cli.main(SEVEN_B + ["--tensor-model-parallel-size", "4"]) == 1
    out = capsys.readouterr().out
    assert "refused [a]" in out
    assert ("--tensor-model-parallel-size 4 does not divide --num-attention-heads = 30" in out)
    assert "--ffn-hidden-size = 11008 allows TP 1, 2, 4, 8" in out
    assert "allowed values for this model: [1, 2]" in out


def test_h200_reference_run_is_reproduced():
    """olmo_hybrid_1b, vocabulary 8192, sequence 4096, micro-batch 4, bf16, distributed optimizer,
    no recompute, one H200 (tools/gpu_check.py tuner, 2026-11-29): 57.4 GiB peak allocated,
    46,800 tokens/s/GPU, MFU 35.3 %."""
    cfg = preset_config("olmo_hybrid_1b", vocab_size=8192)
    job = Job(num_gpus=1, seq_length=4096, global_batch_size=4, gpus_per_node=1)
    ev = evaluate(cfg, Plan(1, 1, 1, 1, 4, 1, "none", True, (16,)), job, Hardware(memory_gib=141))
    assert abs(ev.peak / GIB - 57.4) / 57.4 < 0.03, ev.peak / GIB
    assert abs(ev.throughput.tokens_per_s_per_gpu - 46800) / 46800 < 0.02
    assert abs(100 * ev.throughput.mfu - 35.3) < 0.5
    mem = ev.memory[0]
    assert mem.static.total == pytest.approx(18 * mem.static.num_params, rel=1e-3)


def test_flops_by_layer_kind_sum_to_spec_section_10():
    for name in ("olmo_hybrid_7b", "olmo_hybrid_1b", "tiny"):
        cfg = preset_config(name)
        for S in (4096, 8192):
            fl = layer_flops(cfg, S)
            total = fl["head"]["matmul"] + sum(sum(fl[t].values()) for t in cfg.layout.layer_types)
            assert total == pytest.approx(training_flops_per_token(cfg, S), rel=1e-12)


@pytest.mark.parametrize("tp,dp,spec_gb", [(1, 8, 55.7), (2, 4, 33.4)])
def test_static_memory_matches_spec_section_10(tp, dp, spec_gb):
    """N/(TP*PP) * (6 + 12/DP) bytes per GPU with bf16 params, fp32 grads and Adam."""
    s = static_memory(preset_config("olmo_hybrid_7b"), tp, (32,), 0, dp, 0)
    assert s.total / 1e9 == pytest.approx(spec_gb, rel=0.005)


def test_pipeline_in_flight_micro_batches_and_uneven_stages():
    cfg = preset_config("olmo_hybrid_7b")
    plan = Plan(1, 4, 16, 1, 1, 64, "none", True, (7, 8, 9, 8))
    mem = plan_memory(cfg, plan, JOB_7B)
    assert [m.in_flight for m in mem] == [4, 3, 2, 1]
    assert [sum(m.layers.values()) for m in mem] == [7, 8, 9, 8]
    assert mem[0].head == 0 and mem[-1].head > 0
    assert mem[0].static.params > mem[1].static.params       # the embedding
    assert plan.pattern(cfg).count("|") == 3


def dry_run_7b_script(cfg, plan, job):
    """``examples/train_olmo_hybrid_7b.sh --dry-run`` with the tuner's environment and trailing
    flags for ``plan`` (no data or tokenizer: dolma2's ids); asserts it succeeds, returns the run."""
    env, trailing = script_invocation(cfg, plan, job)
    full = dict(os.environ, PYTHONWARNINGS="ignore", **env)
    full.pop("DATA_PATH", None)
    full.pop("TOKENIZER_MODEL", None)
    run = subprocess.run(["bash", "examples/train_olmo_hybrid_7b.sh", "--dry-run", *trailing],
                         cwd=REPO, env=full, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return run


@pytest.mark.slow
def test_launch_flags_pass_the_7b_scripts_dry_run(ranked_7b):
    best = ranked_7b[0]
    run = dry_run_7b_script(preset_config("olmo_hybrid_7b"), best.plan, JOB_7B)
    p = best.plan
    assert (f"dry run OK: 64 ranks = TP {p.tp} x PP {p.pp} x CP 1 x DP {p.dp}; layers per stage "
            f"{list(p.stage_sizes)}") in run.stdout


def test_hf_config_gives_the_presets_answer(tmp_path, capsys):
    hf = {"model_type": "olmo_hybrid", "vocab_size": 100352, "hidden_size": 3840,
          "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 30,
          "num_key_value_heads": 30, "layer_types": ["full_attention" if i % 4 == 3 else
                                                     "linear_attention" for i in range(32)],
          "linear_num_key_heads": 30, "linear_num_value_heads": 30, "linear_key_head_dim": 96,
          "linear_value_head_dim": 192, "tie_word_embeddings": False,
          "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    args = SEVEN_B[2:] + ["--top", "1"]
    assert cli.main(["--hf-config", str(tmp_path)] + args) == 0
    from_hf = capsys.readouterr().out.splitlines()
    assert cli.main(SEVEN_B + ["--top", "1"]) == 0
    from_preset = capsys.readouterr().out.splitlines()
    row = [i for i, line in enumerate(from_preset) if line.lstrip().startswith("1 ")][0]
    assert from_hf[row] == from_preset[row]


@pytest.mark.parametrize("argv,message", [
    (["--model-preset", "olmo_7b", "--num-gpus", "8"], "--model-preset 'olmo_7b': expected one of"),
    (["--hf-config", "/nonexistent/config.json", "--num-gpus", "8"],
     "--hf-config /nonexistent/config.json: cannot read"),
    (["--model-preset", "tiny", "--num-gpus", "0"], "--num-gpus must be positive, got 0"),
    (["--model-preset", "tiny", "--num-gpus", "8", "--seq-length", "-4"],
     "--seq-length must be positive"),
    (["--model-preset", "tiny", "--num-gpus", "8", "--memory-headroom", "1.5"],
     "--memory-headroom must be in"),
    (["--model-preset", "tiny"], "--num-gpus is required"),
])
def test_bad_input_is_a_one_line_error(argv, message, capsys):
    assert cli.main(argv + ["--global-batch-size", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_unreadable_hf_config_names_the_file(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert cli.main(["--hf-config", str(bad), "--num-gpus", "8", "--global-batch-size", "8"]) == 2
    assert f"--hf-config {bad}: not valid JSON" in capsys.readouterr().err


def test_measure_command_and_log_parsing(tmp_path):
    cfg = preset_config("olmo_hybrid_1b", vocab_size=8192)
    job = Job(num_gpus=2, seq_length=4096, global_batch_size=8, gpus_per_node=2)
    plan = Plan(2, 1, 1, 1, 4, 2, "full", True, (16,))
    cmd = measure_command(cfg, plan, job, 6)
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2"
    for flag in ("--mock-data", "--sequence-parallel", "--use-distributed-optimizer", "--bf16"):
        assert flag in cmd
    assert cmd[cmd.index("--recompute-granularity") + 1] == "full"
    assert cmd[cmd.index("--vocab-size") + 1] == "8192"
    line = (" [2026-01-01 00:00:00] iteration {i:8d}/       6 | consumed samples: 8 | elapsed time "
            "per iteration (ms): 400.0 | throughput per GPU (TFLOP/s/GPU): 309.0 | tokens per "
            "second per GPU: {t} | MFU: 31.20% | learning rate: 1.0E-04 | lm loss: 9.1E+00 | "
            "mem-max-allocated-gib: {m} | number of skipped iterations:   0 |")
    text = "\n".join(line.format(i=i, t=t, m=m) for i, t, m in
                     [(1, 100.0, 60.1), (2, 40000.0, 65.2), (3, 41000.0, 65.2), (4, 41400.0, 65.2),
                      (5, 41500.0, 65.2), (6, 41300.0, 65.2)])
    got = summarise(parse_log(text))
    assert got == {"mem_gib": 65.2, "tokens_per_s": 41350.0,  # median after the first 2
                   "mem_kind": "mem-max-allocated-gib"}
    table = summary_table([{"plan": plan.label(), "seq_length": 4096, "vocab_size": 8192,
                            "last_stage_peak_gib": 66.0, "measured_mem_gib": 65.2,
                            "tokens_per_s_per_gpu": 41000.0, "measured_tokens_per_s": 41400.0}])
    assert "| +1.2% |" in table and "| -1.0% |" in table
