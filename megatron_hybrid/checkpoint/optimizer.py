"""Correct distributed-optimizer checkpoints on megatron-core 0.16.1, in two formats.

``fully_reshardable`` (the default; reshards TP, PP and DP on load) and ``dp_reshardable``
(``--no-dist-ckpt-optim-fully-reshardable``: each rank writes its own bucket shards, no gather;
reshards DP only, ``tools/reshard_checkpoint.py`` changes TP / PP). Without Transformer Engine or
apex, megatron-core's ``DistributedOptimizer`` wraps ``torch.optim.Adam``/``AdamW`` and its
checkpoint code has these bugs (docs/megatron_core_notes.md §5, docs/design.md §7). Line numbers refer to
``megatron/core/optimizer/distrib_optimizer.py`` of the 0.16.1 wheel (unchanged in 0.19.2):

  A ``state_dict()`` :640-643 (``not HAVE_APEX_OR_TE``): ``assert len(steps) == 1`` over the
    torch optimizer's per-param states. A fresh optimizer has no state (torch Adam creates it
    lazily in its first ``step()``), so ``sharded_state_dict(is_loading=True)`` - the load
    template - fails with ``AssertionError``. Fix (``optimizer_sharded_state_dict``): give every
    stateless param the state Adam would create (step 0, zero moments) first. Both formats.
  B ``_set_main_param_and_optimizer_states`` :935-940: copies *every destination key*
    (``param``, ``step``, ``exp_avg``, ``exp_avg_sq``) from the loaded tensors, but the
    ``fully_reshardable``, ``dp_zero`` and model-space loaders never supply ``step``:
    ``KeyError: 'step'``. ``dp_reshardable`` (:1772) supplies the load template's stale ``step``
    (0 for a fresh optimizer: every resumed step would use step 1's bias correction, silently)
    and calls without ``no_grad`` (fp32 main params are views of leaf params: ``RuntimeError: a
    view of a leaf Variable that requires grad is being used in an in-place operation``).
    Fix: copy the loaded tensor states except ``step`` under ``no_grad`` (``step`` comes from the
    param groups; a missing key other than ``step`` still fails loudly). Both formats.
  C ``load_state_dict`` :818-825 (``not HAVE_APEX_OR_TE``): ``s["step"] = step`` puts *one*
    tensor into every param's state. torch Adam's ``step_t += 1`` then bumps it once per param, so
    after a load every param but the first uses a wrong bias correction. Silent: the 2nd resumed
    step drifts. Fix: after loading, give each param its own copy of ``step``. Both formats.
  D ``sharded_param_state_fully_reshardable`` :1476-1501: slices the world tensors of
    ``get_parameter_state_dp_zero`` (:1108-1118 strip every bucket's end padding) with the padded
    offsets of ``buffer.param_index_map``. With several DDP buckets in one buffer (small
    ``bucket_size``, or PP > 1 with tied embeddings, whose shared embedding gets its own bucket)
    every param after the first padded bucket is saved shifted, or zero-padded past the end with a
    logger WARNING only. Silent. Fix (same idea as upstream Megatron-LM PR #5077, written here
    independently): index the world tensors with offsets minus the end padding of the earlier
    buckets of the same buffer, and fail loudly if an offset still overruns.
    ``fully_reshardable`` only (``dp_reshardable`` uses bucket-local ranges, which are right).
  F ``sharded_param_state_dp_reshardable`` :1612-1645: pads each rank's last gap up to the end of
    its shard whenever the bucket's ``numel_unpadded`` exceeds its last param's end, which DDP
    produces for the bucket before a shared embedding (PP > 1 with tied embeddings): the chunk
    overruns the bucket tensor and the save fails on the coordinating rank (``ValueError: Failed
    to validate global plan ... out of bounds chunk``) while the other ranks wait in a collective.
    Fix: run it with buckets whose ``numel_unpadded`` ends at their last param.
    ``dp_reshardable`` only.

``apply_distrib_optimizer_fixes()`` patches B, C, D, F at class level (idempotent). B and C only
act on the torch-optimizer branches (``HAVE_APEX_OR_TE`` False, not precision-aware, not the
``HybridDeviceOptimizer``); with TE/apex they call the upstream code unchanged. D and F are not
specific to TE/apex and apply everywhere. None of the bugs is CUDA-specific.
"""
from __future__ import annotations

