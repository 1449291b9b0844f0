"""The pretraining loop of ``pretrain_olmo_hybrid.py`` (megatron-core schedules, DDP, optimizer).

Letters: B micro-batch size, S sequence length, V padded vocabulary (V/TP per rank).

One iteration = one global batch: ``num_microbatches`` micro-batches per data-parallel rank run
through megatron-core's pipeline schedule (1F1B with PP > 1), gradients are reduced by DDP and
``finalize_model_grads``, the optimizer steps (clipping the global grad norm) and the LR schedule
advances. Losses shown are averaged over micro-batches and data-parallel ranks.
"""
from __future__ import annotations

import math
import os
import sys
import time
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_hybrid.checkpoint.optimizer import DP_RESHARDABLE, FULLY_RESHARDABLE
from megatron_hybrid.checkpoint.resume_checks import (
    check_data_matches,
    check_tokenizer_matches,
    tokenizer_fingerprint,
)
from megatron_hybrid.checkpoint.training_state import (
    check_load_dir,
    load_training_checkpoint,
    save_training_checkpoint,
)
from megatron_hybrid.config.arguments import ArgumentError, model_config_from_args, parse_args
from megatron_hybrid.model_setup import param_groups_summary, setup_model_and_optimizer
from megatron_hybrid.parallel import destroy_distributed, initialize_distributed, print_rank_0
from megatron_hybrid.runtime.kernel_warmup import warm_up_kernels
from megatron_hybrid.training.data import (
    build_datasets,
    build_loader,
    check_token_ids,
    data_fingerprint,
    load_tokenizer,
    move_batch,
)
from megatron_hybrid.training.fault_injection import FaultInjector
from megatron_hybrid.training.flops import detect_peak_tflops, training_flops_per_token
from megatron_hybrid.training.loss import lm_loss_with_z_loss
from megatron_hybrid.training.metrics import MetricsLogger
from megatron_hybrid.training.packing import context_parallel_chunk, pack_micro_batch, schedule_shape
from megatron_hybrid.training.preemption import StopController
from megatron_hybrid.training.skip_step import SkipStepRule, TooManySkippedSteps, guarded_optimizer_step

#: Flags recorded in each checkpoint's run_config.yaml under ``training``.
RECORDED_FLAGS = ("seq_length", "micro_batch_size", "global_batch_size", "train_iters", "lr",
                  "min_lr", "lr_decay_style", "lr_warmup_iters", "lr_decay_iters",
                  "weight_decay", "weight_decay_grouping", "clip_grad", "z_loss_weight", "bf16",
                  "seed", "data_path", "split", "use_distributed_optimizer",
                  "sequence_parallel", "recompute_granularity", "adam_beta1", "adam_beta2",
                  "adam_eps", "lr_warmup_init", "overlap_grad_reduce", "overlap_param_gather",
                  "ddp_bucket_size", "dist_ckpt_optim_fully_reshardable",
                  "reset_attention_mask", "reset_position_ids")


def _forward_step(args, device, wrap_loss, data_iterator, model):
    """Megatron ``forward_step_func``: one micro-batch through this stage; loss on the last.

    ``wrap_loss(loss_func) -> loss_func``: the run's fault-injection hook (tests), or None.
    """
    batch = None
    if data_iterator is not None:
        batch = next(data_iterator)
        check_token_ids(batch, args.tokenizer_vocab_size, args)
        batch = move_batch(batch, device)
    packed = None
    if batch is not None and args.reset_attention_mask:
        batch, packed = pack_micro_batch(batch, args.eod_id)
    if batch is not None and args.context_parallel_size > 1:
        batch = context_parallel_chunk(batch)  # offsets stay those of the whole row
    tokens = batch["tokens"] if batch is not None else None
    positions = batch["position_ids"] if batch is not None else None
    output = model(tokens, positions, None, packed_seq_params=packed)

    def loss_func(output_tensor):
        total, lm, z = lm_loss_with_z_loss(output_tensor, batch["labels"], batch["loss_mask"],
                                           args.z_loss_weight)
        if args.context_parallel_size > 1:
            # megatron-core's schedule multiplies the loss by CP and DDP averages gradients over
            # DP x CP: a local mean / CP makes the gradient that of the mean over all tokens
            total = total / args.context_parallel_size
        report = {"lm loss": lm}
        if args.z_loss_weight > 0:
            report["z loss"] = z
        return total, report

    return output, (loss_func if wrap_loss is None else wrap_loss(loss_func))


