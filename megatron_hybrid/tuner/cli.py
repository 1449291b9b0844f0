"""Command line of ``tools/tune_parallelism.py`` (flag names follow Megatron-LM's).

Exit status: 0 when at least one plan fits, 1 when none does (the table says why), 2 for bad
input (one line on stderr: unknown preset, unreadable config.json, non-positive sizes, ...).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_hybrid.config import PRESETS, ConfigError, OlmoHybridConfig
from megatron_hybrid.tuner.plans import CP_MIN_SEQ_LENGTH, RECOMPUTE, Job, Pins
from megatron_hybrid.tuner.throughput import Efficiencies, Hardware

PROG = "tune_parallelism.py"


class InputError(ValueError):
    """Bad tuner input; the message is printed as one line."""


def _model_args(p: argparse.ArgumentParser) -> None:
    """The model's shape: a preset, an HF config.json or the shape flags of pretrain_olmo_hybrid.py."""
    g = p.add_argument_group("model (a preset, an HF config.json, or the shape flags)")
    g.add_argument("--model-preset", default=None, help=f"one of {sorted(PRESETS)}")
    g.add_argument("--hf-config", default=None, help="HF config.json (or its directory)")
    for name in ("--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads",
                 "--num-query-groups", "--kv-channels", "--linear-num-key-heads",
                 "--linear-num-value-heads", "--linear-key-head-dim", "--linear-value-head-dim",
                 "--linear-conv-kernel-dim", "--make-vocab-size-divisible-by"):
        g.add_argument(name, type=int, default=None)
    g.add_argument("--hybrid-layer-pattern", "--hybrid-override-pattern",
                   dest="hybrid_layer_pattern", default=None)
    g.add_argument("--linear-attention-freq", type=int, default=None)
    g.add_argument("--position-embedding-type", choices=["rope", "none"], default=None)
    g.add_argument("--vocab-size", type=int, default=None,
                   help="tokenizer vocabulary (default: the preset's / config's)")
    g.add_argument("--untie-embeddings-and-output-weights", dest="untie_embeddings",
                   action="store_true", default=None)
    g.add_argument("--tie-embeddings-and-output-weights", dest="untie_embeddings",
                   action="store_false")


def _job_args(p: argparse.ArgumentParser) -> None:
    """The job: GPUs, memory, sequence, batch, precision and DDP settings."""
    g = p.add_argument_group("job")
    g.add_argument("--num-gpus", type=int, required=False, help="GPUs in the job")
    g.add_argument("--gpus-per-node", type=int, default=None, help="default min(8, --num-gpus)")
    g.add_argument("--gpu-memory-gb", type=float, default=80.0,
                   help="device memory in GiB as nvidia-smi shows it / 1024 (80: H100, 141: H200)")
    g.add_argument("--memory-headroom", type=float, default=0.10,
                   help="fraction of the memory kept free (CUDA context, NCCL, fragmentation)")
    g.add_argument("--seq-length", type=int, default=4096)
    g.add_argument("--global-batch-size", type=int, default=None, help="sequences per iteration")
    prec = g.add_mutually_exclusive_group()
    prec.add_argument("--bf16", dest="bf16", action="store_true", default=True,
                      help="bf16 params and compute (default)")
    prec.add_argument("--fp32", dest="bf16", action="store_false")
    g.add_argument("--z-loss-weight", type=float, default=1e-5)
    g.add_argument("--overlap-grad-reduce", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--overlap-param-gather", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--ddp-bucket-size", type=int, default=None)


def _hardware_args(p: argparse.ArgumentParser) -> None:
    """Peak FLOP/s, bandwidths and the efficiencies of the throughput model."""
    g = p.add_argument_group("hardware and efficiencies (defaults: H200 measurements)")
    g.add_argument("--peak-tflops", type=float, default=None)
    g.add_argument("--hbm-bandwidth-tbps", type=float, default=None)
    g.add_argument("--nvlink-bandwidth-gbps", type=float, default=None,
                   help="GB/s per GPU per direction (default 450)")
    g.add_argument("--network-bandwidth-gbps", type=float, default=None,
                   help="GB/s per GPU between nodes (default 50 = 400 Gb/s)")
    for name, help_ in (("--matmul-efficiency", "fraction of peak (default 0.781)"),
                        ("--attention-efficiency", "fraction of peak (default: measured by S)"),
                        ("--gdn-efficiency", "fraction of peak (default 0.034)"),
                        ("--elementwise-traffic", "HBM bytes per saved activation byte (14.0)"),
                        ("--comm-efficiency", "fraction of link bandwidth (0.8)")):
        g.add_argument(name, type=float, default=None, help=help_)


