"""fla 0.6.0's Hopper guard for the gated chunk backward, and the opt-in GPU self-check that may lift it.

Letters used in shapes:
    B batch (1); T tokens; H key heads; HV value heads; K, V head dims; N sequences

The fact (docs/model.md §11 "Hopper", docs/gpu.md; fla issue #640): in fla-core 0.6.0,
``fla/ops/common/chunk_o.py::chunk_bwd_dqkwg`` raises RuntimeError when
``g is not None and IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1``
(module globals imported there from ``fla.utils``; ``TRITON_ABOVE_3_7_1`` means
triton.__version__ >= 3.7.1), because Triton 3.4 - 3.7.0 miscompiles that kernel at BK = 64 on sm_90.
The function is dispatched: when TileLang is installed (and nvcc usable) fla routes the kernel to
TileLang on affected Hoppers and the guard is never reached.

Policy (design: never lift silently):
  * default: when the guard would fire, raise a RuntimeError that names the fixes before the first
    fla GDN forward that needs a backward (fail fast, not after a full forward);
  * opt-in ``MEGATRON_HYBRID_FLA_HOPPER_SELFCHECK=1``: on first use per (K, V, dtype), lift the guard
    temporarily, run a gradient self-check of fla against the fp64 PyTorch chunked path on this GPU
    (bf16 and fp32; o, final state and the gradients of q, k, v, g, beta, initial_state by norm-wise
    relative error ||a - b|| / ||b||), lift it permanently only if every error is <= 2e-2 (bf16/fp16)
    / 1e-2 (fp32), and log (WARNING, logger "megatron_hybrid.runtime") what was measured. Otherwise
    keep the guard and raise with the measured errors.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time

import torch

__all__ = [
    "ENV_SELFCHECK", "TOLERANCES", "triton_in_affected_range", "fla_guard_would_fire", "guard_decision",
    "selfcheck_passed", "run_fla_gdn_selfcheck", "ensure_fla_gdn_backward_allowed", "hopper_selfcheck_result",
]

logger = logging.getLogger("megatron_hybrid.runtime")

ENV_SELFCHECK = "MEGATRON_HYBRID_FLA_HOPPER_SELFCHECK"
TOLERANCES = {"bfloat16": 2e-2, "float16": 2e-2, "float32": 1e-2}
_FIX = ("Fix: install Triton >= 3.7.1, or `pip install tilelang` (fla then runs this kernel with TileLang), "
        f"or set {ENV_SELFCHECK}=1 to lift fla's guard only after a gradient self-check of fla against the "
        "PyTorch path passes on this GPU, or use the PyTorch kernels (MEGATRON_HYBRID_KERNELS=torch).")

_ORIGINAL_FLAG: bool | None = None  # fla's chunk_o.TRITON_ABOVE_3_7_1 as first seen (before we touch it)
_INFO: dict | None = None
_RESULTS: dict[tuple, dict] = {}
_LAST: dict | None = None


def _version_tuple(version: str) -> tuple[int, int, int]:
    nums = [int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3]]
    return tuple(nums + [0] * (3 - len(nums)))  # type: ignore[return-value]


def triton_in_affected_range(triton_version: str) -> bool:
    """True for Triton >= 3.4.0 and < 3.7.1 (fla's TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1).

    Pre-releases count as their release number (``3.7.1rc1`` is treated as 3.7.1).
    """
    return (3, 4, 0) <= _version_tuple(triton_version) < (3, 7, 1)


def fla_guard_would_fire(*, is_hopper: bool, triton_version: str, tilelang_usable: bool = False,
                         flag_above_3_7_1: bool | None = None) -> bool:
    """Whether fla 0.6.0 would raise in the gated chunk backward (chunk_bwd_dqkwg).

    Args:
        is_hopper: fla's ``IS_NVIDIA_HOPPER`` (device name contains "NVIDIA H" or capability major 9).
        triton_version: ``triton.__version__``.
        tilelang_usable: fla's TileLang backend is available and enabled (it then takes the kernel).
        flag_above_3_7_1: fla's ``chunk_o.TRITON_ABOVE_3_7_1`` if known (overrides the version test for
            the upper bound, e.g. when a user set it by hand); None to derive it from the version.
    """
    if not is_hopper or tilelang_usable:
        return False
    if _version_tuple(triton_version) < (3, 4, 0):
        return False
    above = flag_above_3_7_1 if flag_above_3_7_1 is not None else _version_tuple(triton_version) >= (3, 7, 1)
    return not above


def guard_decision(*, guard_fires: bool, opt_in: bool, selfcheck_passed: bool | None) -> str:
    """What to do before an fla GDN backward.

    Returns:
        "allow" (guard would not fire, or this config's self-check passed), "refuse" (guard fires and no
        opt-in), "selfcheck" (opt-in and this config not checked yet) or "refuse_failed" (opt-in and
        this config's self-check failed).
    """
    if not guard_fires:
        return "allow"
    if not opt_in:
        return "refuse"
    if selfcheck_passed is None:
        return "selfcheck"
    return "allow" if selfcheck_passed else "refuse_failed"


def selfcheck_passed(errors: dict[str, dict[str, float]], tolerances: dict[str, float] = TOLERANCES) -> bool:
    """True when every error of every dtype is finite and <= that dtype's tolerance.

    errors: {dtype name: {quantity: norm-wise relative error}}; unknown dtypes use the bf16 tolerance.
    """
    for dt, errs in errors.items():
        tol = tolerances.get(dt, tolerances["bfloat16"])
        if not errs or any(not math.isfinite(e) or e > tol for e in errs.values()):
            return False
    return True


def _opted_in() -> bool:
    return os.environ.get(ENV_SELFCHECK, "").strip().lower() in ("1", "true", "yes", "on")


def _get_fla_flag() -> bool:
    import fla.ops.common.chunk_o as chunk_o

    return bool(chunk_o.TRITON_ABOVE_3_7_1)


def _set_fla_flag(value: bool) -> None:
    import fla.ops.common.chunk_o as chunk_o

    chunk_o.TRITON_ABOVE_3_7_1 = value


def _fla_guard_info() -> dict:
    """fla's view of this machine (cached): is_hopper, triton_version, tilelang_usable, original flag."""
    global _INFO, _ORIGINAL_FLAG
    if _INFO is None:
        import fla.ops.common.chunk_o as chunk_o
        import triton
        try:
            from fla.backends import _DISPATCH_DISABLED
            from fla.ops.common.backends.tilelang import CommonTileLangBackend
            tilelang = (not _DISPATCH_DISABLED) and CommonTileLangBackend.is_available() \
                and CommonTileLangBackend().is_enabled()
        except Exception:
            tilelang = False
        if _ORIGINAL_FLAG is None:
            _ORIGINAL_FLAG = bool(chunk_o.TRITON_ABOVE_3_7_1)
        _INFO = {"is_hopper": bool(chunk_o.IS_NVIDIA_HOPPER), "triton_version": triton.__version__,
                 "tilelang_usable": bool(tilelang), "flag_above_3_7_1": _ORIGINAL_FLAG}
    return _INFO


@contextlib.contextmanager
def _guard_lifted_temporarily():
    before = _get_fla_flag()
    _set_fla_flag(True)
    try:
        yield
    finally:
        _set_fla_flag(before)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def run_fla_gdn_selfcheck(K: int, V: int, device, dtypes=("bfloat16", "float32"), *, T: int = 256, H: int = 2,
                          HV: int = 2, seed: int = 1234) -> dict:
    """Gradient self-check of fla's chunk_gated_delta_rule against the fp64 PyTorch chunked path.

    Runs with fla's guard lifted only for its own duration; draws inputs from a private generator
    (the global RNG is untouched). Inputs: q, k [1, T, H, K] (raw, use_qk_l2norm_in_kernel=True),
    v [1, T, HV, V], beta = 2 sigmoid(randn) in (0, 2), g = -A softplus(a + dt_bias) with A in [1, 16),
    dt in [1e-3, 0.1] (docs/model.md §4-5), initial_state [1, HV, K, V] fp32, loss = <o, do> + <S_T, dS>.

    Returns:
        dict with "device", "capability", "triton", "fla", "K", "V", "shape", "errors"
        ({dtype: {"o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"}}), "tolerances",
        "passed", "seconds". "guard_lifted" is filled in by ``ensure_fla_gdn_backward_allowed``.
    """
    import fla
    import triton

    from megatron_hybrid.kernels.fla_backend import chunk_gated_delta_rule_fla
    from megatron_hybrid.kernels.gated_delta_rule_torch import chunk_gated_delta_rule_torch

    device = torch.device(device)
    t0 = time.time()
    gen = torch.Generator(device=device).manual_seed(seed)

    def rn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    errors: dict[str, dict[str, float]] = {}
    with torch.enable_grad(), _guard_lifted_temporarily():
        for name in dtypes:
            dt = getattr(torch, name)
            q, k = rn(1, T, H, K, dtype=dt), rn(1, T, H, K, dtype=dt)
            v = rn(1, T, HV, V, dtype=dt)
            beta = (2 * torch.sigmoid(rn(1, T, HV))).to(dt)
            A = torch.exp(torch.rand(HV, generator=gen, device=device) * math.log(16.0))
            dtv = torch.exp(math.log(1e-3) + torch.rand(HV, generator=gen, device=device) * math.log(100.0))
            g = -A * torch.nn.functional.softplus(rn(1, T, HV) + dtv + torch.log(-torch.expm1(-dtv)))
            h0 = 0.1 * rn(1, HV, K, V)
            do, dht = rn(1, T, HV, V, dtype=dt), rn(1, HV, K, V)
            ins = [x.detach().requires_grad_() for x in (q, k, v, g, beta, h0)]
            o, ht = chunk_gated_delta_rule_fla(*ins[:5], initial_state=ins[5], output_final_state=True,
                                               use_qk_l2norm_in_kernel=True)
            grads = torch.autograd.grad((o.float() * do.float()).sum() + (ht.float() * dht).sum(), ins)
            ref_in = [x.detach().double().requires_grad_() for x in ins]
            o_r, ht_r = chunk_gated_delta_rule_torch(*ref_in[:5], initial_state=ref_in[5], output_final_state=True,
                                                     use_qk_l2norm_in_kernel=True)
            grads_r = torch.autograd.grad((o_r * do.double()).sum() + (ht_r * dht.double()).sum(), ref_in)
            errs = {"o": _rel(o, o_r), "final_state": _rel(ht, ht_r)}
            for gname, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), grads, grads_r, strict=True):
                errs[gname] = _rel(a, b)
            errors[name] = errs
    torch.cuda.synchronize(device)
    return {
        "device": torch.cuda.get_device_name(device),
        "capability": "{}.{}".format(*torch.cuda.get_device_capability(device)),
        "triton": triton.__version__, "fla": getattr(fla, "__version__", "?"),
        "K": K, "V": V, "shape": {"B": 1, "T": T, "H": H, "HV": HV}, "use_qk_l2norm_in_kernel": True,
        "errors": errors, "tolerances": {d: TOLERANCES.get(d, TOLERANCES["bfloat16"]) for d in dtypes},
        "passed": selfcheck_passed(errors), "seconds": round(time.time() - t0, 2),
    }


