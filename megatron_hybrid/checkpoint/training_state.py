"""Training checkpoints: model, optimizer, LR scheduler, data position and RNG (``docs/design.md`` §7).

One megatron-core ``torch_dist`` checkpoint per save, in Megatron's layout
(``DIR/iter_XXXXXXX`` + ``latest_checkpointed_iteration.txt`` written last, ``run_config.yaml``
beside the tensors). Entries of the state dict:

* ``model``: the stage model's sharded state dict (global layout: reshards on load);
* ``optimizer``: the distributed optimizer in the ``fully_reshardable`` format (TP / PP / DP can
  change on resume) or, with ``--no-dist-ckpt-optim-fully-reshardable``, ``dp_reshardable`` (DP
  can change; ``tools/reshard_checkpoint.py`` changes TP / PP), with the fixes of
  ``optimizer_checkpoint`` (megatron-core bugs A-F). ``run_config.yaml`` records the format
  (``optimizer_format``; absent in older checkpoints: ``fully_reshardable``) and a resume loads
  the format the checkpoint was saved in;
* ``opt_param_scheduler``, ``train_state`` (iteration, consumed samples): plain objects;
* ``rng_state``: every rank's Python / NumPy / torch / CUDA / model-parallel tracker states, one
  shard per (PP, TP, DP) rank; restored only when the layout is unchanged (a resharded
  checkpoint holds none: ``has_rng_state: false``).
"""
from __future__ import annotations

import contextlib
import os
import random
from typing import Any

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_hybrid.checkpoint.optimizer import (
    DP_RESHARDABLE,
    FULLY_RESHARDABLE,
    OPTIMIZER_FORMATS,
    is_distributed_optimizer,
    load_optimizer_state,
    optimizer_sharded_state_dict,
)
from megatron_hybrid.checkpoint.storage import (
    TRACKER,
    CheckpointError,
    apply_model_state,
    current_layout,
    incomplete_iterations,
    iteration_dir,
    load_state,
    read_run_config,
    read_tracker,
    save_state,
)
from megatron_hybrid.parallel import print_rank_0


def _rng_coords():
    """(shape, offset) of this rank's RNG shard: (PP, TP, DP x CP); CP ranks differ too."""
    ps = parallel_state
    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size(with_context_parallel=True))
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank(with_context_parallel=True))
    return shape, offset


def get_rng_state() -> dict[str, Any]:
    """This process's RNG states (Python, NumPy, torch CPU, CUDA when present, MC tracker)."""
    state = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(),
             "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``get_rng_state`` returned."""
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if torch.cuda.is_available() and "cuda_rng_state" in state:
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def rng_sharded_object(state=None) -> ShardedObject:
    """The ``rng_state`` entry of a checkpoint: one shard per (PP, TP, DP) rank (``state`` None:
    the load template)."""
    shape, offset = _rng_coords()
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


def effective_optimizer_format(optimizer, requested: str) -> str:
    """The format an optimizer checkpoint is written in: ``requested`` for the distributed
    optimizer; ``fully_reshardable`` otherwise (a non-distributed optimizer's state is keyed like
    the model's and always reshards)."""
    return requested if is_distributed_optimizer(optimizer) else FULLY_RESHARDABLE


def saved_optimizer_format(run_config: dict, path: str = "checkpoint") -> str:
    """The optimizer format recorded in ``run_config.yaml`` (``fully_reshardable`` when absent).

    Raises: CheckpointError for an unknown value.
    """
    fmt = run_config.get("optimizer_format") or FULLY_RESHARDABLE
    if fmt not in OPTIMIZER_FORMATS:
        raise CheckpointError(f"{path}: run_config.yaml optimizer_format {fmt!r} is not one of "
                              f"{OPTIMIZER_FORMATS}")
    return fmt


def has_rng_state(run_config: dict) -> bool:
    """Whether a checkpoint holds RNG states: ``has_rng_state`` in ``run_config.yaml`` (false
    after a layout change by ``tools/reshard_checkpoint.py``); when absent, whether the trainer
    wrote it (a ``training`` section; converted checkpoints hold none)."""
    return bool(run_config.get("has_rng_state", "training" in run_config))