def _pin_args(p: argparse.ArgumentParser) -> None:
    """Megatron flags that pin a searched dimension."""
    g = p.add_argument_group("pin a dimension (default: searched)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=None)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=None)
    g.add_argument("--context-parallel-size", type=int, default=None,
                   help="head-parallel CP (default: searched for sequences >= "
                        f"{CP_MIN_SEQ_LENGTH} tokens, or when no CP 1 plan fits)")
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--max-micro-batch-size", type=int, default=16)
    g.add_argument("--recompute-granularity", choices=list(RECOMPUTE), default=None)
    g.add_argument("--use-distributed-optimizer", dest="distributed_optimizer",
                   action=argparse.BooleanOptionalAction, default=None)


def _output_args(p: argparse.ArgumentParser) -> None:
    """The table, the breakdown and the JSON file."""
    g = p.add_argument_group("output")
    g.add_argument("--top", type=int, default=10, help="rows of the table")
    g.add_argument("--show-all", action="store_true", help="every plan, with its status")
    g.add_argument("--explain", type=int, nargs="?", const=1, default=None, metavar="RANK",
                   help="print the breakdown of the plan ranked RANK (default 1)")
    g.add_argument("--json", default=None, metavar="FILE", help="write every plan as JSON")


def _measure_args(p: argparse.ArgumentParser) -> None:
    """Running the best plans on this machine (``--measure``)."""
    g = p.add_argument_group("measure (GPU machine)")
    g.add_argument("--measure", action="store_true",
                   help="run the top-k plans with --mock-data and compare")
    g.add_argument("--measure-top-k", type=int, default=3)
    g.add_argument("--measure-iters", type=int, default=6)
    g.add_argument("--measure-global-batch-size", type=int, default=None,
                   help="global batch of the measured runs (default: --global-batch-size)")
    g.add_argument("--measure-output", default=None, metavar="FILE.jsonl",
                   help="append one JSON record per measured plan")
    g.add_argument("--measure-dir", default="runs/tune_parallelism", help="logs of the runs")
    g.add_argument("--measure-timeout", type=int, default=900, help="seconds per run")
    g.add_argument("--measure-dry-run", action="store_true", help="print the commands only")
    g.add_argument("--measure-report", default=None, metavar="FILE.jsonl",
                   help="only print the predicted-vs-measured table of a --measure-output file")


def build_parser() -> argparse.ArgumentParser:
    """The tuner's argparse parser, one argument group per helper (``_model_args`` ...)."""
    p = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False,
        description="Rank TP/PP/CP/DP/micro-batch/recompute plans for Olmo Hybrid training by "
                    "predicted memory per GPU and tokens/s/GPU (GDN-aware), and optionally "
                    "measure the best ones.")
    for add in (_model_args, _job_args, _hardware_args, _pin_args, _output_args, _measure_args):
        add(p)
    return p


def _check_positive(args, names) -> None:
    for name in names:
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {v:g}")


def _read_hf_config(path: str) -> dict:
    cfg = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(cfg) as f:
            return json.load(f)
    except OSError as err:
        raise InputError(f"--hf-config {cfg}: cannot read ({err.strerror})") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"--hf-config {cfg}: not valid JSON ({err})") from err


def model_config(args) -> OlmoHybridConfig:
    """OlmoHybridConfig from ``--hf-config``, or ``--model-preset`` and/or the shape flags
    (the trainer's ``model_config_from_args`` rules: flags override the preset)."""
    if args.hf_config:
        if args.model_preset:
            raise InputError("give --model-preset or --hf-config, not both")
        from megatron_hybrid.config.arguments import MODEL_FIELDS

        shape = [f"--{f.replace('_', '-')}" for f in MODEL_FIELDS
                 if f != "vocab_size" and getattr(args, f, None) is not None]
        if shape:
            raise InputError(f"{', '.join(shape)} cannot be combined with --hf-config (the config "
                             "fixes the shape; edit it, or use --model-preset with shape flags)")
        from megatron_hybrid.hf.mapping import config_from_hf

        hf = _read_hf_config(args.hf_config)
        if args.vocab_size:
            hf = dict(hf, vocab_size=args.vocab_size)
        try:
            return config_from_hf(hf, args.make_vocab_size_divisible_by or 128)
        except KeyError as err:
            raise InputError(f"--hf-config {args.hf_config}: missing key {err}") from err
    if args.model_preset is not None and args.model_preset not in PRESETS:
        raise InputError(f"--model-preset {args.model_preset!r}: expected one of {sorted(PRESETS)}")
    from megatron_hybrid.config.arguments import MODEL_FIELDS, model_config_from_args

    ns = argparse.Namespace(**{f: getattr(args, f, None) for f in MODEL_FIELDS})
    ns.model_preset, ns.linear_attention_freq = args.model_preset, args.linear_attention_freq
    ns.linear_allow_neg_eigval, ns.untie_embeddings = None, args.untie_embeddings
    vocab = args.vocab_size or PRESETS.get(args.model_preset or "", {}).get("vocab_size")
    if vocab is None:
        raise InputError("without --model-preset, --vocab-size is required")
    return model_config_from_args(ns, vocab)


def job_from_args(args) -> Job:
    """The Job of the flags (GPUs, sequence, batch, precision, DDP settings)."""
    if args.num_gpus is None:
        raise InputError("--num-gpus is required")
    if args.global_batch_size is None:
        raise InputError("--global-batch-size is required")
    return Job(num_gpus=args.num_gpus, seq_length=args.seq_length,
               global_batch_size=args.global_batch_size,
               gpus_per_node=args.gpus_per_node or min(8, args.num_gpus), bf16=args.bf16,
               z_loss=args.z_loss_weight > 0, overlap_grad_reduce=args.overlap_grad_reduce,
               overlap_param_gather=args.overlap_param_gather,
               ddp_bucket_size=args.ddp_bucket_size)