import contextlib
import threading

import torch

__all__ = [
    "FULLY_RESHARDABLE",
    "DP_RESHARDABLE",
    "OPTIMIZER_FORMATS",
    "SHARDING_METADATA",
    "apply_distrib_optimizer_fixes",
    "optimizer_sharded_state_dict",
    "is_distributed_optimizer",
    "load_optimizer_state",
    "fixes_applied",
    "UPSTREAM",
]

#: The distributed-optimizer checkpoint formats (docs/megatron_core_notes.md §6): reshards TP, PP and
#: DP (the default) / reshards DP only (faster: no gather on DP rank 0).
FULLY_RESHARDABLE = "fully_reshardable"
DP_RESHARDABLE = "dp_reshardable"
OPTIMIZER_FORMATS = (FULLY_RESHARDABLE, DP_RESHARDABLE)

#: metadata for ``sharded_state_dict`` of the default format (reshards TP, PP and DP).
SHARDING_METADATA = {"distrib_optim_sharding_type": FULLY_RESHARDABLE}

#: upstream functions replaced by ``apply_distrib_optimizer_fixes``, by attribute name
#: (tests put them back in a forked worker to show each bug).
UPSTREAM: dict[str, object] = {}

_LOCK = threading.Lock()
_FIX_ATTR = "_megatron_hybrid_fix"


def _dopt():
    from megatron.core.optimizer import distrib_optimizer

    return distrib_optimizer


def _torch_optimizer_branch(opt) -> bool:
    """True when `opt` (a DistributedOptimizer) runs the ``not HAVE_APEX_OR_TE`` code paths."""
    m = _dopt()
    return (not m.HAVE_APEX_OR_TE
            and not isinstance(opt.optimizer, m.HybridDeviceOptimizer)
            and not opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)


def _sub_optimizers(optimizer) -> list:
    """The optimizers inside a ChainedOptimizer, or [optimizer]."""
    chained = getattr(optimizer, "chained_optimizers", None)
    return list(chained) if chained is not None else [optimizer]


def _distributed(optimizer) -> list:
    cls = _dopt().DistributedOptimizer
    return [o for o in _sub_optimizers(optimizer) if isinstance(o, cls)]


# --- A: zero state for stateless params ------------------------------------------------------
@torch.no_grad()
def _zero_init_missing_state(opt) -> int:
    """Fix A: give each param of the inner torch Adam/AdamW without state the state that
    ``torch.optim.Adam._init_group`` would create at its first step (``step`` 0, zero
    ``exp_avg``/``exp_avg_sq``, plus ``max_exp_avg_sq`` with amsgrad); returns how many.

    Equivalent to Adam's lazy init (same values, dtypes, devices), so training from it is
    unchanged; it only makes ``state_dict()`` (:640-643) see one common step.
    """
    inner = opt.optimizer
    if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        return 0
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    count = 0
    for group in inner.param_groups:
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            state = inner.state[p]
            if len(state) > 0:
                continue
            state["step"] = (torch.zeros((), dtype=scalar, device=p.device) if on_device
                             else torch.tensor(0.0, dtype=scalar))
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            count += 1
    return count