def _reduce_reports(reports: list[dict[str, torch.Tensor]], device) -> dict[str, float]:
    """Mean over micro-batches, then over data-parallel ranks (last stage); {} elsewhere."""
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True) or not reports:
        return {}
    keys = list(reports[0])
    vals = torch.stack([torch.stack([r[k].float() for r in reports]).mean() for k in keys])
    vals = vals.to(device)
    # CP ranks hold equal shares of every sample's tokens: their mean is the samples' mean
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(vals, group=group)
        vals /= dist.get_world_size(group)
    return {k: float(v) for k, v in zip(keys, vals.cpu(), strict=True)}


def train_step(args, setup, data_iterator, device, rule: SkipStepRule, wrap_loss=None):
    """One iteration; returns (losses dict on the last stage, grad norm, SkipDecision).

    ``wrap_loss``: the fault-injection hook for this iteration's loss (``_forward_step``).

    The update is skipped (weights, Adam moments and the LR schedule untouched) for a non-finite
    loss or grad norm, or when Olmo's skip-step rule flags a spike (``skip_step.py``).
    """
    model, optimizer = setup.model, setup.optimizer
    seq_length, micro_batch_size = schedule_shape(args)
    model.zero_grad_buffer()
    optimizer.zero_grad()
    reports = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, args, device, wrap_loss), data_iterator=data_iterator,
        model=[model], num_microbatches=args.num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=False)
    losses = _reduce_reports(reports, device)
    decision, grad_norm = guarded_optimizer_step(optimizer, _global_loss(losses, device), rule)
    if not decision.skip:
        setup.scheduler.step(increment=1)
    elif not math.isfinite(grad_norm):
        decision.reason += f" (non-finite gradients on ranks {_nonfinite_grad_ranks(setup)})"
    return losses, grad_norm, decision


def _global_loss(losses: dict[str, float], device) -> float:
    """The iteration's lm loss on every rank (it lives on the last pipeline stage)."""
    value = torch.tensor([losses.get("lm loss", 0.0)], dtype=torch.float64, device=device)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(value, group=parallel_state.get_pipeline_model_parallel_group())
    return float(value.item())


def _nonfinite_grad_ranks(setup) -> list[int]:
    """Global ranks whose local gradients hold a NaN or Inf (a collective)."""
    bad = any(not torch.isfinite(getattr(p, "main_grad", p.grad)).all()
              for p in setup.unwrapped.parameters()
              if getattr(p, "main_grad", p.grad) is not None)
    if not dist.is_initialized():
        return [0] if bad else []
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int32,
                        device=next(setup.unwrapped.parameters()).device)
    flags[dist.get_rank()] = int(bad)
    dist.all_reduce(flags)
    return [i for i, f in enumerate(flags.tolist()) if f]


@torch.no_grad()
def evaluate(args, setup, dataset, device) -> dict[str, float]:
    """Mean losses over ``--eval-iters`` global batches from the start of ``dataset``."""
    model = setup.model
    model.eval()
    loader = build_loader(dataset, 0, args)
    seq_length, micro_batch_size = schedule_shape(args)
    all_reports = []
    for _ in range(args.eval_iters):
        all_reports += get_forward_backward_func()(
            forward_step_func=partial(_forward_step, args, device, None), data_iterator=loader,
            model=[model], num_microbatches=args.num_microbatches, seq_length=seq_length,
            micro_batch_size=micro_batch_size, forward_only=True)
    model.train()
    return _reduce_reports(all_reports, device)


