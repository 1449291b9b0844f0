"""Offline TP / PP / DP change of a training checkpoint (``tools/reshard_checkpoint.py``,
``docs/design.md`` §7).

Model tensors are stored in their global layout; the distributed optimizer's ``dp_reshardable``
format is not (it reshards over DP only), so the job rebuilds the model, DDP, distributed
optimizer and scheduler of the checkpoint (``run_config.yaml``'s ``model`` and ``training``,
through the trainer's own flag parser and ``setup_model_and_optimizer``) in local CPU worker
processes over gloo (``local_workers``):

* phase 1 (a ``dp_reshardable`` source whose layout changes): at the source layout, load it and
  write it ``fully_reshardable`` to a temporary directory;
* phase 2: at the target layout, load (megatron-core reshards) and write the target format, then
  verify: a fresh model and optimizer at the target layout load what was written, and every model
  tensor, fp32 main param, Adam ``exp_avg`` / ``exp_avg_sq`` / ``step``, param-group setting,
  the train state (iteration, consumed samples) and the scheduler state must equal, bit for bit,
  what the phase loaded (phase 1 verifies its output the same way).

Only then is the iteration directory moved into ``--save`` and the tracker written (last). The
scheduler and train state travel verbatim. RNG states are carried only when the layout is
unchanged; otherwise the result records ``has_rng_state: false`` and the trainer reseeds, as for
any resume at another layout. A checkpoint without optimizer state (converted, or saved with
``--no-save-optim``) is copied as is (its tensors are global) with the new layout recorded, then
loaded at the target layout and compared with the source.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import yaml

from megatron_hybrid.checkpoint.optimizer import (
    DP_RESHARDABLE,
    FULLY_RESHARDABLE,
    load_optimizer_state,
    optimizer_sharded_state_dict,
)
from megatron_hybrid.checkpoint.storage import (
    RUN_CONFIG,
    TRACKER,
    CheckpointError,
    apply_model_state,
    iteration_dir,
    load_state,
    read_run_config,
    read_tracker,
    save_state,
)
from megatron_hybrid.checkpoint.training_state import (
    effective_optimizer_format,
    has_rng_state,
    rng_sharded_object,
    saved_optimizer_format,
)
from megatron_hybrid.config import ConfigError, OlmoHybridConfig
from megatron_hybrid.config.arguments import parse_args
from megatron_hybrid.model_setup import setup_model_and_optimizer
from megatron_hybrid.runtime.local_workers import run_local_workers

LAYOUT_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "data_parallel_size")
#: run_config ``training`` entries passed to the flag parser as ``--name value`` / ``--name``.
_VALUE_FLAGS = ("seq_length", "micro_batch_size", "train_iters", "lr", "min_lr", "lr_decay_style",
                "lr_warmup_iters", "lr_decay_iters", "weight_decay", "weight_decay_grouping",
                "clip_grad", "z_loss_weight", "seed", "adam_beta1", "adam_beta2", "adam_eps",
                "lr_warmup_init", "ddp_bucket_size")
#: (``sequence_parallel`` and recompute change no state and are left out.)
_SWITCH_FLAGS = ("bf16", "use_distributed_optimizer", "overlap_grad_reduce",
                 "overlap_param_gather")


def layout_str(layout: tuple[int, int, int]) -> str:
    """'TP=2 x PP=1 x DP=1' for (TP, PP, DP)."""
    return "TP={} x PP={} x DP={}".format(*layout)


def worker_args(run_config: dict, layout: tuple[int, int, int]):
    """The trainer's ``TrainingConfig`` (``parse_args``, so defaults match) for the checkpoint's
    recorded training flags at ``layout``; synthetic data, no batch-size constraints."""
    training = run_config.get("training") or {}
    argv = ["--mock-data", "--vocab-size", str(run_config["model"]["vocab_size"])]
    defaults = {"seq_length": 8, "train_iters": 1, "lr": 0.0}
    for name in _VALUE_FLAGS:
        value = training.get(name, defaults.get(name))
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    argv += [f"--{name.replace('_', '-')}" for name in _SWITCH_FLAGS if training.get(name)]
    argv += ["--tensor-model-parallel-size", str(layout[0]),
             "--pipeline-model-parallel-size", str(layout[1])]
    return parse_args(argv, world_size=layout[0] * layout[1] * layout[2])


# --- in the workers --------------------------------------------------------------------------
def _load(setup, root: str, iteration: int, fmt: str | None, rng: bool):
    """Load model (+ optimizer in ``fmt``, + this rank's RNG) into ``setup``; return (the plain
    entries: scheduler, train state, ...; the RNG state or None)."""
    path = iteration_dir(root, iteration)
    model_sd = setup.unwrapped.sharded_state_dict()
    request: dict[str, Any] = {"model": model_sd}
    if fmt is not None:
        request["optimizer"] = optimizer_sharded_state_dict(
            setup.optimizer, model_sd, True, effective_optimizer_format(setup.optimizer, fmt))
    if rng:
        request["rng_state"] = rng_sharded_object()
    loaded = load_state(request, path)
    apply_model_state(setup.unwrapped, loaded["model"], path)
    if fmt is not None:
        load_optimizer_state(setup.optimizer, loaded["optimizer"])
    plain = {k: v for k, v in loaded.items() if k not in ("model", "optimizer", "rng_state")}
    return plain, loaded.get("rng_state")


def _snapshot(setup, plain: dict, rng, optimizer: bool = True) -> dict[str, Any]:
    """Copies of everything a resume reads: model tensors, per optimizer param its main param
    and state (``exp_avg``, ``exp_avg_sq``, ``step``), param-group settings, plain entries."""
    out: dict[str, Any] = {f"model.{k}": v.detach().clone()
                           for k, v in setup.unwrapped.state_dict().items()
                           if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    out.update({f"plain.{k}": v for k, v in plain.items()})
    if rng is not None:
        out["rng_state"] = rng
    if not optimizer:
        return out
    optimizer = setup.optimizer
    for i, opt in enumerate(getattr(optimizer, "chained_optimizers", None) or [optimizer]):
        inner = opt.optimizer
        for g, group in enumerate(inner.param_groups):
            out[f"optimizer{i}.group{g}"] = {k: v for k, v in group.items() if k != "params"}
            for j, p in enumerate(group["params"]):
                out[f"optimizer{i}.group{g}.{j}.param"] = p.detach().clone()
                for k, v in inner.state.get(p, {}).items():
                    out[f"optimizer{i}.group{g}.{j}.{k}"] = (
                        v.detach().clone() if isinstance(v, torch.Tensor) else v)
    return out


def _same(a, b) -> bool:
    """Bit-exact equality of tensors (dtype, shape, bytes), arrays and nested containers."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or \
                a.dtype != b.dtype or a.shape != b.shape:
            return False
        flat = lambda t: t.detach().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
        return torch.equal(flat(a), flat(b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and \
            a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _compare(before: dict, after: dict) -> dict:
    """{'model': n, 'optimizer': n, 'other': n} bit-exact entries, and the mismatching keys."""
    bad = sorted(set(before) ^ set(after))
    counts = {"model": 0, "optimizer": 0, "other": 0}
    for key in sorted(set(before) & set(after)):
        if not _same(before[key], after[key]):
            bad.append(key)
        elif isinstance(before[key], torch.Tensor):
            counts["model" if key.startswith("model.") else "optimizer"] += 1
        else:
            counts["other"] += 1
    return {**counts, "mismatches": bad[:20]}


def _phase_worker(rank: int, job: dict) -> dict:
    """Load ``job['src']`` (format ``src_format``) at this layout, save it in ``dst_format``
    to ``job['dst']``, then load that into a fresh model/optimizer and compare."""
    device = torch.device("cpu")
    setup = setup_model_and_optimizer(job["args"], job["model_config"], device)
    plain, rng = _load(setup, job["src"], job["iteration"], job["src_format"], job["rng"])
    before = _snapshot(setup, plain, rng)
    model_sd = setup.unwrapped.sharded_state_dict()
    state: dict[str, Any] = {"model": model_sd, **plain}
    state["optimizer"] = optimizer_sharded_state_dict(
        setup.optimizer, model_sd, False,
        effective_optimizer_format(setup.optimizer, job["dst_format"]))
    if rng is not None:
        state["rng_state"] = rng_sharded_object(rng)
    save_state(job["dst"], job["iteration"], state, job["model_config"], job["extra_config"])
    del setup, state, model_sd
    fresh = setup_model_and_optimizer(job["args"], job["model_config"], device)
    after = _snapshot(fresh, *_load(fresh, job["dst"], job["iteration"], job["dst_format"],
                                    job["rng"]))
    return {**_compare(before, after), "train_state": plain.get("train_state")}


def _weights_worker(rank: int, job: dict) -> dict:
    """Load the model of the source and of the copy at this layout and compare them."""
    setup = setup_model_and_optimizer(job["args"], job["model_config"], torch.device("cpu"))
    plain, _ = _load(setup, job["src"], job["iteration"], None, False)
    before = _snapshot(setup, plain, None, False)
    after = _snapshot(setup, *_load(setup, job["dst"], job["iteration"], None, False), False)
    return {**_compare(before, after), "train_state": plain.get("train_state")}


# --- in the calling process ------------------------------------------------------------------
def _layout_of(run_config: dict) -> tuple[int, int, int]:
    parallel = run_config.get("parallel") or {}
    return tuple(int(parallel.get(k) or 1) for k in LAYOUT_KEYS)


def _check_save(save: str) -> None:
    if os.path.exists(save) and (not os.path.isdir(save) or os.listdir(save)):
        raise CheckpointError(f"--save {save} exists and is not an empty directory; refusing to "
                              f"overwrite it (choose a new directory)")


def _run_phase(log: Callable, name: str, worker, job: dict, layout) -> dict:
    start = time.time()
    world = layout[0] * layout[1] * layout[2]
    results = run_local_workers(worker, world, job, tp=layout[0], pp=layout[1],
                                seed=int(job["args"].seed))
    bad = sorted({k for r in results for k in r["mismatches"]})
    if bad:
        raise CheckpointError(f"verification failed after {name}: {len(bad)} entries differ "
                              f"from what was loaded, e.g. {bad[:5]}")
    total = {k: sum(r[k] for r in results) for k in ("model", "optimizer", "other")}
    total["train_state"] = results[0]["train_state"]
    log(f"{name}: {layout_str(layout)} ({world} rank{'s' if world > 1 else ''}), "
        f"{time.time() - start:.1f} s, verified: {total['model'] + total['optimizer']} tensors "
        f"bit-exact ({total['model']} model, {total['optimizer']} optimizer) + "
        f"{total['other']} settings/states")
    return total


def _target_config(run_config: dict, load: str, iteration: int, target: tuple, src_format,
                   dst_format, keep_rng: bool) -> dict:
    """The target's ``run_config.yaml`` entries besides model / parallel / iteration."""
    extra = {k: v for k, v in run_config.items()
             if k not in ("format", "iteration", "model", "parallel")}
    extra["has_rng_state"] = bool(keep_rng)
    extra["resharded_from"] = {"load": os.path.abspath(load), "iteration": iteration,
                               "parallel": dict(zip(LAYOUT_KEYS, _layout_of(run_config), strict=True)),
                               "optimizer_format": src_format}
    if run_config.get("has_optimizer_state", False):
        extra["optimizer_format"] = dst_format
        if "dist_ckpt_optim_fully_reshardable" in (extra.get("training") or {}):
            extra["training"] = {**extra["training"], "dist_ckpt_optim_fully_reshardable":
                                 dst_format == FULLY_RESHARDABLE}
    return extra


def _plan(load: str, save: str, target_sizes: tuple, iteration: int | None,
          fully_reshardable: bool | None) -> dict:
    """Check the request and decide layouts and formats (``reshard_checkpoint`` says what raises)."""
    if not os.path.isdir(load):
        raise CheckpointError(f"--load {load}: no such directory")
    iteration = read_tracker(load) if iteration is None else int(iteration)
    src_dir = iteration_dir(load, iteration)
    if not os.path.isdir(src_dir):
        raise CheckpointError(f"--load {load}: iteration {iteration} not found ({src_dir})")
    _check_save(save)
    run_config = read_run_config(load, iteration)
    model_config = OlmoHybridConfig.from_dict(run_config["model"])
    source = _layout_of(run_config)
    target = (target_sizes[0], target_sizes[1], target_sizes[2] or source[2])
    if min(target) < 1:
        raise ValueError(f"target sizes must be >= 1, got {layout_str(target)}")
    try:
        model_config.validate_parallel(target[0], target[1])
    except ConfigError as err:
        text = str(err).replace("--tensor-model", "--target-tensor").replace(
            "--pipeline-model", "--target-pipeline")
        raise ConfigError(f"target layout {layout_str(target)}: {text}") from None
    has_optimizer = bool(run_config.get("has_optimizer_state", False))
    src_format = saved_optimizer_format(run_config, src_dir) if has_optimizer else None
    dst_format = src_format if fully_reshardable is None or not has_optimizer else (
        FULLY_RESHARDABLE if fully_reshardable else DP_RESHARDABLE)
    source_rng = has_rng_state(run_config)
    keep_rng = target == source and source_rng
    extra = _target_config(run_config, load, iteration, target, src_format, dst_format, keep_rng)
    return dict(load=load, iteration=iteration, src_dir=src_dir, run_config=run_config,
                model_config=model_config, source=source, target=target,
                has_optimizer=has_optimizer, src_format=src_format, dst_format=dst_format,
                source_rng=source_rng, keep_rng=keep_rng, extra=extra)


def _copy_weights_only(plan: dict, out: str, log: Callable) -> dict:
    """No optimizer state: copy the files (global layout), record the target layout, check."""
    log("no optimizer state (converted or --no-save-optim checkpoint): model tensors are "
        "stored in their global layout, so the files are copied and the target layout "
        "recorded")
    it, target = plan["iteration"], plan["target"]
    shutil.copytree(plan["src_dir"], iteration_dir(out, it))
    cfg = {**plan["run_config"], **plan["extra"],
           "parallel": {**dict(zip(LAYOUT_KEYS, target, strict=True)), "context_parallel_size": 1}}
    with open(os.path.join(iteration_dir(out, it), RUN_CONFIG), "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    job = dict(model_config=plan["model_config"], iteration=it, extra_config=plan["extra"],
               src=plan["load"], dst=out, args=worker_args(plan["run_config"], target))
    return _run_phase(log, "check", _weights_worker, job, target)


def _rewrite_with_optimizer(plan: dict, tmp: str, out: str, log: Callable) -> list[dict]:
    """Phase 1 (a dp_reshardable source whose layout changes: to fully_reshardable at the source
    layout), then the last phase: load at the target layout, write the target format, verify."""
    common = dict(model_config=plan["model_config"], iteration=plan["iteration"],
                  extra_config=plan["extra"])
    src, src_format, phases = plan["load"], plan["src_format"], []
    if src_format == DP_RESHARDABLE and plan["target"] != plan["source"]:
        mid = os.path.join(tmp, "phase1")
        job = dict(common, src=src, dst=mid, src_format=src_format, dst_format=FULLY_RESHARDABLE,
                   rng=False, args=worker_args(plan["run_config"], plan["source"]))
        phases.append(_run_phase(log, "phase 1 (dp_reshardable -> fully_reshardable)",
                                 _phase_worker, job, plan["source"]))
        src, src_format = mid, FULLY_RESHARDABLE
    job = dict(common, src=src, dst=out, src_format=src_format, dst_format=plan["dst_format"],
               rng=bool(plan["keep_rng"]), args=worker_args(plan["run_config"], plan["target"]))
    phases.append(_run_phase(log, f"phase {len(phases) + 1} (-> {plan['dst_format']})",
                             _phase_worker, job, plan["target"]))
    return phases


def _publish(out: str, save: str, iteration: int) -> None:
    """Move the verified iteration into ``save`` and write the tracker last (atomically)."""
    _check_save(save)
    os.makedirs(save, exist_ok=True)
    os.replace(iteration_dir(out, iteration), iteration_dir(save, iteration))
    tracker_tmp = os.path.join(save, f".{TRACKER}.tmp")
    with open(tracker_tmp, "w") as f:
        f.write(f"{iteration}\n")
    os.replace(tracker_tmp, os.path.join(save, TRACKER))


def reshard_checkpoint(load: str, save: str, target_tensor_parallel_size: int,
                       target_pipeline_parallel_size: int,
                       target_data_parallel_size: int | None = None,
                       iteration: int | None = None,
                       fully_reshardable: bool | None = None,
                       log: Callable[[str], None] = print) -> dict:
    """Rewrite checkpoint ``load`` (tracker iteration, or ``iteration``) for the target layout
    into ``save`` (same iteration number), verified by loading it at that layout.

    Args:
        target_data_parallel_size: default: the source's DP.
        fully_reshardable: the target optimizer format (True: ``fully_reshardable``, False:
            ``dp_reshardable``); default: the source's.
    Returns: a summary dict (layouts, formats, phases, ``verified`` tensor count, seconds).
    Raises: CheckpointError for a missing ``--load`` / tracker / iteration, a non-empty
    ``--save``, or a failed verification (``--save`` is then left untouched); ConfigError for a
    layout the model cannot run at; ValueError for sizes < 1. Must run in a process without a
    process group (it forks the workers); on CPU.
    """
    start = time.time()
    plan = _plan(load, save, (target_tensor_parallel_size, target_pipeline_parallel_size,
                              target_data_parallel_size), iteration, fully_reshardable)
    iteration, source, target = plan["iteration"], plan["source"], plan["target"]
    has_optimizer, src_format, dst_format = (plan["has_optimizer"], plan["src_format"],
                                             plan["dst_format"])
    log(f"reshard {plan['src_dir']}: {layout_str(source)}"
        f"{f', optimizer {src_format}' if has_optimizer else ''} -> {layout_str(target)}"
        f"{f', optimizer {dst_format}' if has_optimizer else ''}")
    parent = os.path.dirname(os.path.abspath(save))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(save))}.reshard-",
                           dir=parent)
    try:
        out = os.path.join(tmp, "out")
        phases = (_rewrite_with_optimizer(plan, tmp, out, log) if has_optimizer
                  else [_copy_weights_only(plan, out, log)])
        _publish(out, save, iteration)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    last = phases[-1]
    verified = last["model"] + last["optimizer"]
    train_state = last.get("train_state") or {}
    seconds = time.time() - start
    log(f"wrote {iteration_dir(save, iteration)} in {seconds:.1f} s: verified: {verified} "
        f"tensors bit-exact at {layout_str(target)}"
        + (f"; iteration {train_state.get('iteration')}, consumed samples "
           f"{train_state.get('consumed_train_samples')}, scheduler state" if train_state else "")
        + ("; RNG state not carried (layout changed: a resume reseeds)"
           if plan["source_rng"] and not plan["keep_rng"] else ""))
    return {"save": save, "iteration": iteration, "source_layout": source,
            "target_layout": target, "source_format": src_format,
            "target_format": dst_format, "phases": phases, "verified": verified,
            "rng_carried": bool(plan["keep_rng"]), "seconds": seconds}