# --- B: copy only the loaded keys ------------------------------------------------------------
@torch.no_grad()
def _set_main_param_and_optimizer_states(self, model_param, tensors):
    """Fix B for ``DistributedOptimizer._set_main_param_and_optimizer_states`` (:911-940).

    Upstream loops over the destination keys (``param`` + the torch Adam state, which includes
    ``step``) and indexes the loaded ``tensors`` with each: ``KeyError: 'step'``, because the
    ``fully_reshardable``/``dp_zero`` loaders never load ``step`` (it travels in the param groups).
    ``dp_reshardable`` (``load_parameter_state_from_dp_reshardable`` :1772) does pass a ``step``,
    but it is the load template's own (a ``LocalNonpersistentObject``: the step the optimizer had
    when the template was built, 0 for a fresh one), plus a ``padding`` flag; and it runs without
    ``no_grad``, so copying into fp32 main params (views of the model's leaf params) raises
    ``RuntimeError: a view of a leaf Variable that requires grad is being used in an in-place
    operation``. Here the loaded tensor states other than ``step`` are copied under ``no_grad``
    (``step`` always comes from the checkpoint's param groups); a missing key other than ``step``
    or an unknown tensor key raises.
    """
    if not _torch_optimizer_branch(self):
        return UPSTREAM["_set_main_param_and_optimizer_states"](self, model_param, tensors)
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    dst_tensors = {"param": main_param, **self.optimizer.state[main_param]}
    loaded = {k: v for k, v in tensors.items() if k != "step" and isinstance(v, torch.Tensor)}
    missing = sorted(set(dst_tensors) - set(loaded) - {"step"})
    unknown = sorted(set(loaded) - set(dst_tensors))
    if missing or unknown:
        raise KeyError(f"optimizer state {missing} not in the loaded tensors {sorted(tensors)}"
                       if missing else f"loaded optimizer state {unknown} unknown to the "
                       f"optimizer (has {sorted(dst_tensors)})")
    for key, value in loaded.items():
        dst_tensors[key].copy_(value)


_set_main_param_and_optimizer_states._megatron_hybrid_fix = "B"


# --- C: one step tensor per param ------------------------------------------------------------
def _untie_steps(opt) -> int:
    """Fix C: give every param state whose ``step`` tensor is shared with another its own copy."""
    seen, count = set(), 0
    for state in opt.optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                state["step"] = step.detach().clone()
                count += 1
            seen.add(id(state["step"]))
    return count


def _load_state_dict(self, state_dict):
    """Fix C for ``DistributedOptimizer.load_state_dict`` (:690-881).

    Upstream (:818-825, ``not HAVE_APEX_OR_TE``) stores one ``step`` tensor in every param's
    state; torch Adam increments it in place once per param per step, so each param's bias
    correction uses a wrong step after a load (silent drift from the 2nd resumed step). This runs
    the upstream method, then unties the steps. It also repairs the template load that
    ``sharded_state_dict(is_loading=True)`` performs (:1268).
    """
    UPSTREAM["load_state_dict"](self, state_dict)
    if _torch_optimizer_branch(self):
        _untie_steps(self)


_load_state_dict._megatron_hybrid_fix = "C"


# --- D: padding-free offsets in fully_reshardable --------------------------------------------
class _UnpaddedOffsetsBuffer:
    """A ``_ParamAndGradBuffer`` seen through offsets that skip the buckets' end padding.

    ``param_index_map`` maps each param to ``(start - s_b, end - s_b, b)``, s_b being the end
    padding of the buckets before its bucket ``b`` in this buffer: exactly the layout of the
    world tensors of ``get_parameter_state_dp_zero`` (each bucket's first ``numel_unpadded``
    elements, concatenated). Every other attribute is the buffer's own.
    """

    def __init__(self, buffer):
        self._buffer = buffer
        stripped, shift = 0, []
        for bucket_id, bucket in enumerate(buffer.buckets):
            start, end = buffer.bucket_indices[bucket_id]
            shift.append(stripped)
            stripped += (end - start) - bucket.numel_unpadded
        self.param_index_map = {}
        for param, (start, end, bucket_id) in buffer.param_index_map.items():
            start, end = start - shift[bucket_id], end - shift[bucket_id]
            if not 0 <= start <= end <= buffer.numel_unpadded:
                raise RuntimeError(
                    f"distributed-optimizer checkpoint: param range [{start}, {end}) of bucket "
                    f"{bucket_id} exceeds the {buffer.numel_unpadded} unpadded buffer elements")
            self.param_index_map[param] = (start, end, bucket_id)

    def __getattr__(self, name):
        return getattr(self._buffer, name)


@contextlib.contextmanager
def _buffers_seen_as(optimizer, view):
    """Run an upstream method with ``optimizer.buffers`` replaced by ``view(buffer)`` wrappers;
    the real buffers are restored afterwards."""
    buffers = optimizer.buffers
    optimizer.buffers = [view(b) for b in buffers]
    try:
        yield
    finally:
        optimizer.buffers = buffers