def _startup_report(args, model_config, setup, flops_per_token, peak) -> None:
    n_local = sum(p.numel() for p in setup.unwrapped.parameters())
    counts = torch.tensor([n_local], dtype=torch.float64)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(counts, group=parallel_state.get_pipeline_model_parallel_group())
    print_rank_0(
        f" > Olmo Hybrid: {model_config.num_layers} layers, hidden {model_config.hidden_size}, "
        f"vocab {model_config.vocab_size} (padded {model_config.padded_vocab_size})\n"
        f"{model_config.layout.describe()}\n"
        f" > layout: TP={args.tensor_model_parallel_size} PP={args.pipeline_model_parallel_size} "
        f"CP={args.context_parallel_size} DP={args.data_parallel_size} ({args.world_size} rank"
        f"{'s' if args.world_size > 1 else ''}), micro-batch "
        f"{args.micro_batch_size} x {args.num_microbatches} micro-batches, global batch "
        f"{args.global_batch_size} x {args.seq_length} tokens\n"
        f" > parameters per tensor-parallel rank (all stages): {int(counts.item()):,}\n"
        f" > FLOPs per token (docs/model.md §10, fwd+bwd): {flops_per_token / 1e9:.3f} GFLOP; MFU peak: "
        + (f"{peak} TFLOP/s per GPU" if peak else "unknown (CPU or unlisted GPU; --peak-tflops)"))
    groups = param_groups_summary(setup.optimizer)
    print_rank_0(" > optimizer param groups (this rank): " + ", ".join(
        f"wd_mult={g['wd_mult']}: {g['num_params']:,} params" for g in groups))


def _check_writable(args) -> None:
    """Create ``--save`` / ``--tensorboard-dir`` up front (rank 0) so an unwritable path fails at
    start-up, naming the flag, instead of at the first save."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    for flag, path in (("--save", args.save), ("--tensorboard-dir", args.tensorboard_dir)):
        if not path:
            continue
        try:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, f".write_test.{os.getpid()}")
            open(probe, "w").close()
            os.remove(probe)
        except OSError as err:
            raise ArgumentError(f"{flag} {path}: not a writable directory ({err.strerror})") from err


def optimizer_format(args) -> str:
    """The distributed optimizer's checkpoint format the flags ask for."""
    return FULLY_RESHARDABLE if args.dist_ckpt_optim_fully_reshardable else DP_RESHARDABLE


def _extra_config(args, tokenizer) -> dict:
    return {"tokenizer": tokenizer_fingerprint(tokenizer), "data": data_fingerprint(args),
            "training": {k: getattr(args, k) for k in RECORDED_FLAGS},
            "has_optimizer_state": not args.no_save_optim}


def _check_resume(args, tokenizer, extra: dict) -> None:
    """Refuse a checkpoint trained with another tokenizer, or on other data (unless
    ``--override-data-check``), before any tensor is read."""
    from megatron_hybrid.checkpoint.storage import read_run_config

    run_config = read_run_config(args.load)
    check_tokenizer_matches(run_config, extra["tokenizer"], args.load)
    if not args.finetune:
        diffs = check_data_matches(run_config, extra["data"], args.load, args.override_data_check)
        for d in diffs:
            print_rank_0(f" > warning: --override-data-check: {d}")


