"""The typed training configuration of ``pretrain_olmo_hybrid.py`` (``docs/design.md`` §6).

One frozen dataclass, ``TrainingConfig``, with flat fields (``cfg.seq_length``, as Megatron-LM's
``args``), assembled from one group dataclass per concern (model shape, parallelism, training,
optimizer, learning-rate schedule, data, checkpointing, reliability, logging) as OLMo-core and
torchtitan group theirs. Each field's help string is its documentation and its ``--help`` line;
the command-line flags are generated from these fields (``config.flags``), under Megatron-LM's
names. ``config.arguments.parse_args`` builds a validated ``TrainingConfig``; the derived fields
(``DerivedArgs``) are set there, once, and nothing changes the config during training (run-time
state lives in ``training.state.RunState``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from megatron_hybrid.config.flags import derived, flag, is_flag
from megatron_hybrid.config.model import PRESETS

_PRESET = "the preset's"
_SETTINGS = dict(frozen=True, kw_only=True)


@dataclass(**_SETTINGS)
class ModelArgs:
    """Model shape: a --model-preset and/or shape flags, which override the preset wherever they
    appear (names: megatron-core's; the HF olmo_hybrid config.json key in each help)."""

    model_preset: str | None = flag(
        None, "start from a preset (olmo_hybrid_7b, olmo_hybrid_1b, tiny; docs/design.md §6a); "
        "the shape flags override it wherever they appear", choices=sorted(PRESETS),
        default_text="none: the shape flags alone")
    num_layers: int | None = flag(
        None, "layers, each a mixer (GDN or attention) and its MLP (HF num_hidden_layers); "
        "overrides the preset (with a preset and no pattern: G-G-G-*- repeated)",
        default_text=_PRESET)
    hidden_size: int | None = flag(
        None, "model width d (HF hidden_size); overrides the preset", default_text=_PRESET)
    ffn_hidden_size: int | None = flag(
        None, "MLP intermediate width (HF intermediate_size); overrides the preset",
        default_text=_PRESET)
    num_attention_heads: int | None = flag(
        None, "query heads of the attention layers (HF num_attention_heads); overrides the "
        "preset", default_text=_PRESET)
    num_query_groups: int | None = flag(
        None, "key/value heads of the attention layers, GQA (HF num_key_value_heads); "
        "overrides the preset", default_text=_PRESET + "; without one --num-attention-heads")
    kv_channels: int | None = flag(
        None, "attention head dimension Dh (HF head_dim); overrides the preset",
        default_text=_PRESET + "; without one hidden / heads")
    hybrid_layer_pattern: str | None = flag(
        None, "layout string, e.g. 'G-G-G-*-' x8; '|' marks pipeline stages (HF layer_types)",
        flags=("--hybrid-layer-pattern", "--hybrid-override-pattern"),
        default_text=_PRESET + "; without one G-G-G-*- repeated")
    linear_attention_freq: int | None = flag(
        None, "shorthand: attention every N-th layer (Olmo: 4 -> G-G-G-*-)")
    group_query_attention: bool = flag(
        help="accepted for Megatron compatibility; GQA follows --num-query-groups",
        action="store_true")
    linear_num_key_heads: int | None = flag(
        None, "GDN query/key heads H (HF linear_num_key_heads); overrides the preset",
        default_text=_PRESET + "; without one --num-attention-heads")
    linear_num_value_heads: int | None = flag(
        None, "GDN value heads HV, a multiple of H (HF linear_num_value_heads); overrides the "
        "preset", default_text=_PRESET + "; without one H")
    linear_key_head_dim: int | None = flag(
        None, "GDN query/key head dimension Dk (HF linear_key_head_dim); overrides the preset",
        default_text=_PRESET + "; without one 0.75 d / H")
    linear_value_head_dim: int | None = flag(
        None, "GDN value head dimension Dv (HF linear_value_head_dim); overrides the preset",
        default_text=_PRESET + "; without one 2 Dk")
    linear_conv_kernel_dim: int | None = flag(
        None, "width of GDN's causal short convolution (HF linear_conv_kernel_dim); overrides "
        "the preset", default_text=_PRESET + "; without one 4")
    linear_allow_neg_eigval: bool | None = flag(
        help="GDN beta in (0, 2) (x2), allowing negative eigenvalues (HF "
        "linear_allow_neg_eigval); overrides the preset", action="tristate",
        negative="--no-linear-allow-neg-eigval", negative_help="GDN beta in (0, 1)",
        default_text=_PRESET + "; without one on")
    position_embedding_type: str | None = flag(
        None, "rope or none (NoPE; HF rope_parameters.rope_theta null)", choices=["rope", "none"],
        default_text=_PRESET + "; without one rope")
    rotary_base: float | None = flag(
        None, "RoPE base theta (HF rope_parameters.rope_theta); overrides the preset",
        default_text=_PRESET + "; without one 500000")
    norm_epsilon: float | None = flag(
        None, "RMSNorm epsilon of the layer norms (HF rms_norm_eps; the GDN output norm keeps "
        "1e-5); overrides the preset", default_text=_PRESET + "; without one 1e-6")
    untie_embeddings: bool | None = flag(
        help="separate input embedding and output layer weights (HF tie_word_embeddings "
        "false)", flags=("--untie-embeddings-and-output-weights",), action="tristate",
        negative="--tie-embeddings-and-output-weights",
        negative_help="share the input embedding with the output layer",
        default_text=_PRESET + "; without one untied")
    make_vocab_size_divisible_by: int | None = flag(
        None, "pad the tokenizer's vocabulary to a multiple of this (embedding rows; HF "
        "vocab_size stays unpadded); overrides the preset",
        default_text=_PRESET + "; without one 128")
    init_method_std: float | None = flag(
        None, "standard deviation of the truncated-normal weight initialization (HF "
        "initializer_range); overrides the preset", default_text=_PRESET + "; without one 0.02")
    max_position_embeddings: int | None = flag(
        None, "longest sequence the model is configured for (HF max_position_embeddings); "
        "overrides the preset", default_text=_PRESET + "; without one 65536")


@dataclass(**_SETTINGS)
class ParallelArgs:
    """Parallelism: TP, PP, CP, data-parallel DDP and the process group."""

    tensor_model_parallel_size: int = flag(1, "tensor-parallel size TP")
    pipeline_model_parallel_size: int = flag(1, "pipeline-parallel size PP (1F1B schedule)")
    context_parallel_size: int = flag(
        1, "context-parallel size CP (head-parallel; docs/parallelism.md)")
    sequence_parallel: bool = flag(help="sequence parallelism (TP > 1)", action="store_true")
    use_distributed_optimizer: bool = flag(
        help="shard optimizer state over data parallel", action="store_true")
    overlap_grad_reduce: bool = flag(
        help="overlap DP gradient reduction with backward", action="store_true")
    overlap_param_gather: bool = flag(
        help="overlap the distributed optimizer's param gather", action="store_true")
    ddp_bucket_size: int | None = flag(
        None, "DDP bucket size (elements)", default_text="megatron-core's")
    distributed_backend: str | None = flag(
        None, "process-group backend", choices=["nccl", "gloo"],
        default_text="nccl with CUDA, gloo otherwise")
    distributed_timeout_minutes: int = flag(10, "process-group timeout (minutes)")
    fla_warmup_workers: int | None = flag(
        None, "GPU: processes per node that compile fla's Triton autotune candidates in "
        "parallel before the first iteration (0 or 1: off)",
        default_text="$MEGATRON_HYBRID_FLA_WARMUP_WORKERS or min(8, CPUs - 1)")


@dataclass(**_SETTINGS)
class TrainingArgs:
    """Training: batch shape, length of the run, precision, recompute, loss, seed."""

    micro_batch_size: int = flag(1, "sequences per micro-batch per data-parallel rank")
    global_batch_size: int | None = flag(
        None, "sequences per iteration (a multiple of micro-batch size x data-parallel size)",
        default_text="micro-batch size x data-parallel size")
    seq_length: int = flag(help="tokens per sequence")
    train_iters: int = flag(help="iterations (global batches) of the whole run")
    exit_interval: int | None = flag(
        None, "exit after the iteration that is a multiple of this (saving first)")
    bf16: bool = flag(help="bf16 parameters and compute, fp32 main weights and gradients",
                      action="store_true")
    recompute_granularity: str | None = flag(
        None, "activation recompute: full layers, or the attention core (selective)",
        choices=["full", "selective"])
    recompute_method: str | None = flag(
        None, "how full recompute picks layers", choices=["uniform", "block"],
        default_text="uniform with --recompute-granularity full")
    recompute_num_layers: int | None = flag(
        None, "layers per recompute unit (uniform) or recomputed per stage (block)",
        default_text="1 with --recompute-granularity full")
    z_loss_weight: float = flag(
        1e-5, "weight of mean(logsumexp(logits)^2) (Olmo recipe 1e-5; 0 disables)")
    seed: int = flag(1234, "random seed (weights, data order, dropout)")
    dry_run: bool = flag(
        help="check the flags, the model and the parallel layout for WORLD_SIZE ranks, print "
        "the resolved configuration and exit (no process group, no GPU)", action="store_true")
    use_cpu_initialization: bool = flag(
        help="initialize weights on the CPU (TP-invariant; always on without CUDA); off: "
        "initialize on the GPU (fast)", action="store_true")


@dataclass(**_SETTINGS)
class OptimizerArgs:
    """Optimizer: AdamW, weight decay and gradient clipping."""

    lr: float = flag(help="peak learning rate")
    weight_decay: float = flag(0.1, "AdamW weight decay")
    weight_decay_grouping: str = flag(
        "olmo", "olmo: decay all but the embedding; megatron: no decay on 1-D params and "
        "biases", choices=["olmo", "megatron"])
    adam_beta1: float = flag(0.9, "AdamW beta1")
    adam_beta2: float = flag(0.95, "AdamW beta2")
    adam_eps: float = flag(1e-8, "AdamW epsilon")
    clip_grad: float = flag(1.0, "global grad-norm clip (0: off)")


@dataclass(**_SETTINGS)
class ScheduleArgs:
    """Learning-rate schedule: warmup, then decay to --min-lr (docs/model.md §8)."""

    min_lr: float = flag(0.0, "learning rate at the end of the decay")
    lr_decay_style: str = flag("cosine", "decay shape after warmup",
                               choices=["constant", "linear", "cosine"])
    lr_warmup_iters: int = flag(0, "iterations of linear warmup from --lr-warmup-init")
    lr_warmup_fraction: float | None = flag(
        None, "warmup as a fraction of --lr-decay-iters (instead of --lr-warmup-iters)")
    lr_warmup_init: float = flag(0.0, "learning rate at the start of warmup")
    lr_decay_iters: int | None = flag(
        None, "iterations of warmup + decay", default_text="--train-iters")


@dataclass(**_SETTINGS)
class DataArgs:
    """Data: datasets, tokenizer, document masking, loader."""

    data_path: list[str] | None = flag(
        None, "prefix, or weight prefix weight prefix ... (blend)", nargs="+")
    split: str = flag("969,30,1", "train,valid,test weights")
    mock_data: bool = flag(
        help="synthetic tokens (benchmarks); needs --vocab-size or a tokenizer",
        action="store_true")
    vocab_size: int | None = flag(
        None, "tokenizer vocabulary when no tokenizer is given (--mock-data)")
    tokenizer_type: str | None = flag(
        None, "tokenizer library", choices=["HuggingFaceTokenizer", "SentencePieceTokenizer"],
        default_text="SentencePieceTokenizer for a .model file, else HuggingFaceTokenizer")
    tokenizer_model: str | None = flag(
        None, "tokenizer.json (or a directory holding one), or a SentencePiece .model")
    eod_token: str | None = flag(
        None, "override the end-of-document token", default_text="the tokenizer's end of text")
    data_cache_path: str | None = flag(
        None, "where dataset index caches go", default_text="PREFIX/../cache/")
    reset_attention_mask: bool = flag(
        help="intra-document masking: attention, GDN state and conv history do not cross the "
        "EOD-separated documents of a sample (needs --reset-position-ids)", action="store_true")
    reset_position_ids: bool = flag(
        help="RoPE positions restart at every document (with --reset-attention-mask)",
        action="store_true")
    intra_document_masking: bool = flag(
        help="both --reset-attention-mask and --reset-position-ids", action="store_true")
    num_workers: int = flag(2, "DataLoader workers per rank")


@dataclass(**_SETTINGS)
class CheckpointArgs:
    """Checkpointing: save, load, resume policy (docs/checkpoints.md)."""

    save: str | None = flag(None, "directory checkpoints are saved to")
    load: str | None = flag(None, "directory to resume (or --finetune) from")
    save_interval: int | None = flag(
        None, "save every this many iterations (needs --save)",
        default_text="at the end of the run only")
    finetune: bool = flag(help="load model weights only; iteration and optimizer start fresh",
                          action="store_true")
    no_load_optim: bool = flag(help="do not load optimizer state", action="store_true")
    no_load_rng: bool = flag(help="do not load RNG state", action="store_true")
    no_save_optim: bool = flag(help="do not save optimizer state", action="store_true")
    dist_ckpt_optim_fully_reshardable: bool = flag(
        True, "save the distributed optimizer in megatron-core's fully_reshardable format "
        "(reshards TP, PP and DP on load). --no-...: the faster dp_reshardable format "
        "(reshards DP only; tools/reshard_checkpoint.py changes its TP/PP). A resume reads the "
        "format the checkpoint was saved in", action="bool_optional")
    override_opt_param_scheduler: bool = flag(
        help="on resume, take the LR/WD schedule from the flags even where the checkpoint's "
        "differs (without it, a difference is an error)", action="store_true")
    use_checkpoint_opt_param_scheduler: bool = flag(
        help="on resume, take the LR/WD schedule from the checkpoint, ignoring the flags",
        action="store_true")


@dataclass(**_SETTINGS)
class ReliabilityArgs:
    """Reliability: time limits, Olmo's skip-step rule, resume data check."""

    exit_duration_in_mins: float | None = flag(
        None, "save and exit after this many minutes of training (agreed by all ranks at an "
        "iteration boundary); SIGTERM/SIGUSR1 do the same at any time")
    skip_step: bool | None = flag(
        help="Olmo's skip-step rule: skip the update when the loss or grad norm is beyond "
        "--skip-step-sigma standard deviations of the previous --skip-step-window steps "
        "(docs/model.md §8). Non-finite losses and grad norms are always skipped",
        action="bool_optional", default_text="on with --model-preset, off otherwise")
    skip_step_sigma: float = flag(6.0, "skip-step threshold in standard deviations")
    skip_step_window: int = flag(128, "steps whose loss and grad norm the rule's statistics use")
    skip_step_min_history: int = flag(64, "steps seen before the rule is active")
    max_consecutive_skipped_steps: int = flag(
        10, "stop with an error after this many skipped steps in a row (0: never)")
    override_data_check: bool = flag(
        help="on resume, accept a dataset, split, sequence length or seed that differs from "
        "the checkpoint's (without it, an error lists each difference)", action="store_true")


@dataclass(**_SETTINGS)
class LoggingArgs:
    """Logging and evaluation."""

    log_interval: int = flag(100, "iterations between log lines")
    eval_interval: int = flag(1000, "iterations between validation runs")
    eval_iters: int = flag(100, "global batches per validation run (0: no validation)")
    tensorboard_dir: str | None = flag(None, "TensorBoard log directory")
    wandb_project: str | None = flag(None, "W&B project (logs to W&B when given)")
    wandb_exp_name: str | None = flag(None, "W&B run name")
    wandb_save_dir: str | None = flag(None, "W&B local directory")
    peak_tflops: float | None = flag(
        None, "per-GPU dense peak for MFU (TFLOP/s)",
        default_text="989.4 on H100/H200, else MFU is not reported")


@dataclass(**_SETTINGS)
class DerivedArgs:
    """Resolved by validation from the flags and the world size (not flags)."""

    world_size: int | None = derived("ranks of the job (WORLD_SIZE)")
    data_parallel_size: int | None = derived("world size / (TP x PP x CP)")
    num_microbatches: int | None = derived(
        "micro-batches per data-parallel rank per iteration: global batch / (micro-batch x DP)")
    scheduler_policy: str | None = derived(
        "how a resumed LR/WD schedule is reconciled: 'flags' (--override-opt-param-scheduler), "
        "'checkpoint' (--use-checkpoint-opt-param-scheduler) or 'check' (differences are errors)")


#: (``--help`` group title, group dataclass), in ``--help`` order.
GROUPS = (("model", ModelArgs), ("parallelism", ParallelArgs), ("training", TrainingArgs),
          ("optimizer", OptimizerArgs), ("learning-rate schedule", ScheduleArgs),
          ("data", DataArgs), ("checkpointing", CheckpointArgs), ("reliability", ReliabilityArgs),
          ("logging and evaluation", LoggingArgs))


@dataclass(**_SETTINGS)
class TrainingConfig(ModelArgs, ParallelArgs, TrainingArgs, OptimizerArgs, ScheduleArgs, DataArgs,
                     CheckpointArgs, ReliabilityArgs, LoggingArgs, DerivedArgs):
    """Every training setting, flat (``cfg.seq_length``); frozen once validated.

    Build it with ``config.arguments.parse_args``; ``cfg.group(OptimizerArgs)`` gives one
    group's view. Raises ``dataclasses.FrozenInstanceError`` on assignment.
    """

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> TrainingConfig:
        """The config of a ``{field: value}`` dict (a parsed namespace's ``vars``).

        Raises: TypeError naming keys that are not training settings.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise TypeError(f"TrainingConfig: unknown settings {unknown}")
        return cls(**values)

    def flag_values(self) -> dict[str, Any]:
        """``{field: value}`` of the flags (the derived fields left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if is_flag(f)}

    def to_dict(self) -> dict[str, Any]:
        """Every field, flags and derived (for logging, e.g. W&B's run config)."""
        return dataclasses.asdict(self)

    def group(self, cls):
        """The group dataclass ``cls`` (e.g. ``OptimizerArgs``) with this config's values."""
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})


#: Settings recorded in each checkpoint's run_config.yaml under ``training`` (a flag name with
#: '-' for '_' each; the format written before the typed config, read back unchanged by
#: ``checkpoint.reshard.worker_args``).
RECORDED_FLAGS = ("seq_length", "micro_batch_size", "global_batch_size", "train_iters", "lr",
                  "min_lr", "lr_decay_style", "lr_warmup_iters", "lr_decay_iters",
                  "weight_decay", "weight_decay_grouping", "clip_grad", "z_loss_weight", "bf16",
                  "seed", "data_path", "split", "use_distributed_optimizer",
                  "sequence_parallel", "recompute_granularity", "adam_beta1", "adam_beta2",
                  "adam_eps", "lr_warmup_init", "overlap_grad_reduce", "overlap_param_gather",
                  "ddp_bucket_size", "dist_ckpt_optim_fully_reshardable",
                  "reset_attention_mask", "reset_position_ids")


def recorded_settings(cfg) -> dict[str, Any]:
    """The ``training`` section of run_config.yaml: ``RECORDED_FLAGS`` of ``cfg``."""
    return {k: getattr(cfg, k) for k in RECORDED_FLAGS}
