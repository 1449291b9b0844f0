"""Snapshot of megatron_hybrid/config/arguments.py before the typed training configuration
(commit ebc5a79, verbatim below this docstring): tests/config/test_training_config.py compares
its parser with the generated one, flag by flag."""
from __future__ import annotations

import argparse
import os

from megatron_hybrid.config import PRESETS, OlmoHybridConfig, preset_config
from megatron_hybrid.config.layout import pattern_from_attention_freq

#: Model flags that map 1:1 onto OlmoHybridConfig fields (flag name with '-' -> field name).
MODEL_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "hybrid_layer_pattern", "linear_num_key_heads", "linear_num_value_heads",
    "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim",
    "position_embedding_type", "rotary_base", "norm_epsilon", "make_vocab_size_divisible_by",
    "init_method_std", "max_position_embeddings",
)


class ArgumentError(ValueError):
    """Invalid combination of flags; the message names the flags."""


def _bool_flag(parser, name: str, help: str) -> None:
    parser.add_argument(name, action="store_true", help=help)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``pretrain_olmo_hybrid.py``."""
    p = argparse.ArgumentParser(
        prog="pretrain_olmo_hybrid.py",
        description="Pretrain Olmo Hybrid (Gated DeltaNet + attention) on megatron-core.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)

    g = p.add_argument_group("model")
    g.add_argument("--model-preset", choices=sorted(PRESETS), default=None,
                   help="start from a preset (olmo_hybrid_7b, olmo_hybrid_1b, tiny); the shape flags "
                        "override it wherever they appear")
    for name, typ in (("--num-layers", int), ("--hidden-size", int), ("--ffn-hidden-size", int),
                      ("--num-attention-heads", int), ("--num-query-groups", int),
                      ("--kv-channels", int), ("--linear-num-key-heads", int),
                      ("--linear-num-value-heads", int), ("--linear-key-head-dim", int),
                      ("--linear-value-head-dim", int), ("--linear-conv-kernel-dim", int),
                      ("--rotary-base", float), ("--norm-epsilon", float),
                      ("--make-vocab-size-divisible-by", int), ("--init-method-std", float),
                      ("--max-position-embeddings", int)):
        g.add_argument(name, type=typ, default=None)
    g.add_argument("--hybrid-layer-pattern", "--hybrid-override-pattern",
                   dest="hybrid_layer_pattern", default=None,
                   help="layout string, e.g. 'G-G-G-*-' x8; '|' marks pipeline stages")
    g.add_argument("--linear-attention-freq", type=int, default=None,
                   help="shorthand: attention every N-th layer (Olmo: 4 -> G-G-G-*-)")
    g.add_argument("--group-query-attention", action="store_true",
                   help="accepted for Megatron compatibility; GQA follows --num-query-groups")
    g.add_argument("--linear-allow-neg-eigval", dest="linear_allow_neg_eigval",
                   action="store_true", default=None)
    g.add_argument("--no-linear-allow-neg-eigval", dest="linear_allow_neg_eigval",
                   action="store_false")
    g.add_argument("--position-embedding-type", choices=["rope", "none"], default=None)
    g.add_argument("--untie-embeddings-and-output-weights", dest="untie_embeddings",
                   action="store_true", default=None)
    g.add_argument("--tie-embeddings-and-output-weights", dest="untie_embeddings",
                   action="store_false")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=1)
    _bool_flag(g, "--sequence-parallel", "sequence parallelism (TP > 1)")
    _bool_flag(g, "--use-distributed-optimizer", "shard optimizer state over data parallel")
    _bool_flag(g, "--overlap-grad-reduce", "overlap DP gradient reduction with backward")
    _bool_flag(g, "--overlap-param-gather", "overlap the distributed optimizer's param gather")
    g.add_argument("--ddp-bucket-size", type=int, default=None, help="DDP bucket size (elements)")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None,
                   help="nccl with CUDA, gloo otherwise when not given")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)
    g.add_argument("--fla-warmup-workers", type=int, default=None,
                   help="GPU: processes per node that compile fla's Triton autotune candidates in "
                        "parallel before the first iteration (0 or 1: off; default: "
                        "$MEGATRON_HYBRID_FLA_WARMUP_WORKERS or min(8, CPUs - 1))")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="micro-batch size x data-parallel size when not given")
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--exit-interval", type=int, default=None,
                   help="exit after the iteration that is a multiple of this (saving first)")
    _bool_flag(g, "--bf16", "bf16 parameters and compute, fp32 main weights and gradients")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--z-loss-weight", type=float, default=1e-5,
                   help="weight of mean(logsumexp(logits)^2) (Olmo recipe 1e-5; 0 disables)")
    g.add_argument("--seed", type=int, default=1234)
    _bool_flag(g, "--dry-run", "check the flags, the model and the parallel layout for WORLD_SIZE "
               "ranks, print the resolved configuration and exit (no process group, no GPU)")
    _bool_flag(g, "--use-cpu-initialization",
               "initialize weights on the CPU (TP-invariant; always on without CUDA). Default on "
               "GPUs: initialize on the GPU (fast)")

    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, required=True)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="cosine")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="--train-iters when not given")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--weight-decay-grouping", choices=["olmo", "megatron"], default="olmo",
                   help="olmo: decay all but the embedding; megatron: no decay on 1-D params "
                        "and biases")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0, help="global grad-norm clip (0: off)")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="prefix, or weight prefix weight prefix ... (blend)")
    g.add_argument("--split", default="969,30,1", help="train,valid,test weights")
    _bool_flag(g, "--mock-data", "synthetic tokens (benchmarks); needs --vocab-size or a tokenizer")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="tokenizer vocabulary when no tokenizer is given (--mock-data)")
    g.add_argument("--tokenizer-type", choices=["HuggingFaceTokenizer", "SentencePieceTokenizer"],
                   default=None)
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--eod-token", default=None, help="override the end-of-document token")
    g.add_argument("--data-cache-path", default=None, help="where dataset index caches go")
    _bool_flag(g, "--reset-attention-mask",
               "intra-document masking: attention, GDN state and conv history do not cross the "
               "EOD-separated documents of a sample (needs --reset-position-ids)")
    _bool_flag(g, "--reset-position-ids", "RoPE positions restart at every document "
               "(with --reset-attention-mask)")
    _bool_flag(g, "--intra-document-masking", "both --reset-attention-mask and "
               "--reset-position-ids")
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per rank")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    _bool_flag(g, "--finetune", "load model weights only; iteration and optimizer start fresh")
    _bool_flag(g, "--no-load-optim", "do not load optimizer state")
    _bool_flag(g, "--no-load-rng", "do not load RNG state")
    _bool_flag(g, "--no-save-optim", "do not save optimizer state")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action=argparse.BooleanOptionalAction,
                   default=True,
                   help="save the distributed optimizer in megatron-core's fully_reshardable "
                        "format (reshards TP, PP and DP on load). --no-...: the faster "
                        "dp_reshardable format (reshards DP only; tools/reshard_checkpoint.py "
                        "changes its TP/PP). A resume reads the format the checkpoint was saved in")
    _bool_flag(g, "--override-opt-param-scheduler",
               "on resume, take the LR/WD schedule from the flags even where the checkpoint's "
               "differs (default: a difference is an error)")
    _bool_flag(g, "--use-checkpoint-opt-param-scheduler",
               "on resume, take the LR/WD schedule from the checkpoint, ignoring the flags")

    g = p.add_argument_group("reliability")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit after this many minutes of training (agreed by all ranks "
                        "at an iteration boundary); SIGTERM/SIGUSR1 do the same at any time")
    g.add_argument("--skip-step", action=argparse.BooleanOptionalAction, default=None,
                   help="Olmo's skip-step rule: skip the update when the loss or grad norm is "
                        "beyond --skip-step-sigma standard deviations of the previous "
                        "--skip-step-window steps (docs/model.md §8). Default: on with --model-preset, "
                        "off otherwise. Non-finite losses and grad norms are always skipped")
    g.add_argument("--skip-step-sigma", type=float, default=6.0)
    g.add_argument("--skip-step-window", type=int, default=128)
    g.add_argument("--skip-step-min-history", type=int, default=64,
                   help="steps seen before the rule is active")
    g.add_argument("--max-consecutive-skipped-steps", type=int, default=10,
                   help="stop with an error after this many skipped steps in a row (0: never)")
    _bool_flag(g, "--override-data-check",
               "on resume, accept a dataset, split, sequence length or seed that differs from "
               "the checkpoint's (default: an error listing each difference)")

    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--wandb-project", default=None)
    g.add_argument("--wandb-exp-name", default=None)
    g.add_argument("--wandb-save-dir", default=None)
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="per-GPU dense peak for MFU (when not given: 989.4 on H100/H200, "
                        "else MFU is not reported)")
    return p


def _check_positive(args, names) -> None:
    for name in names:
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def validate_args(args: argparse.Namespace, world_size: int | None = None) -> argparse.Namespace:
    """Resolve derived fields (``data_parallel_size``, ``global_batch_size``,
    ``num_microbatches``, ``lr_decay_iters``, ``lr_warmup_iters``, ``scheduler_policy``) and
    check the combination.

    Raises: ArgumentError naming the flags.
    """
    if world_size is None:
        import torch.distributed as dist

        world_size = (dist.get_world_size() if dist.is_available() and dist.is_initialized()
                      else int(os.environ.get("WORLD_SIZE", "1")))
    _check_positive(args, ["tensor_model_parallel_size", "pipeline_model_parallel_size",
                           "context_parallel_size", "micro_batch_size", "global_batch_size",
                           "seq_length", "train_iters", "log_interval", "eval_interval",
                           "save_interval", "exit_interval", "seed"])
    if getattr(args, "fla_warmup_workers", None) is not None and args.fla_warmup_workers < 0:
        raise ArgumentError(f"--fla-warmup-workers must be >= 0 (0 or 1: no warm-up), got "
                            f"{args.fla_warmup_workers}")
    mp = (args.tensor_model_parallel_size * args.pipeline_model_parallel_size
          * args.context_parallel_size)
    if world_size % mp:
        raise ArgumentError(
            f"world size {world_size} (the launcher's WORLD_SIZE; --dry-run reads it too) is not "
            f"divisible by --tensor-model-parallel-size "
            f"{args.tensor_model_parallel_size} x --pipeline-model-parallel-size "
            f"{args.pipeline_model_parallel_size} x --context-parallel-size "
            f"{args.context_parallel_size}")
    if args.seq_length % args.context_parallel_size:
        raise ArgumentError(f"--seq-length {args.seq_length} must be divisible by "
                            f"--context-parallel-size {args.context_parallel_size}")
    args.world_size = world_size
    args.data_parallel_size = world_size // mp
    mb_dp = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = mb_dp
    if args.global_batch_size % mb_dp:
        raise ArgumentError(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {args.data_parallel_size}")
    args.num_microbatches = args.global_batch_size // mb_dp
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        args.sequence_parallel = False
    if args.sequence_parallel and args.seq_length % (args.tensor_model_parallel_size
                                                     * args.context_parallel_size):
        raise ArgumentError(f"--sequence-parallel: --seq-length {args.seq_length} must be "
                            f"divisible by --tensor-model-parallel-size "
                            f"{args.tensor_model_parallel_size} x --context-parallel-size "
                            f"{args.context_parallel_size}")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_fraction is not None:
        if args.lr_warmup_iters:
            raise ArgumentError("give --lr-warmup-iters or --lr-warmup-fraction, not both")
        args.lr_warmup_iters = int(args.lr_warmup_fraction * args.lr_decay_iters)
    if args.lr_warmup_iters >= args.lr_decay_iters:
        raise ArgumentError(f"--lr-warmup-iters {args.lr_warmup_iters} must be < --lr-decay-iters "
                            f"{args.lr_decay_iters}")
    if not 0 <= args.min_lr <= args.lr:
        raise ArgumentError(f"--min-lr {args.min_lr} must be in [0, --lr {args.lr}]")
    if args.data_path is None and not args.mock_data:
        raise ArgumentError("--data-path is required (or --mock-data for synthetic tokens)")
    if args.tokenizer_model is None and args.vocab_size is None:
        raise ArgumentError("--tokenizer-type/--tokenizer-model (or --vocab-size with "
                            "--mock-data) is required")
    if args.tokenizer_model is not None and args.tokenizer_type is None:
        args.tokenizer_type = ("SentencePieceTokenizer" if args.tokenizer_model.endswith(".model")
                               else "HuggingFaceTokenizer")
    if args.save_interval is not None and args.save is None:
        raise ArgumentError("--save-interval needs --save DIR")
    if args.recompute_method is not None and args.recompute_granularity != "full":
        raise ArgumentError("--recompute-method needs --recompute-granularity full")
    if args.recompute_granularity == "full" and args.recompute_method is None:
        args.recompute_method = "uniform"
        if args.recompute_num_layers is None:
            args.recompute_num_layers = 1
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ArgumentError("give --override-opt-param-scheduler or "
                            "--use-checkpoint-opt-param-scheduler, not both")
    # how a resumed LR/WD schedule is reconciled (training.checkpoint.load_scheduler_state)
    args.scheduler_policy = ("flags" if args.override_opt_param_scheduler else "checkpoint"
                             if args.use_checkpoint_opt_param_scheduler else "check")
    if args.intra_document_masking:
        args.reset_attention_mask = args.reset_position_ids = True
    if args.reset_attention_mask != args.reset_position_ids:
        raise ArgumentError("--reset-attention-mask and --reset-position-ids go together here "
                            "(positions restart exactly where documents are masked; "
                            "--intra-document-masking sets both)")
    if args.skip_step is None:  # on in the Olmo presets (docs/model.md §8)
        args.skip_step = args.model_preset is not None
    if args.skip_step_sigma <= 0 or args.skip_step_window < 2 or args.skip_step_min_history < 2:
        raise ArgumentError("--skip-step-sigma must be > 0, --skip-step-window and "
                            "--skip-step-min-history >= 2")
    if args.max_consecutive_skipped_steps < 0:
        raise ArgumentError("--max-consecutive-skipped-steps must be >= 0")
    if args.exit_duration_in_mins is not None and args.exit_duration_in_mins <= 0:
        raise ArgumentError("--exit-duration-in-mins must be > 0")
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        raise ArgumentError("--overlap-param-gather needs --use-distributed-optimizer")
    return args


def parse_args(argv: list[str] | None = None, world_size: int | None = None):
    """Parse and validate ``argv`` (default: ``sys.argv[1:]``). Exits with a usage message on
    unknown flags (argparse) and raises ArgumentError for invalid combinations."""
    args = build_parser().parse_args(argv)
    return validate_args(args, world_size)


def model_config_from_args(args, vocab_size: int, eos_token_id: int | None = None,
                           pad_token_id: int | None = None) -> OlmoHybridConfig:
    """OlmoHybridConfig from ``--model-preset`` plus the shape flags (flags override the preset).

    ``vocab_size`` (the tokenizer's) replaces the preset's vocabulary; the padded size follows
    ``--make-vocab-size-divisible-by``. Raises ConfigError / ArgumentError naming the flag.
    """
    overrides = {f: getattr(args, f) for f in MODEL_FIELDS if getattr(args, f) is not None}
    if args.linear_attention_freq is not None:
        if args.hybrid_layer_pattern is not None:
            raise ArgumentError("give --hybrid-layer-pattern or --linear-attention-freq, not both")
        layers = overrides.get("num_layers") or PRESETS.get(args.model_preset or "", {}).get(
            "num_layers")
        if layers is None:
            raise ArgumentError("--linear-attention-freq needs --num-layers")
        overrides["hybrid_layer_pattern"] = pattern_from_attention_freq(
            layers, args.linear_attention_freq)
    elif "num_layers" in overrides and "hybrid_layer_pattern" not in overrides and \
            args.model_preset is not None:
        overrides["hybrid_layer_pattern"] = pattern_from_attention_freq(overrides["num_layers"], 4)
    if args.linear_allow_neg_eigval is not None:
        overrides["linear_allow_neg_eigval"] = args.linear_allow_neg_eigval
    if args.untie_embeddings is not None:
        overrides["untie_embeddings_and_output_weights"] = args.untie_embeddings
    overrides["vocab_size"] = vocab_size
    overrides["eos_token_id"] = eos_token_id
    overrides["pad_token_id"] = pad_token_id if pad_token_id is not None and pad_token_id >= 0 \
        else None
    if args.model_preset is not None:
        return preset_config(args.model_preset, **overrides)
    missing = [f"--{f.replace('_', '-')}" for f in
               ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads")
               if f not in overrides]
    if missing:
        raise ArgumentError(f"without --model-preset, {', '.join(missing)} are required")
    return OlmoHybridConfig(**overrides)