def reshard_command(root: str, layout: dict[str, int], extra: str = "") -> str:
    """The ``tools/reshard_checkpoint.py`` command line that rewrites ``root`` for the TP x PP of
    ``layout`` (a ``current_layout()`` dict)."""
    tp, pp = layout["tensor_model_parallel_size"], layout["pipeline_model_parallel_size"]
    root = os.path.normpath(root)
    return (f"python tools/reshard_checkpoint.py --load {root} --save {root}_tp{tp}_pp{pp} "
            f"--target-tensor-parallel-size {tp} --target-pipeline-parallel-size {pp}{extra}")


def _layout_str(layout: dict) -> str:
    return "TP={} x PP={} x DP={}".format(*(layout.get(k, "?") for k in (
        "tensor_model_parallel_size", "pipeline_model_parallel_size", "data_parallel_size")))


def check_optimizer_layout(run_config: dict, root: str, path: str) -> None:
    """Refuse to load a ``dp_reshardable`` optimizer at another TP or PP than it was saved at.

    Raises: CheckpointError naming both layouts and the ``tools/reshard_checkpoint.py`` command
    (DP may change: megatron-core reshards that format over DP).
    """
    if saved_optimizer_format(run_config, path) != DP_RESHARDABLE:
        return
    saved, current = run_config.get("parallel", {}), current_layout()
    if all(saved.get(k) == current[k] for k in ("tensor_model_parallel_size",
                                                "pipeline_model_parallel_size")):
        return
    raise CheckpointError(
        f"{path}: the optimizer state is dp_reshardable (saved with "
        f"--no-dist-ckpt-optim-fully-reshardable) at {_layout_str(saved)} and reshards over DP "
        f"only; this run is {_layout_str(current)}. Rewrite it for this layout first: "
        f"{reshard_command(root, current)} (or resume with --no-load-optim)")