def hardware_from_args(args) -> Hardware:
    """Hardware with the flags' overrides."""
    kw = {"memory_gib": args.gpu_memory_gb, "headroom": args.memory_headroom}
    for flag, field in (("peak_tflops", "peak_tflops"), ("hbm_bandwidth_tbps", "hbm_tbps"),
                        ("nvlink_bandwidth_gbps", "nvlink_gbps"),
                        ("network_bandwidth_gbps", "network_gbps")):
        if getattr(args, flag) is not None:
            kw[field] = getattr(args, flag)
    return Hardware(**kw)


def efficiencies_from_args(args) -> Efficiencies:
    """Efficiencies with the flags' overrides."""
    kw = {}
    for flag, field in (("matmul_efficiency", "matmul"), ("attention_efficiency", "attention"),
                        ("gdn_efficiency", "gdn"), ("elementwise_traffic", "elementwise_traffic"),
                        ("comm_efficiency", "comm")):
        if getattr(args, flag) is not None:
            kw[field] = getattr(args, flag)
    return Efficiencies(**kw)


def pins_from_args(args) -> Pins:
    """The pinned dimensions."""
    return Pins(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                cp=args.context_parallel_size, mbs=args.micro_batch_size,
                recompute=args.recompute_granularity,
                distributed_optimizer=args.distributed_optimizer,
                max_mbs=args.max_micro_batch_size)


def validate(args) -> None:
    """Raise InputError for non-positive sizes and impossible fractions."""
    _check_positive(args, [
        "num_gpus", "gpus_per_node", "gpu_memory_gb", "seq_length", "global_batch_size",
        "vocab_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
        "context_parallel_size", "micro_batch_size", "max_micro_batch_size", "top",
        "peak_tflops", "hbm_bandwidth_tbps", "nvlink_bandwidth_gbps", "network_bandwidth_gbps",
        "matmul_efficiency", "attention_efficiency", "gdn_efficiency", "elementwise_traffic",
        "comm_efficiency", "measure_top_k", "measure_iters", "measure_global_batch_size",
        "ddp_bucket_size", "num_layers", "hidden_size", "ffn_hidden_size",
        "num_attention_heads", "explain"])
    if (args.gpus_per_node and args.num_gpus and args.num_gpus > args.gpus_per_node
            and args.num_gpus % args.gpus_per_node):
        raise InputError(f"--num-gpus {args.num_gpus} is not a multiple of --gpus-per-node "
                         f"{args.gpus_per_node} (the launch would use whole nodes only)")
    if not 0 <= args.memory_headroom < 1:
        raise InputError(f"--memory-headroom must be in [0, 1), got {args.memory_headroom:g}")
    if args.measure and args.measure_iters < 3:
        raise InputError("--measure-iters must be >= 3 (the first iterations are warm-up)")


def main(argv: list[str] | None = None) -> int:
    """Run the tuner; returns the exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    try:
        if args.measure_report:
            from megatron_hybrid.tuner.measure import load_records, summary_table

            print(summary_table(load_records(args.measure_report)))
            return 0
        validate(args)
        cfg = model_config(args)
        job, hw, eff, pins = (job_from_args(args), hardware_from_args(args),
                              efficiencies_from_args(args), pins_from_args(args))
    except (InputError, ConfigError, ValueError, OSError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    from megatron_hybrid.tuner import report
    from megatron_hybrid.tuner.search import search

    evals = search(cfg, job, pins, hw, eff)
    print(report.header(cfg, job, hw))
    print(report.cp_note(job, pins, evals.cps, evals.cp_fallback))
    print()
    print(report.table(evals, args.top, args.show_all))
    if args.json:
        from megatron_hybrid.tuner.measure import evaluation_record

        with open(args.json, "w") as f:
            json.dump([evaluation_record(cfg, ev, job) for ev in evals], f, indent=1)
    if args.explain is not None:
        if not 1 <= args.explain <= len(evals):
            print(f"{PROG}: error: --explain {args.explain}: ranks are 1..{len(evals)}",
                  file=sys.stderr)
            return 2
        print()
        print(report.explain(cfg, evals[args.explain - 1], job, args.explain))
    fitting = [ev for ev in evals if ev.fits]
    if args.measure:
        from megatron_hybrid.tuner.measure import measure_plans

        if not fitting:
            print(f"{PROG}: error: no plan fits; nothing to measure", file=sys.stderr)
            return 1
        return measure_plans(cfg, fitting[:args.measure_top_k], job, hw, eff, args)
    if not fitting:
        if all(ev.memory is None for ev in evals):
            print("\nNo plan is allowed: every layout is refused (reasons above).")
        else:
            print("\nNo plan fits in memory (see the status column).")
        return 1
    if args.explain is None:
        print()
        print(f"Best plan: {fitting[0].plan.label()}")
        print(report.launch_flags(cfg, fitting[0].plan, job))
    return 0