def dry_run(args) -> dict:
    """Validate the model and layout for ``args.world_size`` ranks and print the resolved setup.

    Needs no process group: the tokenizer file is read when given (else ``--vocab-size`` or the
    preset's vocabulary). Raises ConfigError / ArgumentError like a real launch would.
    """
    from megatron_hybrid.config import PRESETS

    if args.tokenizer_model is not None and os.path.exists(args.tokenizer_model):
        tok = load_tokenizer(args)
        vocab, eod, pad = tok.vocab_size, tok.eod, getattr(tok, "pad", None)
    else:
        vocab = args.vocab_size or PRESETS.get(args.model_preset or "", {}).get("vocab_size")
        if vocab is None:
            raise ValueError("--dry-run needs --tokenizer-model (an existing file) or --vocab-size")
        eod, pad = None, None
    cfg = model_config_from_args(args, vocab, eod, pad)
    cfg.validate_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                          args.context_parallel_size)
    flops = training_flops_per_token(cfg, args.seq_length)
    stages = cfg.stage_sizes(args.pipeline_model_parallel_size)
    print(f"dry run OK: {args.world_size} ranks = TP {args.tensor_model_parallel_size} x PP "
          f"{args.pipeline_model_parallel_size} x CP {args.context_parallel_size} x DP "
          f"{args.data_parallel_size}; layers per stage "
          f"{stages}; micro-batch {args.micro_batch_size} x {args.num_microbatches} micro-batches "
          f"x DP = global batch {args.global_batch_size} sequences of {args.seq_length} tokens; "
          f"vocabulary {cfg.vocab_size} (padded {cfg.padded_vocab_size}); "
          f"{flops / 1e9:.1f} GFLOP/token; allowed TP sizes {cfg.allowed_tensor_parallel_sizes(8)}",
          flush=True)
    return {"iteration": 0, "losses": [], "last_losses": [], "valid": {}, "dry_run": True}


