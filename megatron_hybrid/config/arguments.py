"""Command line of ``pretrain_olmo_hybrid.py`` (``docs/design.md`` §6; Megatron-LM's names).

The flags are generated from the typed ``config.training.TrainingConfig`` (``build_parser``).
``parse_args(argv)`` returns a frozen, validated ``TrainingConfig`` whose derived fields are
resolved and checked (data-parallel size, global batch size, LR schedule lengths);
``model_config_from_args`` turns the model flags (a ``--model-preset`` and/or the shape flags,
later flags overriding the preset) into an ``OlmoHybridConfig``.
"""
from __future__ import annotations

import argparse
import os

from megatron_hybrid.config import PRESETS, OlmoHybridConfig, preset_config
from megatron_hybrid.config.flags import HelpFormatter, add_flags
from megatron_hybrid.config.layout import pattern_from_attention_freq
from megatron_hybrid.config.training import GROUPS, TrainingConfig

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


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``pretrain_olmo_hybrid.py``: one group per ``GROUPS`` dataclass,
    one flag per field (``config.flags.add_flags``); ``--help`` shows every default."""
    p = argparse.ArgumentParser(
        prog="pretrain_olmo_hybrid.py",
        description="Pretrain Olmo Hybrid (Gated DeltaNet + attention) on megatron-core.",
        formatter_class=HelpFormatter, allow_abbrev=False)
    for title, cls in GROUPS:
        add_flags(p, title, cls)
    return p


def _check_positive(args, names) -> None:
    for name in names:
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def _world_size(world_size: int | None) -> int:
    """``world_size``, else the process group's, else ``$WORLD_SIZE`` (1 when unset)."""
    if world_size is not None:
        return world_size
    import torch.distributed as dist

    return (dist.get_world_size() if dist.is_available() and dist.is_initialized()
            else int(os.environ.get("WORLD_SIZE", "1")))


def _check_ranges(args) -> None:
    _check_positive(args, ["tensor_model_parallel_size", "pipeline_model_parallel_size",
                           "context_parallel_size", "micro_batch_size", "global_batch_size",
                           "seq_length", "train_iters", "log_interval", "eval_interval",
                           "save_interval", "exit_interval", "seed"])
    if args.fla_warmup_workers is not None and args.fla_warmup_workers < 0:
        raise ArgumentError(f"--fla-warmup-workers must be >= 0 (0 or 1: no warm-up), got "
                            f"{args.fla_warmup_workers}")


def _resolve_layout(args, world_size: int) -> None:
    """``world_size``, ``data_parallel_size``, ``global_batch_size``, ``num_microbatches``;
    ``--sequence-parallel`` off at TP 1."""
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


def _resolve_lr_schedule(args) -> None:
    """``lr_decay_iters`` (default ``--train-iters``) and ``lr_warmup_iters`` (from
    ``--lr-warmup-fraction`` when given)."""
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


def _resolve_data(args) -> None:
    """Data and tokenizer flags; ``tokenizer_type`` from the ``--tokenizer-model`` file name."""
    if args.data_path is None and not args.mock_data:
        raise ArgumentError("--data-path is required (or --mock-data for synthetic tokens)")
    if args.tokenizer_model is None and args.vocab_size is None:
        raise ArgumentError("--tokenizer-type/--tokenizer-model (or --vocab-size with "
                            "--mock-data) is required")
    if args.tokenizer_model is not None and args.tokenizer_type is None:
        args.tokenizer_type = ("SentencePieceTokenizer" if args.tokenizer_model.endswith(".model")
                               else "HuggingFaceTokenizer")


def _resolve_recompute_and_checkpoint(args) -> None:
    """Recompute defaults (uniform, 1 layer) and ``scheduler_policy``."""
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
    # how a resumed LR/WD schedule is reconciled (checkpoint.training_state.load_scheduler_state)
    args.scheduler_policy = ("flags" if args.override_opt_param_scheduler else "checkpoint"
                             if args.use_checkpoint_opt_param_scheduler else "check")


def _resolve_masking_and_reliability(args) -> None:
    """Document masking pair, the skip-step default (on with a preset), time limits."""
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


def validate_args(args: argparse.Namespace, world_size: int | None = None) -> TrainingConfig:
    """The frozen ``TrainingConfig`` of the parsed flags ``args`` (left unchanged), with the
    derived fields (``world_size``, ``data_parallel_size``, ``global_batch_size``,
    ``num_microbatches``, ``lr_decay_iters``, ``lr_warmup_iters``, ``scheduler_policy``, ...)
    resolved once, here, and the combination checked.

    ``world_size``: default the process group's, else ``$WORLD_SIZE``.
    Raises: ArgumentError naming the flags.
    """
    resolved = argparse.Namespace(**vars(args))  # the steps below fill in derived values
    _check_ranges(resolved)
    _resolve_layout(resolved, _world_size(world_size))
    _resolve_lr_schedule(resolved)
    _resolve_data(resolved)
    _resolve_recompute_and_checkpoint(resolved)
    _resolve_masking_and_reliability(resolved)
    return TrainingConfig.from_values(vars(resolved))


def parse_args(argv: list[str] | None = None, world_size: int | None = None) -> TrainingConfig:
    """Parse and validate ``argv`` (default: ``sys.argv[1:]``) into a frozen ``TrainingConfig``.
    Exits with a usage message on unknown flags (argparse) and raises ArgumentError for invalid
    combinations."""
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
