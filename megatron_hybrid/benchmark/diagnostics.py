"""What ran: fla's autotuners after the run, the kernels transformers bound, a profiler summary.

None of these affect the timings; each is best effort and returns what it could read.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

import torch


def _kernel_name(tuner) -> str:
    for path in ("base_fn.__name__", "fn.fn.__name__", "fn.__name__", "kernel_name"):
        obj = tuner
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            if isinstance(obj, str):
                return obj
        except AttributeError:
            continue
    return type(tuner).__name__


def _unwrap_autotuner(value, autotuner_cls):
    """The Autotuner behind a module attribute (``@triton.heuristics`` wraps it: follow
    ``.fn``), or None."""
    try:
        for _ in range(3):
            if isinstance(value, autotuner_cls):
                return value
            value = getattr(value, "fn", None)
            if value is None:
                return None
    except Exception:  # lazy modules may raise anything from __getattr__
        return None
    return value if isinstance(value, autotuner_cls) else None


def fla_autotune_census() -> list[dict] | None:
    """fla's Triton autotuners and what they hold after the run (None when triton is absent).

    One entry per autotuned kernel that was used: {"kernel", "module", "candidates" (configs per
    tuning key), "keys" ([{"key": [...], "best": "BT: 32, num_warps: 4, ..."}])}. A key is tuned
    (every candidate compiled and benchmarked) on first use unless Triton's on-disk autotune
    cache (``FLA_CACHE_RESULTS``) or fla's config files (``FLA_CACHE_MODE``) supplied it.
    Sorted by candidates x keys, largest first.
    """
    try:
        from triton.runtime.autotuner import Autotuner
    except Exception:
        return None
    seen, out = set(), []
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith("fla."):
            continue
        try:
            values = list(vars(mod).values())
        except TypeError:  # not a module-like object
            continue
        for value in values:
            value = _unwrap_autotuner(value, Autotuner)
            if value is None or id(value) in seen:
                continue
            seen.add(id(value))
            cache = getattr(value, "cache", {}) or {}
            if not cache:
                continue
            out.append({"kernel": _kernel_name(value), "module": mod_name,
                        "candidates": len(getattr(value, "configs", []) or []),
                        "keys": [{"key": [str(k) for k in key], "best": str(cfg)}
                                 for key, cfg in cache.items()]})
    out.sort(key=lambda e: -e["candidates"] * len(e["keys"]))
    return out


def census_summary(census: list[dict] | None) -> dict | None:
    """{"kernels", "keys", "candidate_configs" (sum of candidates x keys: the configs compiled
    when nothing came from a cache), "l2norm_candidate_configs"}."""
    if census is None:
        return None
    total = sum(e["candidates"] * len(e["keys"]) for e in census)
    l2 = sum(e["candidates"] * len(e["keys"]) for e in census if "l2norm" in e["kernel"])
    return {"kernels": len(census), "keys": sum(len(e["keys"]) for e in census),
            "candidate_configs": total, "l2norm_candidate_configs": l2}


def _origin(obj) -> str:
    """Where a callable comes from: 'fla.<module>.<name>' for fla (also behind transformers'
    hub wrappers, found in the closure), else its module."""
    for cell in getattr(obj, "__closure__", None) or ():
        try:
            inner = cell.cell_contents
        except ValueError:
            continue
        mod = getattr(inner, "__module__", "") or ""
        if callable(inner) and mod.split(".")[0] in ("fla", "causal_conv1d"):
            return f"{mod}.{getattr(inner, '__name__', '?')}"
    mod = getattr(obj, "__module__", "") or ""
    return f"{mod}.{getattr(obj, '__name__', type(obj).__name__)}"


_GDN_NAMES = ("delta_rule", "conv1d", "l2norm", "normgated", "norm_gated", "fast_path")


def hf_kernel_bindings(model=None) -> dict[str, str]:
    """The GDN-related callables of transformers' olmo_hybrid module (and of the model's first
    GDN module, ``self.<name>``, where a version binds them per instance) and where they come
    from: fla, causal_conv1d, or transformers' PyTorch reference. Names matched: gated delta
    rule, conv1d, l2norm, gated RMSNorm, ``is_fast_path_available``."""
    mod = sys.modules.get("transformers.models.olmo_hybrid.modeling_olmo_hybrid")
    if mod is None:
        return {}
    out = {}
    for name, value in vars(mod).items():
        if any(s in name.lower() for s in _GDN_NAMES):
            out[name] = repr(value) if isinstance(value, bool) else _origin(value)
    gdn = None if model is None else next(
        (m for m in model.modules() if type(m).__name__.endswith("GatedDeltaNet")), None)
    if gdn is not None:
        for name, value in vars(gdn).items():
            if any(s in name.lower() for s in _GDN_NAMES) and callable(value):
                out[f"self.{name}"] = _origin(value)
        for name, child in gdn.named_children():
            if "norm" in name or "conv" in name:
                out[f"self.{name}"] = f"{type(child).__module__}.{type(child).__name__}"
    return out


def profile_top_kernels(step: Callable[[], None], device: torch.device, top: int = 12) -> list[dict]:
    """Profile one call of ``step()`` and list the ``top`` kernels (GPU) or ops (CPU) by self time.

    Returns [{"name", "calls", "self_ms", "share"}] (share of the listed device time total).
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        step()
        if cuda:
            torch.cuda.synchronize(device)

    def self_us(e) -> float:
        if cuda:
            for attr in ("self_device_time_total", "self_cuda_time_total"):
                if hasattr(e, attr):
                    return float(getattr(e, attr))
            return 0.0
        return float(e.self_cpu_time_total)

    events = [e for e in prof.key_averages() if self_us(e) > 0]
    total = sum(self_us(e) for e in events) or 1.0
    events.sort(key=self_us, reverse=True)
    return [{"name": e.key[:120], "calls": int(e.count), "self_ms": self_us(e) / 1e3,
             "share": self_us(e) / total} for e in events[:top]]