def pretrain(argv: list[str] | None = None) -> dict:
    """Run pretraining with the flags ``argv``; returns a summary dict (on every rank).

    Summary: ``iteration``, ``losses`` ([(iteration, lm loss)] of logged intervals, last rank),
    ``last_losses`` (per-iteration lm losses of this run, last rank), ``valid`` (last validation
    losses). Raises ArgumentError / ConfigError for invalid flags.
    """
    t_start = time.time()
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    faults = FaultInjector.from_environment()  # reliability tests only; empty in real runs
    info = initialize_distributed(args.tensor_model_parallel_size,
                                  args.pipeline_model_parallel_size,
                                  args.context_parallel_size, args.seed,
                                  backend=args.distributed_backend,
                                  timeout_minutes=args.distributed_timeout_minutes)
    device = info.device
    _check_writable(args)
    tokenizer = load_tokenizer(args)
    model_config = model_config_from_args(args, tokenizer.vocab_size, tokenizer.eod,
                                          getattr(tokenizer, "pad", None))
    args.tokenizer_vocab_size = tokenizer.vocab_size
    args.eod_id = tokenizer.eod
    warm_up_kernels(args, model_config, device)  # before the model takes the GPU's memory
    setup = setup_model_and_optimizer(args, model_config, device)
    t_model = time.time()
    flops_per_token = training_flops_per_token(model_config, args.seq_length)
    peak = args.peak_tflops or detect_peak_tflops()
    _startup_report(args, model_config, setup, flops_per_token, peak)

    state = {"iteration": 0, "consumed_train_samples": 0}
    extra = _extra_config(args, tokenizer)
    if args.load and check_load_dir(args.load, args.finetune):
        _check_resume(args, tokenizer, extra)
        state = load_training_checkpoint(args.load, setup, finetune=args.finetune,
                                         load_optimizer=not args.no_load_optim,
                                         load_rng=not args.no_load_rng,
                                         scheduler_policy=args.scheduler_policy)
    elif args.load:
        print_rank_0(f" > no checkpoint in --load {args.load} yet "
                     f"(no latest_checkpointed_iteration.txt): starting from scratch")
    iteration, consumed = int(state["iteration"]), int(state["consumed_train_samples"])
    rule = SkipStepRule(args.skip_step, args.skip_step_sigma, args.skip_step_window,
                        args.skip_step_min_history, args.max_consecutive_skipped_steps)
    rule.load_state_dict(state.get("skip_step", {}))

    train_ds, valid_ds, _ = build_datasets(args, tokenizer)
    train_iter = build_loader(train_ds, consumed, args)
    logger = MetricsLogger(args, flops_per_token, peak)
    print_rank_0(f" > setup times (s): model-and-optimizer {t_model - t_start:.1f}, checkpoint "
                 f"and data {time.time() - t_model:.1f}")
    print_rank_0(f" > training from iteration {iteration} to {args.train_iters}")

    def save(it):
        save_training_checkpoint(args.save, it, setup, model_config,
                                 {"iteration": it, "consumed_train_samples": consumed,
                                  "skip_step": rule.state_dict()},
                                 extra, save_optimizer=not args.no_save_optim,
                                 optimizer_format=optimizer_format(args), faults=faults)
        print_rank_0(f" > saved checkpoint at iteration {it} to {args.save}")

    stop = StopController(args.exit_duration_in_mins, device=device)
    last_losses, valid, saved_at = [], {}, None
    try:
        while iteration < args.train_iters:
            t0 = time.time()
            losses, grad_norm, decision = train_step(
                args, setup, train_iter, device, rule,
                wrap_loss=partial(faults.wrap_loss, iteration=iteration + 1))
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.time() - t0
            iteration += 1
            consumed += args.global_batch_size
            if losses:
                last_losses.append(losses["lm loss"])
            if decision.skip:
                print_rank_0(f" > iteration {iteration}: update skipped: {decision.reason}")
            logger.add(losses, seconds, skipped=decision.skip)
            if iteration % args.log_interval == 0 or iteration == args.train_iters:
                lr = setup.optimizer.param_groups[0]["lr"]
                logger.log(iteration, consumed, lr, grad_norm)
            if valid_ds is not None and args.eval_iters > 0 and iteration % args.eval_interval == 0:
                valid = evaluate(args, setup, valid_ds, device)
                if valid:
                    logger.log_validation(iteration, valid)
            if args.save and args.save_interval and iteration % args.save_interval == 0:
                save(iteration)
                saved_at = iteration
            if args.exit_interval and iteration % args.exit_interval == 0:
                print_rank_0(f" > exiting at iteration {iteration} (--exit-interval)")
                break
            reason = stop.check()
            if reason:
                print_rank_0(f" > stopping at iteration {iteration} "
                             f"({'SIGTERM/SIGUSR1' if reason == 'signal' else '--exit-duration-in-mins'})"
                             + ("; saving a checkpoint" if args.save else "; no --save given"))
                break
    finally:
        stop.close()
    if args.save and saved_at != iteration and iteration > int(state["iteration"]):
        save(iteration)
    logger.close()
    return {"iteration": iteration, "losses": logger.history, "last_losses": last_losses,
            "valid": valid}


def main(argv: list[str] | None = None) -> int:
    """Entry point: run ``pretrain`` and tear the process groups down; returns the exit code.

    ``kill -USR2 <pid>`` dumps every thread's Python stack to stderr (for hung jobs)."""
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR2, all_threads=True)
    from megatron_hybrid.checkpoint.storage import CheckpointError
    from megatron_hybrid.config import ConfigError

    try:
        pretrain(argv)
    except (ArgumentError, ConfigError, CheckpointError, FileNotFoundError, ValueError,
            TooManySkippedSteps) as err:
        rank = os.environ.get("RANK", "0")
        # Flag and config errors are the same on every rank: rank 0 prints them. Others may be
        # rank-specific: every rank prints its own, tagged.
        if isinstance(err, (ArgumentError, ConfigError)):
            if rank == "0":
                print(f"pretrain_olmo_hybrid.py: error: {err}", file=sys.stderr, flush=True)
        else:
            tag = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
            print(f"{tag}pretrain_olmo_hybrid.py: error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.barrier()
        destroy_distributed()
    return 0