def _sharded_param_state_fully_reshardable(self, model_sharded_state_dict, is_loading=False,
                                           metadata=None):
    """Fix D for ``DistributedOptimizer.sharded_param_state_fully_reshardable`` (:1404-1537).

    Upstream indexes the padding-stripped world tensors (:1108-1118) with the padded offsets of
    ``buffer.param_index_map`` (:1479, :1501): with several buckets in one buffer, params after
    the first padded bucket read shifted values, or zeros past the end (:1504-1517, a WARNING
    only). The upstream method runs unchanged while ``self.buffers`` holds
    ``_UnpaddedOffsetsBuffer`` views (the only offsets it reads are ``param_index_map``'s); the
    real buffers are restored afterwards. The loader (:2070) reads param-relative ranges only.
    """
    with _buffers_seen_as(self, _UnpaddedOffsetsBuffer):
        return UPSTREAM["sharded_param_state_fully_reshardable"](
            self, model_sharded_state_dict, is_loading, metadata)


_sharded_param_state_fully_reshardable._megatron_hybrid_fix = "D"

# --- F: dp_reshardable end padding inside numel_unpadded -------------------------------------
class _TrimmedBucket:
    """A bucket seen with ``numel_unpadded`` ending at its last param (other attributes its own)."""

    def __init__(self, bucket, numel_unpadded: int):
        self._bucket = bucket
        self.numel_unpadded = numel_unpadded

    def __getattr__(self, name):
        return getattr(self._bucket, name)


class _TrimmedBucketsBuffer:
    """A ``_ParamAndGradBuffer`` whose buckets' ``numel_unpadded`` stop at their last param.

    DDP closes the bucket before a shared embedding at the *aligned* start of that embedding
    (``_update_bucket_metadata(param_start_index)`` after ``_pad_start_of_param_if_needed``), so
    that bucket's ``numel_unpadded`` includes up to 63 alignment elements after its last param.
    """

    def __init__(self, buffer):
        self._buffer = buffer
        ends: dict[int, int] = {}
        for _start, end, bucket_id in buffer.param_index_map.values():
            ends[bucket_id] = max(ends.get(bucket_id, 0), end)
        self.buckets = []
        for bucket_id, bucket in enumerate(buffer.buckets):
            last = ends[bucket_id] - buffer.bucket_indices[bucket_id][0]
            self.buckets.append(_TrimmedBucket(bucket, min(bucket.numel_unpadded, last)))

    def __getattr__(self, name):
        return getattr(self._buffer, name)


def _sharded_param_state_dp_reshardable(self, model_sharded_state_dict, is_loading=False,
                                        metadata=None):
    """Fix F for ``DistributedOptimizer.sharded_param_state_dp_reshardable`` (:1539-1687).

    Upstream stores each bucket as one tensor of ``numel_unpadded`` elements and fills the gaps
    between a rank's params with padding chunks, the last one running to the end of the rank's
    shard whenever the last param ends before ``numel_unpadded``. That happens for the bucket that
    precedes a shared embedding (PP > 1 with tied embeddings: its ``numel_unpadded`` includes the
    embedding's start alignment), and the chunk then overruns the tensor: the save fails with
    ``ValueError: Failed to validate global plan: ... has out of bounds chunk``. The upstream
    method runs unchanged while ``self.buffers`` holds views whose buckets end at their last
    param (the checked ``per_bucket_numel_unpadded`` is untouched); saves and load templates
    both use the views, so they agree at any DP.
    """
    with _buffers_seen_as(self, _TrimmedBucketsBuffer):
        return UPSTREAM["sharded_param_state_dp_reshardable"](
            self, model_sharded_state_dict, is_loading, metadata)


_sharded_param_state_dp_reshardable._megatron_hybrid_fix = "F"

_PATCHES = {
    "_set_main_param_and_optimizer_states": _set_main_param_and_optimizer_states,
    "load_state_dict": _load_state_dict,
    "sharded_param_state_fully_reshardable": _sharded_param_state_fully_reshardable,
    "sharded_param_state_dp_reshardable": _sharded_param_state_dp_reshardable,
}