@contextlib.contextmanager
def _dp_reshardable_hint(active: bool, root: str, path: str):
    """Re-raise a failed ``dp_reshardable`` load as a CheckpointError that says what that format
    needs (megatron-core's own errors there are shape mismatches and bare asserts)."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised with the hint, chained
        if not active:
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        command = reshard_command(root, current_layout(), " --dist-ckpt-optim-fully-reshardable")
        raise CheckpointError(
            f"{path}: loading its dp_reshardable optimizer state failed ({type(err).__name__}: "
            f"{first}). That format only loads into the DDP buckets it was saved from (same TP, "
            f"PP, --ddp-bucket-size, --overlap-grad-reduce); rewrite it as fully_reshardable "
            f"with {command} or resume with --no-load-optim") from err


def save_training_checkpoint(root: str, iteration: int, setup, model_config, train_state: dict,
                             extra_config: dict | None = None,
                             save_optimizer: bool = True,
                             optimizer_format: str = FULLY_RESHARDABLE, faults=None) -> str:
    """Save everything needed to resume at ``iteration`` (every rank calls this).

    Args:
        setup: the TrainingSetup (model, optimizer, scheduler).
        train_state: plain dict (iteration, consumed_train_samples, ...), stored as is.
        extra_config: more ``run_config.yaml`` entries (tokenizer, training flags, data).
        optimizer_format: ``fully_reshardable`` or ``dp_reshardable`` (distributed optimizer
            only); recorded as ``optimizer_format`` in ``run_config.yaml``.
        faults: the run's fault-injection hook (``training.fault_injection.FaultInjector``, tests
            only): its ``before_checkpoint_commit(iteration)`` runs after the tensors are written
            and before ``run_config.yaml`` and the tracker.
    Returns: the iteration directory. Raises: ValueError for an unknown ``optimizer_format``.
    """
    model_sd = setup.unwrapped.sharded_state_dict()
    state: dict[str, Any] = {"model": model_sd,
                             "opt_param_scheduler": setup.scheduler.state_dict(),
                             "train_state": dict(train_state),
                             "rng_state": rng_sharded_object(get_rng_state())}
    extra = dict(extra_config or {})
    if save_optimizer:
        fmt = effective_optimizer_format(setup.optimizer, optimizer_format)
        state["optimizer"] = optimizer_sharded_state_dict(setup.optimizer, model_sd,
                                                          is_loading=False, sharding_type=fmt)
        extra["optimizer_format"] = fmt
    before_commit = None if faults is None else (lambda: faults.before_checkpoint_commit(iteration))
    return save_state(root, iteration, state, model_config, extra, before_commit=before_commit)


#: Model-config fields that must match between a checkpoint and the model it is loaded into.
SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "kv_channels", "hybrid_layer_pattern", "linear_num_key_heads",
                "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                "linear_conv_kernel_dim", "vocab_size", "padded_vocab_size",
                "untie_embeddings_and_output_weights", "position_embedding_type")


def check_model_matches(run_config: dict, model_config, path: str) -> None:
    """Raise CheckpointError listing every shape field (flag name, saved vs current) that differs.

    megatron-core loads embedding / output tensors of another vocabulary size without complaint
    (``allow_shape_mismatch``), so the vocabulary is compared here explicitly.
    """
    saved = run_config.get("model", {})
    current = model_config.to_dict()
    diffs = [f"--{k.replace('_', '-')}: checkpoint {saved[k]!r}, this run {current[k]!r}"
             for k in SHAPE_FIELDS if k in saved and saved[k] != current.get(k)]
    if diffs:
        raise CheckpointError(f"{path} holds a different model than the flags describe:\n  "
                              + "\n  ".join(diffs))


def _is_distributed(optimizer) -> bool:
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(type(o).__name__ == "DistributedOptimizer" for o in subs)


def check_load_dir(root: str, finetune: bool) -> bool:
    """Whether ``root`` is a checkpoint to resume from (tracker present).

    Raises: CheckpointError when ``root`` is an ``iter_*`` directory or a file (point --load at
    the directory holding the tracker), or when ``--finetune`` names no checkpoint.
    """
    if os.path.isfile(os.path.join(root, TRACKER)):
        return True
    base = os.path.basename(os.path.normpath(root))
    if os.path.isfile(root) or base.startswith("iter_"):
        raise CheckpointError(f"--load {root}: expected the checkpoint directory holding "
                              f"{TRACKER} (e.g. {os.path.dirname(os.path.normpath(root)) or '.'})")
    if finetune:
        raise CheckpointError(f"--finetune --load {root}: no checkpoint there ({TRACKER} missing)")
    return False


#: Scheduler state keys compared on resume, with the flag that sets each.
SCHEDULER_FLAGS = {"max_lr": "--lr", "min_lr": "--min-lr", "lr_warmup_steps": "--lr-warmup-iters",
                   "lr_decay_steps": "--lr-decay-iters", "lr_decay_style": "--lr-decay-style",
                   "start_wd": "--weight-decay"}


def load_scheduler_state(scheduler, state: dict, policy: str, path: str) -> None:
    """Restore the LR/WD scheduler (its step count always; its settings by ``policy``).

    policy ``check`` (default): a setting that differs between flags and checkpoint is an error
    listing each (Megatron refuses too); ``flags``: the flags win; ``checkpoint``: the
    checkpoint wins. Raises: CheckpointError for ``check`` with differences.
    """
    current = scheduler.state_dict()
    if policy == "check":
        diffs = [f"{flag}: checkpoint {state[k]!r}, flags {current[k]!r}"
                 for k, flag in SCHEDULER_FLAGS.items() if k in state and state[k] != current[k]]
        if diffs:
            raise CheckpointError(
                f"{path}: the learning-rate schedule differs from the checkpoint's:\n  "
                + "\n  ".join(diffs) + "\n(--override-opt-param-scheduler keeps the flags, "
                "--use-checkpoint-opt-param-scheduler the checkpoint's)")
    if policy == "checkpoint":
        scheduler.override_opt_param_scheduler = False
        scheduler.use_checkpoint_opt_param_scheduler = True
    state = dict(state)
    if policy != "checkpoint":  # megatron-core keeps its own values when overriding
        state["wd_incr_steps"] = current["wd_incr_steps"]
    scheduler.load_state_dict(state)


def load_training_checkpoint(root: str, setup, *, finetune: bool = False,
                             load_optimizer: bool = True, load_rng: bool = True,
                             scheduler_policy: str = "check") -> dict[str, Any]:
    """Load the tracker's checkpoint of ``root`` into ``setup``; return its ``train_state``.

    * ``finetune``: model weights only; the returned train state starts at iteration 0.
    * The model and a ``fully_reshardable`` optimizer reshard to the current TP / PP / DP; a
      ``dp_reshardable`` optimizer (read in the format ``run_config.yaml`` records) to another
      DP only.
    * RNG states are restored only when the saved layout equals the current one and the
      checkpoint holds them.
    * Without optimizer state the optimizer's fp32 main weights are refreshed from the model.

    Raises: CheckpointError for a missing directory, a checkpoint without optimizer state when
    one is requested, or a ``dp_reshardable`` optimizer at another TP / PP (naming the
    ``tools/reshard_checkpoint.py`` command); megatron-core errors for missing tensors.
    """
    iteration = read_tracker(root)
    path = iteration_dir(root, iteration)
    if not os.path.isdir(path):
        raise CheckpointError(f"{root}/{TRACKER} names iteration {iteration} but {path} is missing")
    for partial in incomplete_iterations(root):
        print_rank_0(f" > warning: ignoring {partial}: an interrupted save (the tracker names "
                     f"iteration {iteration}); it is replaced when that iteration is saved again")
    run_config = read_run_config(root, iteration)
    check_model_matches(run_config, setup.unwrapped.model_config, path)
    saved_layout = run_config.get("parallel", {})
    same_layout = all(saved_layout.get(k) == v for k, v in current_layout().items())
    if finetune:
        load_optimizer = load_rng = False
    saved_dist_opt = run_config.get("training", {}).get("use_distributed_optimizer")
    current_dist_opt = _is_distributed(setup.optimizer)
    if load_optimizer and saved_dist_opt is not None and bool(saved_dist_opt) != current_dist_opt:
        raise CheckpointError(
            f"{path} was saved {'with' if saved_dist_opt else 'without'} "
            f"--use-distributed-optimizer and this run is "
            f"{'with' if current_dist_opt else 'without'} it: the optimizer state formats differ. "
            f"Use the same setting, or resume with --no-load-optim (fresh Adam moments)")
    if load_optimizer and not run_config.get("has_optimizer_state", False):
        raise CheckpointError(f"{path} holds no optimizer state (a converted or weights-only "
                              f"checkpoint): resume with --finetune or --no-load-optim")
    optimizer_format = saved_optimizer_format(run_config, path)
    if load_optimizer:
        check_optimizer_layout(run_config, root, path)
    restore_rng = load_rng and same_layout and has_rng_state(run_config)
    model_sd = setup.unwrapped.sharded_state_dict()
    request: dict[str, Any] = {"model": model_sd}
    if load_optimizer:
        request["optimizer"] = optimizer_sharded_state_dict(
            setup.optimizer, model_sd, is_loading=True,
            sharding_type=effective_optimizer_format(setup.optimizer, optimizer_format))
    if restore_rng:
        request["rng_state"] = rng_sharded_object()
    with _dp_reshardable_hint(load_optimizer and optimizer_format == DP_RESHARDABLE, root, path):
        loaded = load_state(request, path)
    apply_model_state(setup.unwrapped, loaded["model"], path)
    if load_optimizer:
        with _dp_reshardable_hint(optimizer_format == DP_RESHARDABLE, root, path):
            load_optimizer_state(setup.optimizer, loaded["optimizer"])
    else:
        setup.optimizer.reload_model_params()
    if restore_rng:
        set_rng_state(loaded["rng_state"])
    elif load_rng and not same_layout:
        print_rank_0(f" > checkpoint layout {saved_layout} differs from {current_layout()}: RNG "
                     f"state not restored (model and optimizer are resharded)")
    elif load_rng:
        print_rank_0(f" > {path} holds no RNG state (a resharded or converted checkpoint): RNG "
                     f"state not restored")
    if finetune:
        print_rank_0(f" > finetune: loaded model weights of iteration {iteration} from {root}")
        return {"iteration": 0, "consumed_train_samples": 0}
    if "opt_param_scheduler" in loaded:
        load_scheduler_state(setup.scheduler, loaded["opt_param_scheduler"], scheduler_policy,
                             path)
    train_state = dict(loaded.get("train_state", {"iteration": iteration}))
    train_state.setdefault("consumed_train_samples", 0)
    print_rank_0(f" > loaded checkpoint from {root} at iteration {iteration}")
    return train_state