def _fmt(result: dict) -> str:
    return "; ".join(f"{dt}: " + ", ".join(f"{k}={v:.2e}" for k, v in errs.items())
                     for dt, errs in result.get("errors", {}).items())


def ensure_fla_gdn_backward_allowed(K: int, V: int, dtype: torch.dtype, device, H: int = 2,
                                    HV: int | None = None) -> None:
    """Apply the Hopper-guard policy before an fla GDN forward whose backward will run.

    Cheap after the first call per (K, V, dtype). On an unaffected machine it does nothing.
    The self-check runs at the caller's head counts ``H`` / ``HV`` and dtype: fla keys its
    autotuning on head count and dtype, so checking other ones would compile (minutes on a cold
    GPU) whole kernel sets the training never uses.

    Raises:
        RuntimeError: guard would fire and no opt-in (message names the fixes), or the opt-in self-check
            failed for this config (message holds the measured errors).
    """
    global _LAST
    key = (int(K), int(V), str(dtype).replace("torch.", ""))
    done = _RESULTS.get(key)
    if done is not None and done["passed"]:
        return
    info = _fla_guard_info()
    fires = fla_guard_would_fire(**info)
    action = guard_decision(guard_fires=fires, opt_in=_opted_in(),
                            selfcheck_passed=None if done is None else done["passed"])
    if action == "allow":
        return
    where = f"Hopper GPU with Triton {info['triton_version']}"
    if action == "refuse":
        raise RuntimeError(
            f"fla 0.6.0 refuses the gated delta rule backward on this {where} (Triton >= 3.4.0, < 3.7.1 "
            f"miscompiles chunk_bwd_dqkwg on sm_90; fla issue #640). {_FIX}")
    if action == "refuse_failed":
        raise RuntimeError(f"fla GDN Hopper self-check failed earlier for (K, V, dtype) = {key}; guard kept. "
                           f"Measured: {_fmt(done)}. {_FIX}")
    dtypes = [key[2]]
    result = run_fla_gdn_selfcheck(K, V, device, dtypes=tuple(dtypes), H=int(H),
                                   HV=int(HV if HV is not None else H))
    result["config"] = key
    result["guard_lifted"] = bool(result["passed"])
    _RESULTS[key] = result
    _LAST = result
    if result["passed"]:
        for d in dtypes:
            _RESULTS.setdefault((key[0], key[1], d), result)
        _set_fla_flag(True)
        logger.warning(
            "fla Hopper guard LIFTED for (K, V)=(%d, %d) on %s (%s, Triton %s, fla %s) after a gradient "
            "self-check at B=1, T=%d, H=%d, HV=%d vs the fp64 PyTorch path, norm-wise relative errors: %s "
            "(tolerances %s). Install Triton >= 3.7.1 to make this unnecessary.",
            K, V, result["device"], result["capability"], result["triton"], result["fla"],
            result["shape"]["T"], result["shape"]["H"], result["shape"]["HV"], _fmt(result), result["tolerances"])
        return
    logger.warning("fla Hopper guard KEPT for (K, V)=(%d, %d): self-check failed: %s", K, V, _fmt(result))
    raise RuntimeError(f"fla GDN Hopper self-check failed for (K, V, dtype) = {key} on {where}; guard kept. "
                       f"Measured (tolerances {result['tolerances']}): {_fmt(result)}. {_FIX}")


def hopper_selfcheck_result() -> dict | None:
    """The last self-check result dict (see ``run_fla_gdn_selfcheck``), or None if none ran."""
    return None if _LAST is None else dict(_LAST)


def _reset_state_for_tests() -> None:
    global _INFO, _LAST, _ORIGINAL_FLAG
    _INFO, _LAST, _ORIGINAL_FLAG = None, None, None
    _RESULTS.clear()


def fla_backward_refused_here() -> bool:
    """True when fla is importable on a CUDA machine whose Hopper guard would refuse the GDN backward
    and the user has not opted in (``MEGATRON_HYBRID_FLA_HOPPER_SELFCHECK=1``); False otherwise.

    Launchers use it to pick the PyTorch kernels (and say why) instead of failing at the first step.
    """
    if not torch.cuda.is_available() or _opted_in():
        return False
    try:
        info = _fla_guard_info()
    except ImportError:
        return False
    return fla_guard_would_fire(**info)