def apply_distrib_optimizer_fixes() -> None:
    """Patch ``megatron.core.optimizer.distrib_optimizer.DistributedOptimizer`` for bugs B, C, D,
    F (class level; idempotent; thread-safe). Fix A needs an optimizer instance and lives in
    ``optimizer_sharded_state_dict``. Harmless with TE/apex: B and C then defer to upstream, D
    only changes the offsets of buffers that hold several buckets (upstream's are wrong there)
    and F only the padding of buckets that end in alignment padding.
    Source: docs/megatron_core_notes.md §5, the module docstring.
    """
    with _LOCK:
        cls = _dopt().DistributedOptimizer
        for name, fix in _PATCHES.items():
            current = cls.__dict__[name]
            if getattr(current, _FIX_ATTR, None) is not None:
                continue
            UPSTREAM[name] = current
            fix.__wrapped__ = current
            setattr(cls, name, fix)


def fixes_applied() -> dict[str, bool]:
    """{fix letter: whether DistributedOptimizer currently carries it} for B, C, D, F."""
    cls = _dopt().DistributedOptimizer
    return {getattr(fix, _FIX_ATTR): getattr(cls.__dict__[name], _FIX_ATTR, None) is not None
            for name, fix in _PATCHES.items()}


def optimizer_sharded_state_dict(optimizer, model_sharded_state_dict: dict, is_loading: bool,
                                 sharding_type: str = FULLY_RESHARDABLE) -> dict:
    """The optimizer's entry of a ``dist_checkpointing`` save/load state dict.

    Args:
        optimizer: what ``megatron.core.optimizer.get_megatron_optimizer`` returns: a
            ChainedOptimizer (of DistributedOptimizers or not) or a single MegatronOptimizer.
        model_sharded_state_dict: ``model.sharded_state_dict()`` of the same model (the optimizer
            state is keyed like the model's tensors).
        is_loading: False to save, True for the load template.
        sharding_type: the distributed optimizer's format, ``fully_reshardable`` (reshards TP,
            PP and DP) or ``dp_reshardable`` (reshards DP only); a load must name the format the
            checkpoint was saved in. Non-distributed optimizers ignore it (their state is keyed
            like the model's and always reshards).

    Applies the class fixes, then fix A: stateless params of a torch Adam inside a
    DistributedOptimizer get a zero state (what Adam's first step would create), so a fresh
    optimizer can build a load template and a never-stepped one can be saved.
    Raises: ValueError for an unknown ``sharding_type``.
    """
    if sharding_type not in OPTIMIZER_FORMATS:
        raise ValueError(f"optimizer checkpoint format {sharding_type!r}: expected one of "
                         f"{OPTIMIZER_FORMATS}")
    apply_distrib_optimizer_fixes()
    for opt in _distributed(optimizer):
        if _torch_optimizer_branch(opt):
            _zero_init_missing_state(opt)
    return optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading,
                                        metadata={"distrib_optim_sharding_type": sharding_type})


def is_distributed_optimizer(optimizer) -> bool:
    """Whether ``optimizer`` (or one optimizer of a ChainedOptimizer) is a DistributedOptimizer,
    i.e. whether its checkpoint format depends on ``sharding_type``."""
    return bool(_distributed(optimizer))


def load_optimizer_state(optimizer, loaded_state_dict: dict) -> None:
    """Load the ``optimizer`` entry returned by ``dist_checkpointing.load`` into ``optimizer``.

    ``optimizer.load_state_dict(loaded_state_dict)`` with the class fixes applied (B: no
    ``KeyError: 'step'``, no stale ``dp_reshardable`` step; C: each param its own ``step``
    tensor, checked again here). Either format (the loaded dict names its own). Call it
    after the model weights are loaded; with the distributed optimizer the main params come from
    the optimizer state.
    """
    apply_distrib_optimizer_fixes()
    optimizer.load_state_dict(loaded_state_dict)
    for opt in _distributed(optimizer):
        if _torch_optimizer_branch(opt):
            _untie_steps(opt)
