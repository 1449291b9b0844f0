"""Patch #1 of docs/megatron_core_notes.md §2: Megatron's model-parallel RNG tracker on the CPU RNG.

megatron-core 0.16.1 keeps named RNG streams ("model-parallel-rng", "data-parallel-rng",
"expert-parallel-rng") as CUDA generator states (`tensor_parallel/random.py:235`). On a machine
without CUDA, `model_parallel_cuda_manual_seed` fails with
`AssertionError: Torch not compiled with CUDA enabled`, and without the seed call the first dropout
fails with `Exception: cuda rng state model-parallel-rng is not added`.

`CPURNGStatesTracker` keeps the same names and seeds, but stores CPU generator states: `add()` seeds
a fresh CPU generator, `fork()` swaps the named state into the global CPU RNG and saves the advanced
state on exit. So the stream of TP rank r is exactly
`torch.Generator().manual_seed(seed + 2718 + r)`, as Megatron's CUDA streams are on a GPU.
Recompute (`tensor_parallel.checkpoint`) saves/restores the CPU RNG and the tracker states, so
dropout is replayed identically.
"""
from __future__ import annotations

import contextlib

import torch

_DUMMY_CUDA_STATE = torch.zeros(0, dtype=torch.uint8)
_APPLIED = False

try:  # megatron-core is a hard dependency, but keep this module importable without it.
    from megatron.core.tensor_parallel import random as _mrandom

    _BASE = _mrandom.CudaRNGStatesTracker
    _MP_NAME = _mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME
except ImportError:  # pragma: no cover
    _mrandom = None
    _BASE = object
    _MP_NAME = "model-parallel-rng"


class CPURNGStatesTracker(_BASE):  # type: ignore[misc, valid-type]
    """Megatron's `CudaRNGStatesTracker` with every named state held by the CPU generator.

    Source: docs/megatron_core_notes.md §2 #1.
    """

    def add(self, name, seed):
        """Register stream `name` as a CPU generator seeded with `seed`.

        Raises `Exception` (Megatron's type and message) when `seed` or `name` was already added.
        """
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        self.states_[name] = gen.get_state()

    @contextlib.contextmanager
    def fork(self, name=_MP_NAME):
        """Run the body with stream `name` swapped into the CPU RNG; keep its advanced state after.

        The CPU RNG state outside the fork is restored afterwards (nested forks behave as in
        Megatron). Raises `Exception` when `name` was never added (Megatron's message), or when the
        current stream name changed inside the body.
        """
        if name not in self.states_:
            raise Exception(f"cuda rng state {name} is not added")
        orig_state = torch.get_rng_state()
        orig_name = self._current_state_name
        if orig_name != "default-rng":
            self.states_[orig_name] = orig_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            if self._current_state_name != name:
                raise Exception(
                    f"current state name {self._current_state_name} is not the same as the "
                    f"desired state name {name}."
                )
            self.states_[name] = torch.get_rng_state()
            if orig_name != "default-rng":
                orig_state = self.states_[orig_name]
            torch.set_rng_state(orig_state)
            self._current_state_name = orig_name


def _dummy_get_cuda_rng_state(device="cuda", clone=False, graph_safe=False):
    """Stand-in for `random._get_cuda_rng_state` without CUDA: an empty uint8 tensor."""
    return _DUMMY_CUDA_STATE


def _dummy_set_cuda_rng_state(new_state, device=-1, graph_safe=False):
    """Stand-in for `random._set_cuda_rng_state` without CUDA: does nothing."""
    return None


def apply() -> bool:
    """Install the CPU RNG tracker in `megatron.core.tensor_parallel.random` (idempotent).

    Sets `_CUDA_RNG_STATE_TRACKER` to a `CPURNGStatesTracker` (kept if one is already there),
    `_CUDA_RNG_STATE_TRACKER_INITIALIZED = True`, rebinds the module name `CudaRNGStatesTracker` so
    that `initialize_rng_tracker(force_reset=True)` also builds a CPU tracker, and replaces
    `_get_cuda_rng_state`/`_set_cuda_rng_state` (used by recompute's `_get_all_rng_states`) with
    dummies. Returns True when the patch is active. Call only when CUDA is unavailable.
    Source: docs/megatron_core_notes.md §2 #1.
    """
    global _APPLIED
    if _mrandom is None:  # pragma: no cover
        return False
    if not isinstance(_mrandom._CUDA_RNG_STATE_TRACKER, CPURNGStatesTracker):
        _mrandom._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    _mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _mrandom.CudaRNGStatesTracker = CPURNGStatesTracker
    _mrandom._get_cuda_rng_state = _dummy_get_cuda_rng_state
    _mrandom._set_cuda_rng_state = _dummy_set_cuda_rng_state
    _APPLIED = True
    return True


def is_applied() -> bool:
    """True when `apply()` ran and the tracker in megatron-core is still a CPU tracker."""
    return bool(
        _APPLIED
        and _mrandom is not None
        and isinstance(_mrandom._CUDA_RNG_STATE_TRACKER, CPURNGStatesTracker)
        and _mrandom._get_cuda_rng_state is _dummy_get_cuda_rng_state
    )
