"""CUDA-only patches #2, #3, #5, #6, #7 of docs/megatron_core_notes.md §2 (apply only without CUDA).

megatron-core 0.16.1 hard-codes CUDA in many places; on a CPU-only torch they fail with
`AssertionError: Torch not compiled with CUDA enabled`. Each patch below is the minimal fix from the
notes; `apply()` installs them once (idempotent). #1 (RNG tracker) lives in `rng.py`, #4 (torch
norm) in `torch_norm.py`, #8 (checkpoint dir) in `checkpoint.py`.

#2 `torch.cuda.current_device()` -> `torch.device("cpu")` (175 call sites pass it as `device=`).
#3 `get_default_causal_mask`/`get_sliding_window_causal_mask` (`device="cuda"`) rebound to CPU
   versions in `transformer/utils.py` and `fusions/fused_softmax.py` (which imports them by name).
   Patched directly because recompute re-runs forward inside `.backward()`, where #6 is off.
#5 `torch.cuda.synchronize` -> no-op (p2p communication).
#6 one global `TorchFunctionMode`: `device=` kwargs and `Tensor.to` devices "cuda", "cuda:N",
   torch.device("cuda", N) and int N become cpu; `Tensor.cuda()` returns self. `torch.Tensor.cuda`
   itself also returns self, since torch-function modes are off inside autograd backward and in
   other threads.
   The autograd engine runs backward with an empty mode stack, so megatron's recompute
   (`CheckpointFunction.backward`, `CheckpointWithoutOutput._recompute`), which re-runs forward
   code inside backward, is wrapped to re-enter the mode for the recomputation (an addition to the
   notes: literal "cuda" in any recomputed forward then works, not only the patched masks).
#7 in that mode, argument-less `Tensor.type()` on a CPU tensor reports `torch.cuda.<X>Tensor`
   (the distributed optimizer and `clip_grads` compare against those strings).
"""
from __future__ import annotations

import contextlib
import functools
import threading

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

_CPU = torch.device("cpu")
_ORIG_TENSOR_CUDA = torch._C.TensorBase.cuda
_TENSOR_TO = torch._C.TensorBase.to
_TENSOR_TYPE = torch._C.TensorBase.type
_LOCK = threading.Lock()


def is_cuda_device(device) -> bool:
    """True when `device` denotes a CUDA device: "cuda", "cuda:N", torch.device("cuda") or int N.

    Bools are not devices. Source: docs/megatron_core_notes.md §2 #6.
    """
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _tensor_cuda(self, device=None, non_blocking=False, memory_format=None):
    """`Tensor.cuda()` without CUDA: the tensor itself (megatron-core calls it on CPU tensors)."""
    return self


class CudaToCpuMode(TorchFunctionMode):
    """Torch-function mode mapping CUDA device requests to the CPU (docs/megatron_core_notes.md §2 #6, #7).

    Entered once, globally, by `apply()`; not meant to be used as a context manager elsewhere.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _TENSOR_TYPE and len(args) == 1 and kwargs.get("dtype") is None:
            name = func(*args, **kwargs)
            if name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch."):]
            return name
        if func is _ORIG_TENSOR_CUDA:
            return args[0]
        if "device" in kwargs and is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
        if func is _TENSOR_TO and len(args) > 1 and is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


_MODE = CudaToCpuMode()


def _mode_active() -> bool:
    """True when the global `CudaToCpuMode` is on this thread's torch-function-mode stack."""
    return any(m is _MODE for m in _get_current_function_mode_stack())


@contextlib.contextmanager
def _mode_entered():
    """Enter the global mode for the body unless it is already active on this thread."""
    if _mode_active():
        yield
        return
    with _MODE:
        yield


def _with_mode(fn):
    """Wrap `fn` so that it runs with the global mode active (marks the wrapper for idempotency)."""
    if getattr(fn, "_mh_with_mode", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _mode_entered():
            return fn(*args, **kwargs)

    wrapper._mh_with_mode = True
    return wrapper


def _patch_recompute() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    backward = mrandom.CheckpointFunction.__dict__["backward"]  # a staticmethod object
    backward = getattr(backward, "__func__", backward)
    mrandom.CheckpointFunction.backward = staticmethod(_with_mode(backward))
    cls = mrandom.CheckpointWithoutOutput
    cls._recompute = _with_mode(cls.__dict__["_recompute"])


def _recompute_patched() -> bool:
    from megatron.core.tensor_parallel import random as mrandom

    return bool(getattr(mrandom.CheckpointFunction.backward, "_mh_with_mode", False)
                and getattr(mrandom.CheckpointWithoutOutput._recompute, "_mh_with_mode", False))


def default_causal_mask_cpu(sq: int) -> torch.Tensor:
    """CPU version of megatron's `get_default_causal_mask`: [sq, sq] bool, True = masked (j > i)."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool, device=_CPU), diagonal=1)


def sliding_window_causal_mask_cpu(sq, skv, window_size) -> torch.Tensor:
    """CPU version of megatron's `get_sliding_window_causal_mask`: [sq, skv] bool, True = masked."""
    m = torch.ones(sq, skv, dtype=torch.bool, device=_CPU)
    mu = torch.triu(m, diagonal=skv - sq - window_size[0])
    ml = torch.tril(mu, diagonal=skv - sq + window_size[1])
    return ~ml


def _current_device_cpu():
    """`torch.cuda.current_device()` without CUDA: the CPU device."""
    return _CPU


def _synchronize_noop(device=None):
    """`torch.cuda.synchronize()` without CUDA: nothing to wait for."""
    return None


def _patch_masks() -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    for mod in (tutils, fused_softmax):
        mod.get_default_causal_mask = default_causal_mask_cpu
        mod.get_sliding_window_causal_mask = sliding_window_causal_mask_cpu


def apply() -> dict:
    """Install patches #2, #3, #5, #6 (+ recompute wrapper), #7 (idempotent; mode once per thread).

    Returns `status()`. Raises RuntimeError when CUDA is available (these patches would hide real
    devices). Source: docs/megatron_core_notes.md §2.
    """
    if torch.cuda.is_available():
        raise RuntimeError("megatron_hybrid.compat.cpu patches are for machines without CUDA")
    with _LOCK:
        torch.cuda.current_device = _current_device_cpu
        _patch_masks()
        torch.cuda.synchronize = _synchronize_noop
        torch.Tensor.cuda = _tensor_cuda
        _patch_recompute()
        if not _mode_active():
            _MODE.__enter__()  # global for this thread; never exited
    return status()


def status() -> dict:
    """Which of the patches of this module are active (device_mode/tensor_type: on this thread)."""
    from megatron.core.fusions import fused_softmax

    active = _mode_active()
    return {
        "current_device": torch.cuda.current_device is _current_device_cpu,
        "causal_masks": fused_softmax.get_default_causal_mask is default_causal_mask_cpu
        and fused_softmax.get_sliding_window_causal_mask is sliding_window_causal_mask_cpu,
        "cuda_synchronize": torch.cuda.synchronize is _synchronize_noop,
        "device_mode": active,
        "tensor_cuda": torch.Tensor.cuda is _tensor_cuda,
        "tensor_type": active,
        "recompute_device_mode": _recompute_patched(),
    }
