"""The pretraining loop of ``pretrain_olmo_hybrid.py`` (megatron-core schedules, DDP, optimizer).

Letters: B micro-batch size, S sequence length, V padded vocabulary (V/TP per rank).

One iteration = one global batch: ``num_microbatches`` micro-batches per data-parallel rank run
through megatron-core's pipeline schedule (1F1B with PP > 1), gradients are reduced by DDP and
``finalize_model_grads``, the optimizer steps (clipping the global grad norm) and the LR schedule
advances. Losses shown are averaged over micro-batches and data-parallel ranks.

The flags arrive as a frozen ``config.training.TrainingConfig`` (``args``), unchanged by the run;
what the run learns and advances (tokenizer vocabulary and EOD id, iteration, consumed samples)
is its ``training.state.RunState``.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
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
from megatron_hybrid.config.training import RECORDED_FLAGS, TrainingConfig, recorded_settings
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
from megatron_hybrid.training.state import RunState

__all__ = ["RECORDED_FLAGS", "dry_run", "evaluate", "main", "pretrain", "train_step"]

def _forward_step(args, run: RunState, device, wrap_loss, data_iterator, model):
    """Megatron ``forward_step_func``: one micro-batch through this stage; loss on the last.

    ``wrap_loss(loss_func) -> loss_func``: the run's fault-injection hook (tests), or None.
    """
    batch = None
    if data_iterator is not None:
        batch = next(data_iterator)
        check_token_ids(batch, run.tokenizer_vocab_size, args)
        batch = move_batch(batch, device)
    packed = None
    if batch is not None and args.reset_attention_mask:
        batch, packed = pack_micro_batch(batch, run.eod_id)
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


def train_step(args, setup, data_iterator, device, rule: SkipStepRule, run: RunState,
               faults: FaultInjector | None = None):
    """Iteration ``run.current_iteration``; returns (losses dict on the last stage, grad norm,
    SkipDecision). ``faults``: the run's fault-injection hook (tests only).

    The update is skipped (weights, Adam moments and the LR schedule untouched) for a non-finite
    loss or grad norm, or when Olmo's skip-step rule flags a spike (``skip_step.py``).
    """
    model, optimizer = setup.model, setup.optimizer
    seq_length, micro_batch_size = schedule_shape(args)
    wrap_loss = None if faults is None else partial(faults.wrap_loss, iteration=run.current_iteration)
    model.zero_grad_buffer()
    optimizer.zero_grad()
    reports = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, args, run, device, wrap_loss),
        data_iterator=data_iterator,
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
def evaluate(args, setup, dataset, device, run: RunState) -> dict[str, float]:
    """Mean losses over ``--eval-iters`` global batches from the start of ``dataset``."""
    model = setup.model
    model.eval()
    loader = build_loader(dataset, 0, args)
    seq_length, micro_batch_size = schedule_shape(args)
    all_reports = []
    for _ in range(args.eval_iters):
        all_reports += get_forward_backward_func()(
            forward_step_func=partial(_forward_step, args, run, device, None), data_iterator=loader,
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
            "training": recorded_settings(args),
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


@dataclass
class _Session:
    """What ``pretrain`` sets up before the loop (the run's objects; ``run`` is its state)."""

    device: torch.device
    model_config: object
    setup: object
    rule: SkipStepRule
    run: RunState
    extra: dict
    train_iter: object
    valid_ds: object
    logger: MetricsLogger
    faults: FaultInjector


def _load_or_start(args, setup, tokenizer, extra: dict) -> dict:
    """The training state of ``--load``'s checkpoint (loaded into ``setup``), or a fresh one."""
    if args.load and check_load_dir(args.load, args.finetune):
        _check_resume(args, tokenizer, extra)
        return load_training_checkpoint(args.load, setup, finetune=args.finetune,
                                        load_optimizer=not args.no_load_optim,
                                        load_rng=not args.no_load_rng,
                                        scheduler_policy=args.scheduler_policy)
    if args.load:
        print_rank_0(f" > no checkpoint in --load {args.load} yet "
                     f"(no latest_checkpointed_iteration.txt): starting from scratch")
    return {"iteration": 0, "consumed_train_samples": 0}


def _set_up(args: TrainingConfig, t_start: float) -> _Session:
    """Process groups, tokenizer, model and optimizer, checkpoint, data and logger."""
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
    run = RunState(tokenizer_vocab_size=tokenizer.vocab_size, eod_id=tokenizer.eod)
    warm_up_kernels(args, model_config, device)  # before the model takes the GPU's memory
    setup = setup_model_and_optimizer(args, model_config, device)
    t_model = time.time()
    flops_per_token = training_flops_per_token(model_config, args.seq_length)
    peak = args.peak_tflops or detect_peak_tflops()
    _startup_report(args, model_config, setup, flops_per_token, peak)

    extra = _extra_config(args, tokenizer)
    state = _load_or_start(args, setup, tokenizer, extra)
    run.resume_from(state)
    rule = SkipStepRule(args.skip_step, args.skip_step_sigma, args.skip_step_window,
                        args.skip_step_min_history, args.max_consecutive_skipped_steps)
    rule.load_state_dict(state.get("skip_step", {}))

    train_ds, valid_ds, _ = build_datasets(args, tokenizer)
    train_iter = build_loader(train_ds, run.consumed_train_samples, args)
    logger = MetricsLogger(args, flops_per_token, peak)
    print_rank_0(f" > setup times (s): model-and-optimizer {t_model - t_start:.1f}, checkpoint "
                 f"and data {time.time() - t_model:.1f}")
    print_rank_0(f" > training from iteration {run.iteration} to {args.train_iters}")
    return _Session(device, model_config, setup, rule, run, extra, train_iter, valid_ds, logger,
                    faults)


def _save(args, s: _Session) -> None:
    """Checkpoint iteration ``s.run.iteration`` to ``--save``."""
    it = s.run.iteration
    save_training_checkpoint(args.save, it, s.setup, s.model_config,
                             s.run.checkpoint_state(s.rule.state_dict()), s.extra,
                             save_optimizer=not args.no_save_optim,
                             optimizer_format=optimizer_format(args), faults=s.faults)
    s.run.saved_at = it
    print_rank_0(f" > saved checkpoint at iteration {it} to {args.save}")


def _after_step(args, s: _Session, losses, grad_norm, decision, seconds: float) -> bool:
    """Account the iteration just run (log, validate, save); True when ``--exit-interval``
    ends the run here."""
    run = s.run
    run.iteration += 1
    run.consumed_train_samples += args.global_batch_size
    it = run.iteration
    if losses:
        run.last_losses.append(losses["lm loss"])
    if decision.skip:
        print_rank_0(f" > iteration {it}: update skipped: {decision.reason}")
    s.logger.add(losses, seconds, skipped=decision.skip)
    if it % args.log_interval == 0 or it == args.train_iters:
        lr = s.setup.optimizer.param_groups[0]["lr"]
        s.logger.log(it, run.consumed_train_samples, lr, grad_norm)
    if s.valid_ds is not None and args.eval_iters > 0 and it % args.eval_interval == 0:
        run.valid = evaluate(args, s.setup, s.valid_ds, s.device, run)
        if run.valid:
            s.logger.log_validation(it, run.valid)
    if args.save and args.save_interval and it % args.save_interval == 0:
        _save(args, s)
    if args.exit_interval and it % args.exit_interval == 0:
        print_rank_0(f" > exiting at iteration {it} (--exit-interval)")
        return True
    return False


def _train_loop(args, s: _Session) -> None:
    """Iterations until ``--train-iters``, ``--exit-interval``, a signal or the time limit."""
    stop = StopController(args.exit_duration_in_mins, device=s.device)
    try:
        while s.run.iteration < args.train_iters:
            t0 = time.time()
            losses, grad_norm, decision = train_step(args, s.setup, s.train_iter, s.device,
                                                     s.rule, s.run, s.faults)
            if s.device.type == "cuda":
                torch.cuda.synchronize()
            if _after_step(args, s, losses, grad_norm, decision, time.time() - t0):
                break
            reason = stop.check()
            if reason:
                print_rank_0(f" > stopping at iteration {s.run.iteration} "
                             f"({'SIGTERM/SIGUSR1' if reason == 'signal' else '--exit-duration-in-mins'})"
                             + ("; saving a checkpoint" if args.save else "; no --save given"))
                break
    finally:
        stop.close()


def pretrain(argv: list[str] | None = None) -> dict:
    """Run pretraining with the flags ``argv``; returns a summary dict (on every rank).

    Summary: ``iteration``, ``losses`` ([(iteration, lm loss)] of logged intervals, last rank),
    ``last_losses`` (per-iteration lm losses of this run, last rank), ``valid`` (last validation
    losses). The config ``parse_args`` returns is not changed; run-time state is a ``RunState``.
    Raises ArgumentError / ConfigError for invalid flags.
    """
    t_start = time.time()
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    s = _set_up(args, t_start)
    _train_loop(args, s)
    run = s.run
    if args.save and run.saved_at != run.iteration and run.iteration > run.start_iteration:
        _save(args, s)
    s.logger.close()
    return {"iteration": run.iteration, "losses": s.logger.history,
            "last_losses": run.last_losses, "valid": run.valid}


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
