"""megatron-core 0.16.1 compatibility layer (docs/design.md §5, docs/megatron_core_notes.md §2).

Call `apply_compat()` once per process after `import torch` and before seeding or building a model
(`megatron_hybrid.parallel.initialize_distributed` does it). It is idempotent and cheap after the
first call.

Patches (numbers of docs/megatron_core_notes.md §2):
  * without CUDA only (`cpu.py`, `rng.py`): #1 RNG tracker on the CPU generator, #2
    `torch.cuda.current_device`, #3 causal-mask helpers, #5 `torch.cuda.synchronize`, #6 one global
    torch-function mode mapping "cuda" devices to cpu plus `Tensor.cuda()` -> self (re-entered for
    megatron's recompute, which runs inside backward where modes are off), #7 argument-less
    `Tensor.type()` reporting `torch.cuda.<X>Tensor`;
  * on every device (`torch_norm.py`): #4 `WrappedTorchNorm` with sequence parallelism;
  * on every device (`safe_loading.py`): checkpoint objects unpickled with
    ``torch.load(weights_only=True)`` (torch's planner uses ``weights_only=False``);
  * #8 (`dist_checkpointing.save` into a missing directory) is handled where checkpoints are
    written, by `megatron_hybrid.checkpoint.storage.ensure_checkpoint_dir`. #9 (guard entry points
    with `if __name__ == "__main__":`) and #10 (`TORCHDYNAMO_DISABLE=1` in CPU tests) are usage rules.
"""
from __future__ import annotations

import threading

import torch

__all__ = ["apply_compat", "compat_status", "CPU_PATCHES"]

#: Names reported by `compat_status()` for the CUDA-less patches.
CPU_PATCHES = (
    "rng_tracker",
    "current_device",
    "causal_masks",
    "cuda_synchronize",
    "device_mode",
    "tensor_cuda",
    "tensor_type",
    "recompute_device_mode",
)

_LOCK = threading.RLock()


def apply_compat() -> dict:
    """Apply the megatron-core compatibility patches that this machine needs (idempotent).

    Without CUDA (`torch.cuda.is_available()` False): patches #1-#3 and #5-#7 of
    docs/megatron_core_notes.md §2; on every machine: #4 (`WrappedTorchNorm` + sequence parallel).
    The torch-function mode of #6/#7 is pushed on the calling thread's mode stack (once); call
    `apply_compat()` again from any other thread that runs megatron-core code. Must run before
    `model_parallel_cuda_manual_seed` and model construction. Returns `compat_status()`.
    Raises ImportError when megatron-core is not installed.
    Source: docs/megatron_core_notes.md §2 (rules after the table), docs/design.md §5.
    """
    with _LOCK:
        from . import safe_loading, torch_norm

        torch_norm.apply()
        safe_loading.apply()
        if not torch.cuda.is_available():
            from . import cpu, rng

            rng.apply()
            cpu.apply()
    return compat_status()


def compat_status() -> dict:
    """Which patches are active in this process/thread: {name: bool}.

    Keys: "cuda_available" (whether the CPU patches should be active), the names in
    `CPU_PATCHES` (all False on a CUDA machine) and "torch_norm" (#4). "device_mode" and
    "tensor_type" refer to the calling thread. Source: docs/megatron_core_notes.md §2.
    """
    from . import safe_loading, torch_norm

    status = {"cuda_available": torch.cuda.is_available(), "safe_loading": safe_loading.is_applied()}
    status.update({name: False for name in CPU_PATCHES})
    try:
        from . import cpu, rng

        status["rng_tracker"] = rng.is_applied()
        status.update(cpu.status())
    except ImportError:  # pragma: no cover
        pass
    status["torch_norm"] = torch_norm.is_applied()
    return status
