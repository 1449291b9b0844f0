"""Compile fla's Triton autotune candidates in parallel processes before training starts.

Letters: B micro-batch, S sequence length, H / HV key / value heads per GPU (after TP and CP),
K / V key / value head dims, W conv kernel width, N documents.

Why: on a fresh GPU machine fla's kernels autotune on their first call, and Triton compiles every
candidate config one after the other in the calling process. Measured on the project's H200:
323 candidates at about 1.3 s each, so the first training iteration of a new shape took more than
7 minutes, on one CPU core. Here ``workers`` processes each take a disjoint share (every
``workers``-th config) of every fla autotuner and run the GDN mixer's kernels
(``gdn_mixer.gdn_mixer``, forward and backward) at the training shapes. Triton stores what they
compile in its on-disk cache (``~/.triton/cache``, or ``TRITON_CACHE_DIR``); the training process
then autotunes over all candidates as usual, but finds each one compiled and only times it. The
choice of config is unchanged: the workers' partial autotune results are keyed by their own
config lists and never reused.

Best effort: a failing or slow worker only costs the speed-up (a warning is logged); the training
process compiles whatever is missing itself.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence

import torch

__all__ = ["GdnKernelShape", "restrict_autotune_configs", "warm_fla_kernels", "ENV_WORKERS"]

logger = logging.getLogger("megatron_hybrid.runtime")
ENV_WORKERS = "MEGATRON_HYBRID_FLA_WARMUP_WORKERS"


@dataclasses.dataclass(frozen=True)
class GdnKernelShape:
    """The shapes one GDN mixer call sees on a GPU (per rank: heads already divided by TP x CP).

    ``documents`` > 0 warms the packed-document (cu_seqlens) variant with that many equal
    documents (B must then be 1); 0 warms the unpacked one. ``norms``: (rows, width) pairs of the
    model's RMSNorms that run through fla (``kernels.rms_norm``), e.g. (S*B, hidden size).
    """

    batch: int
    seq: int
    key_heads: int
    value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_width: int = 4
    dtype: str = "bfloat16"
    documents: int = 0
    allow_neg_eigval: bool = True
    norms: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "norms", tuple((int(r), int(w)) for r, w in self.norms))
        if self.documents and self.batch != 1:
            raise ValueError(f"GdnKernelShape: documents={self.documents} needs batch 1, got {self.batch}")
        if self.value_heads % self.key_heads:
            raise ValueError(f"GdnKernelShape: value_heads {self.value_heads} is not a multiple of "
                             f"key_heads {self.key_heads}")


def _autotuners_of(obj, autotuner_type) -> Iterable:
    """The ``autotuner_type`` objects inside ``obj`` (through heuristics / wrapper ``.fn`` chains,
    at most 8 deep)."""
    for _ in range(8):
        if obj is None:
            return
        if isinstance(obj, autotuner_type):
            yield obj
        obj = getattr(obj, "fn", None)


def restrict_autotune_configs(worker: int, workers: int, module_prefix: str = "fla.",
                              autotuner_type=None) -> int:
    """Keep only configs ``worker::workers`` of every autotuner in the loaded ``module_prefix*`` modules.

    Args:
        worker: this process's index in [0, workers). workers: the number of processes.
        module_prefix: modules (``sys.modules`` names) whose attributes are searched.
        autotuner_type: the class to look for (default Triton's ``Autotuner``; tests pass a stand-in).

    Returns:
        The number of autotuners restricted. A share that would be empty keeps the first config, so
        every autotuner still runs. Each keeps its whole list as ``full_configs_before_warmup``
        (``fall_back_to_all_configs`` uses it).

    Raises:
        ValueError: worker outside [0, workers).
    """
    if not 0 <= worker < workers:
        raise ValueError(f"worker {worker} is outside [0, {workers})")
    if autotuner_type is None:
        from triton.runtime.autotuner import Autotuner as autotuner_type
    done = set()
    for name, module in list(sys.modules.items()):
        if not name.startswith(module_prefix) or module is None:
            continue
        for value in list(vars(module).values()):
            for tuner in _autotuners_of(value, autotuner_type):
                if id(tuner) in done:
                    continue
                done.add(id(tuner))
                configs = list(tuner.configs)
                tuner.configs = configs[worker::workers] or configs[:1]
                tuner.full_configs_before_warmup = configs
    return len(done)


def fall_back_to_all_configs(autotuner_type, error_types) -> None:
    """Make ``autotuner_type.run`` retry with the autotuner's whole config list when its share fails.

    A share of one config is launched without timing, and a share whose configs all exceed the
    GPU's shared memory leaves nothing to launch: Triton then raises ``OutOfResources`` (seen on
    the H200 for fla's chunk kernels at K = 96, V = 192). The retry autotunes over every config;
    those the other workers compiled meanwhile come from the disk cache.
    """
    original = autotuner_type.run
    if getattr(original, "falls_back_to_all_configs", False):
        return

    def run(self, *args, **kwargs):
        try:
            return original(self, *args, **kwargs)
        except error_types:
            full = getattr(self, "full_configs_before_warmup", None)
            if full is None or len(self.configs) == len(full):
                raise
            self.configs = full
            self.cache.clear()
            return original(self, *args, **kwargs)

    run.falls_back_to_all_configs = True
    autotuner_type.run = run


def _import_fla_kernels() -> None:
    import fla.modules.causal_conv1d  # noqa: F401
    import fla.modules.norm.fused_norm_gate  # noqa: F401
    import fla.modules.norm.l2norm  # noqa: F401
    import fla.modules.norm.layernorm  # noqa: F401
    import fla.ops.gated_delta_rule  # noqa: F401
    import fla.ops.gated_delta_rule.chunk  # noqa: F401


def run_shape(shape: GdnKernelShape, device, backend: str = "fla") -> None:
    """One forward and backward of ``gdn_mixer`` at ``shape`` with random inputs (values unused)."""
    from megatron_hybrid.config.gdn_projection import GdnProjectionLayout
    from megatron_hybrid.kernels.gdn_mixer import gdn_mixer

    dt = getattr(torch, shape.dtype)
    lay = GdnProjectionLayout(shape.key_heads, shape.value_heads, shape.key_head_dim,
                              shape.value_head_dim)
    HV, K, V = lay.num_value_heads, lay.key_head_dim, lay.value_head_dim
    gen = torch.Generator(device=device).manual_seed(0)

    def leaf(*size, scale=1.0):
        return (scale * torch.randn(*size, generator=gen, device=device)).to(dt).requires_grad_()

    proj = leaf(shape.seq, shape.batch, lay.in_proj_dim)
    conv = leaf(lay.conv_dim, 1, shape.conv_width, scale=0.2)
    A_log, dt_bias, norm_w = leaf(HV), leaf(HV), leaf(V)
    cu = None
    if shape.documents:
        cu = torch.linspace(0, shape.seq, shape.documents + 1, device=device).round().long()
    o = gdn_mixer(proj, conv, A_log, dt_bias, norm_w, key_head_dim=K, value_head_dim=V,
                  allow_neg_eigval=shape.allow_neg_eigval, cu_seqlens=cu, backend=backend)
    o.backward(torch.randn(o.shape, generator=gen, device=device).to(o.dtype))
    from megatron_hybrid.kernels import rms_norm

    for rows, width in shape.norms:
        x, w = leaf(rows, width), leaf(width)
        y = rms_norm(x, w, 1e-6, backend=backend)
        y.backward(torch.randn(y.shape, generator=gen, device=device).to(y.dtype))
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _worker_main(worker: int, workers: int, shapes: list[GdnKernelShape], device: str) -> None:
    os.environ["FLA_CACHE_RESULTS"] = "0"  # a share's autotune result is not worth keeping
    torch.cuda.set_device(torch.device(device))
    _import_fla_kernels()
    n = restrict_autotune_configs(worker, workers)
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.errors import OutOfResources

    fall_back_to_all_configs(Autotuner, (OutOfResources,))
    from megatron_hybrid.runtime import hopper_guard

    info = hopper_guard._fla_guard_info()
    guard = hopper_guard.fla_guard_would_fire(**info)
    # Compiling only: the guard policy belongs to the training process (gdn_mixer does not apply
    # it); the self-check's own shapes are warmed explicitly below.
    for shape in shapes:
        if guard and hopper_guard._opted_in():  # the training process will self-check these shapes
            hopper_guard.run_fla_gdn_selfcheck(shape.key_head_dim, shape.value_head_dim, device,
                                               dtypes=(shape.dtype,), H=shape.key_heads,
                                               HV=shape.value_heads)
        with hopper_guard._guard_lifted_temporarily():  # compiling only: outputs are discarded
            run_shape(shape, device)
    print(f"worker {worker}/{workers}: {n} autotuners, {len(shapes)} shapes", flush=True)


def default_workers() -> int:
    """``MEGATRON_HYBRID_FLA_WARMUP_WORKERS`` if set, else min(8, CPUs available - 1), at least 1.

    Raises:
        ValueError: the variable is not a non-negative integer.
    """
    env = os.environ.get(ENV_WORKERS, "").strip()
    if env:
        if not env.isdigit():
            raise ValueError(f"{ENV_WORKERS}={env!r}: expected a number of processes >= 0 "
                             "(0 or 1: no warm-up)")
        return int(env)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(8, cpus - 1))


def _stamp_path(shapes: Sequence[GdnKernelShape], device: str) -> str:
    """A file in Triton's cache directory that records a finished warm-up of ``shapes`` (it goes when
    the cache is cleared, and differs per Triton / fla / torch version and GPU model)."""
    import triton

    try:
        from importlib.metadata import version
        fla_version = version("fla-core")
    except Exception:
        fla_version = "?"
    cache = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    key = json.dumps({"shapes": [dataclasses.asdict(s) for s in shapes], "triton": triton.__version__,
                      "fla": fla_version, "torch": torch.__version__,
                      "gpu": torch.cuda.get_device_name(torch.device(device))}, sort_keys=True)
    return os.path.join(cache, "megatron_hybrid_fla_warmup", hashlib.sha1(key.encode()).hexdigest() + ".json")


def warm_fla_kernels(shapes: Sequence[GdnKernelShape], workers: int | None = None, device=None,
                     timeout_s: float = 900.0) -> dict:
    """Compile fla's autotune candidates for ``shapes`` in ``workers`` parallel processes.

    Args:
        shapes: the GDN mixer shapes the caller will run (per GPU).
        workers: processes (default ``default_workers()``); 0 or 1 returns at once.
        device: the CUDA device the workers use (default the current one).
        timeout_s: seconds before unfinished workers are killed.

    Returns:
        {"workers", "seconds", "failed": [worker indices], "shapes", "skipped"}; "skipped" names why
        nothing ran ("disabled", "no CUDA", "already warm": a stamp in Triton's cache directory
        records an earlier complete warm-up of the same shapes and versions). Never raises for a
        worker's failure (logged as a warning with the tail of its output).
    """
    workers = default_workers() if workers is None else int(workers)
    report = {"workers": workers, "seconds": 0.0, "failed": [], "skipped": None,
              "shapes": [dataclasses.asdict(s) for s in shapes]}
    if workers <= 1 or not shapes:
        report["skipped"] = "disabled"
        return report
    if not torch.cuda.is_available():
        report["skipped"] = "no CUDA"
        return report
    device = str(torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device))
    stamp = _stamp_path(shapes, device)
    if os.path.exists(stamp):
        report["skipped"] = "already warm"
        return report
    t0 = time.time()
    spec = json.dumps(report["shapes"])
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    procs = []
    with tempfile.TemporaryDirectory(prefix="fla_warmup_") as tmp:
        for i in range(workers):
            log = open(os.path.join(tmp, f"worker{i}.log"), "w+")
            cmd = [sys.executable, "-m", "megatron_hybrid.runtime.fla_warmup", "--worker", str(i),
                   "--workers", str(workers), "--device", device, "--shapes", spec]
            procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        deadline = t0 + timeout_s
        for i, (proc, log) in enumerate(procs):
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = "timeout"
            if rc != 0:
                log.seek(0)
                tail = log.read()[-1500:]
                report["failed"].append(i)
                logger.warning("fla warm-up worker %d ended with %s (training compiles what it missed):\n%s",
                               i, rc, tail)
            log.close()
    report["seconds"] = round(time.time() - t0, 1)
    if not report["failed"]:
        os.makedirs(os.path.dirname(stamp), exist_ok=True)
        tmp_stamp = f"{stamp}.{os.getpid()}.tmp"
        with open(tmp_stamp, "w") as f:
            json.dump(report, f)
        os.replace(tmp_stamp, stamp)
    return report


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description="fla autotune warm-up worker (started by warm_fla_kernels)")
    p.add_argument("--worker", type=int, required=True)
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--shapes", required=True, help="JSON list of GdnKernelShape fields")
    a = p.parse_args(argv)
    shapes = [GdnKernelShape(**d) for d in json.loads(a.shapes)]
    _worker_main(a.worker, a.workers, shapes, a.device)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
