"""Flags and run order of ``tools/benchmark.py`` (one process, one GPU; CPU with ``--smoke``).

Order: the bf16 matmul ceiling; ours (timed iterations, optional profile, the per-layer-kind
breakdown, its weights kept on the CPU); HF transformers on those weights; megatron-core's GDN
stack on those weights. Before each phase the ``--max-minutes`` budget is checked (a phase that
would start after it is reported as skipped); the JSON and markdown are rewritten after every
phase, and SIGTERM (e.g. ``timeout``) ends the current phase as "interrupted" and still writes
them, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
import traceback

import torch

from megatron_hybrid.benchmark import report
from megatron_hybrid.benchmark.spec import FULL_LAYERS, BenchSpec, environment, model_config, smoke_spec
from megatron_hybrid.benchmark.timing import (
    Deadline,
    allocated_gib,
    free_device_memory,
    matmul_ceiling_tflops,
    run_timed_iterations,
)
from megatron_hybrid.training.flops import HOPPER_BF16_PEAK_TFLOPS, training_flops_per_token

ENGINES = ("ours", "hf", "mc")


class Interrupted(BaseException):
    """SIGTERM arrived (the caller's hard time limit): stop, write what was measured."""


class _DefaultsUnlessNone(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only for real defaults: None means "see the help text"."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/benchmark.py", allow_abbrev=False,
        description="Training throughput of Olmo Hybrid (7B widths, reduced depth) on one GPU: "
                    "ours vs HF transformers vs megatron-core's GDN, per-layer-kind breakdown "
                    "and the 32-layer extrapolation.",
        formatter_class=_DefaultsUnlessNone)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on CPU, fp32, PyTorch kernels, 1 warm-up + 2 timed steps")
    p.add_argument("--num-layers", type=int, default=None, help="multiple of 4 (8; smoke 4)")
    p.add_argument("--seq-length", type=int, default=None, help="8192 (smoke 64)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="1")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations (2; smoke 1)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (5; smoke 2)")
    p.add_argument("--breakdown-iters", type=int, default=None, help="10 (smoke 2)")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help="comma-separated subset of ours,hf,mc (peers load ours' weights)")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-layer-kind timing")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="ours' and megatron-core's precision (bf16; smoke fp32)")
    p.add_argument("--hf-precision", choices=["autocast", "bf16", "fp32"], default=None,
                   help="HF: fp32 weights + bf16 autocast (Trainer --bf16), pure bf16, or fp32 "
                        "(autocast; smoke fp32)")
    p.add_argument("--z-loss-weight", type=float, default=1e-5, help="ours' z-loss (training's)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock budget: phases that would start later are skipped")
    p.add_argument("--profile", action="store_true",
                   help="profile one extra iteration per engine (top kernels in the JSON)")
    p.add_argument("--matmul-size", type=int, default=None, help="ceiling matmul n (8192; smoke 256)")
    p.add_argument("--peak-tflops", type=float, default=HOPPER_BF16_PEAK_TFLOPS,
                   help="nominal dense bf16 peak for MFU (H100/H200 SXM)")
    p.add_argument("--output-json", default=None,
                   help="results JSON (default runs/benchmark/benchmark.json; smoke: none)")
    p.add_argument("--output-md", default=None,
                   help="markdown table (default docs/performance.md; smoke: none)")
    p.add_argument("--fla-warmup-workers", type=int, default=None,
                   help="processes that compile fla's autotune candidates before the timed phases "
                        "(0: off; default: $MEGATRON_HYBRID_FLA_WARMUP_WORKERS or min(8, CPUs - 1))")
    p.add_argument("--seed", type=int, default=1234)
    return p


def spec_from_args(args) -> BenchSpec:
    given = {k: getattr(args, k) for k in ("num_layers", "seq_length", "micro_batch_size",
                                           "warmup", "iters", "breakdown_iters", "hf_precision", "dtype")
             if getattr(args, k) is not None}
    given.update(z_loss_weight=args.z_loss_weight, seed=args.seed)
    return smoke_spec(**given) if args.smoke else BenchSpec(**given)


def _say(msg: str) -> None:
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Run:
    """State of one benchmark run: the results dict and the phase guard."""

    def __init__(self, args, spec: BenchSpec, device: torch.device):
        self.args, self.spec, self.device = args, spec, device
        self.deadline = Deadline(args.max_minutes)
        self.cfg = model_config(spec)
        self.full_cfg = model_config(spec, FULL_LAYERS)
        self.flops = training_flops_per_token(self.cfg, spec.seq_length)
        self.ceiling: float | None = None
        self.weights = None
        self._partial = {}  # engine -> run_timed_iterations' dict, filled as iterations complete
        self.results = {"spec": spec.to_dict(), "environment": environment(device),
                        "model": {"hidden_size": self.cfg.hidden_size,
                                  "ffn_hidden_size": self.cfg.ffn_hidden_size,
                                  "vocab_size": self.cfg.vocab_size,
                                  "pattern": self.cfg.hybrid_layer_pattern,
                                  "flops_per_token_reduced": self.flops,
                                  "flops_per_token_full": training_flops_per_token(
                                      self.full_cfg, spec.seq_length)},
                        "peaks": {"nominal_tflops": args.peak_tflops, "ceiling": None},
                        "engines": {}, "breakdown": None, "mc_stack": None, "autotune": None,
                        "notes": [], "profiles": {}}

    def write(self) -> None:
        self.results["elapsed_s"] = self.deadline.elapsed_s()
        self.results["ratios"] = report.ratios(self.results)
        report.write_json(self.results, self.args.output_json)
        report.write_markdown(self.results, self.args.output_md)

    def phase(self, name: str, fn, engine: str | None = None) -> bool:
        """Run ``fn()`` unless the budget is spent; record failures; free memory; write."""
        if self.deadline.expired():
            reason = f"skipped: --max-minutes budget spent ({self.deadline.describe()})"
            _say(f"{name}: {reason}")
            if engine:
                self.results["engines"][engine] = {"status": "skipped", "reason": reason}
            else:
                self.results["notes"].append(f"{name} {reason}")
            self.write()
            return False
        _say(f"{name}: start ({self.deadline.describe()})")
        ok = False
        try:
            fn()
            ok = True
        except Interrupted:
            self._fail(name, engine, "interrupted by SIGTERM (the hard time limit)",
                       status="interrupted")
            raise
        except Exception as err:  # a failing peer must not lose the others' results
            self._fail(name, engine, f"{type(err).__name__}: {err}",
                       traceback.format_exc()[-4000:])
        finally:
            free_device_memory(self.device)
            left = allocated_gib(self.device)
            if left is not None:
                self.results.setdefault("memory_after_phase_gib", {})[name] = left
            self.write()
        _say(f"{name}: {'done' if ok else 'FAILED'} ({self.deadline.describe()})")
        return ok

    def _fail(self, name, engine, reason, tb=None, status="failed"):
        _say(f"{name}: {reason}")
        if tb:
            print(tb, file=sys.stderr, flush=True)
        entry = {"status": status, "reason": reason, "traceback": tb}
        if engine:
            partial = self._partial.get(engine) or {}
            if partial.get("iteration_ms") and engine not in self.results["engines"]:
                # interrupted inside its timed loop: keep the iterations that completed
                self.results["engines"][engine] = {**self._metrics(partial), "truncated": True}
            elif partial.get("first_iteration_s") and engine not in self.results["engines"]:
                self.results["engines"][engine] = {
                    "first_iteration_s": partial["first_iteration_s"],
                    "losses": partial.get("losses")}
            self.results["engines"][engine] = {**self.results["engines"].get(engine, {}), **entry}
        else:
            self.results["notes"].append(f"{name} failed: {reason}")

    # -- phases ------------------------------------------------------------------------------
    def warmup_phase(self) -> None:
        """Parallel compile of fla's autotune candidates at the benchmark's GDN shape
        (``runtime/fla_warmup.py``); the engines' untimed first iterations then only time them."""
        from megatron_hybrid.runtime.fla_warmup import warm_fla_kernels
        from megatron_hybrid.runtime.kernel_warmup import gdn_kernel_shapes

        shapes = gdn_kernel_shapes(self.cfg, self.spec.micro_batch_size, self.spec.seq_length,
                                   str(self.spec.torch_dtype).replace("torch.", ""))
        rep = warm_fla_kernels(shapes, workers=self.args.fla_warmup_workers, device=self.device)
        self.results["fla_warmup"] = rep
        done = rep["skipped"] or f"{rep['workers']} processes, {rep['seconds']} s, failed {rep['failed']}"
        _say(f"fla warm-up: {done}")

    def ceiling_phase(self) -> None:
        n = self.args.matmul_size or (256 if self.spec.smoke else 8192)
        c = matmul_ceiling_tflops(self.device, self.spec.torch_dtype, n=n)
        self.ceiling = c["tflops"]
        self.results["peaks"]["ceiling"] = c
        _say(f"matmul ceiling: {c['tflops']:.1f} TFLOP/s ({n}^3 {c['dtype']})")

    def _metrics(self, train: dict) -> dict:
        return report.engine_metrics(train, self.spec.tokens_per_iteration, self.flops,
                                     self.args.peak_tflops, self.ceiling)

    def train(self, name: str, engine) -> dict:
        self._partial[name] = {}
        train = run_timed_iterations(engine.step, self.device, self.spec.warmup, self.spec.iters,
                                     self.deadline, out=self._partial[name])
        m = self._metrics(train)
        m["parameters"] = engine.num_parameters()
        self.results["engines"][name] = m
        if self.args.profile and not self.deadline.expired():
            from megatron_hybrid.benchmark.diagnostics import profile_top_kernels
            from megatron_hybrid.benchmark.timing import RegionTimer

            self.results["profiles"][name] = profile_top_kernels(
                lambda: engine.step(RegionTimer(self.device)), self.device)
        _say(f"{name}: iteration {report._f(m.get('iteration_ms'))} ms, "
             f"{report._f(m.get('tokens_per_s'), '{:,.0f}')} tokens/s, MFU "
             f"{report._pct(m.get('mfu_peak'))}, loss {m['loss_step0']} -> {m['loss_last']}")
        return train

    def ours_phase(self) -> None:
        from megatron_hybrid.benchmark.breakdown import extrapolate, isolated_timings
        from megatron_hybrid.benchmark.ours import MegatronEngine

        engine = MegatronEngine(self.spec, self.cfg, self.device)
        try:
            params = engine.num_parameters()
            self.results["model"]["parameters_reduced"] = params
            self.results["model"]["parameters_full"] = _params(self.full_cfg)
            if params != _params(self.cfg):
                self.results["notes"].append(f"parameter count {params} differs from the "
                                             f"tuner's {_params(self.cfg)}")
            if {"hf", "mc"} & set(self.engines):  # the initial weights: every engine's step 0
                self.weights = engine.global_state_dict()
            train = self.train("ours", engine)
            if not self.args.no_breakdown and not self.deadline.expired():
                iso = isolated_timings(engine, self.deadline)
                bd = extrapolate(train, iso, self.cfg, self.full_cfg, params,
                                 self.results["model"]["parameters_full"], self.spec,
                                 self.results["model"]["flops_per_token_full"],
                                 self.args.peak_tflops, self.ceiling)
                self.results["breakdown"] = bd
                self.results["breakdown_isolated_ms"] = iso
        finally:
            engine.close()

    def hf_phase(self) -> None:
        from megatron_hybrid.benchmark.hf_peer import HFEngine
        from megatron_hybrid.benchmark.ours import prepare_fla_backward

        refusal = prepare_fla_backward(self.cfg, self.device)
        if refusal:
            raise RuntimeError(refusal)
        engine = HFEngine(self.spec, self.cfg, self.device, self.weights)
        try:
            self.train("hf", engine)
            e = self.results["engines"]["hf"]
            e.update(weights=engine.load_report, attn_implementation=engine.attn_implementation,
                     kernel_bindings=engine.kernel_bindings, precision=self.spec.hf_precision)
        finally:
            engine.close()

    def mc_phase(self) -> None:
        from megatron_hybrid.benchmark import mc_peer
        from megatron_hybrid.benchmark.ours import MegatronEngine, prepare_fla_backward

        with mc_peer.cpu_stand_ins(self.device) as note:
            self.results["mc_stack"] = {"te_only_findings": mc_peer.te_only_findings(
                self.cfg, self.spec.torch_dtype), "assembled": mc_peer.ASSEMBLED,
                "kernel_bindings": mc_peer.mc_kernel_bindings(), "note": note}
            refusal = prepare_fla_backward(self.cfg, self.device)
            if refusal:
                raise RuntimeError(refusal)
            engine = MegatronEngine(self.spec, self.cfg, self.device, mc_peer.mc_block_spec)
            try:
                if self.weights is not None:
                    loaded = engine.load_weights(self.weights)
                    self.results["mc_stack"]["weights"] = (
                        f"ours' weights loaded ({loaded['loaded']} tensors; missing "
                        f"{loaded['missing'][:6]}, unexpected {loaded['unexpected'][:6]}, shape "
                        f"mismatch {loaded['mismatched'][:6]})")
                self.train("mc", engine)
            finally:
                engine.close()

    @property
    def engines(self) -> list[str]:
        """The engines asked for, in the fixed order ours, hf, mc (peers load ours' weights)."""
        asked = {e.strip() for e in self.args.engines.split(",") if e.strip()}
        return [e for e in ENGINES if e in asked]


def _params(cfg) -> int:
    """Parameters of a model at TP = PP = 1, counted by the tuner from the config (exact:
    7,430,870,688 for the 7B, docs/model.md §1)."""
    from megatron_hybrid.tuner.params import stage_parameters

    return sum(n for _, n in stage_parameters(cfg, 1, [cfg.num_layers], 0))


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the results dict (also written to the JSON / markdown)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    asked = {e.strip() for e in args.engines.split(",") if e.strip()}
    bad = sorted(asked - set(ENGINES))
    if bad or not asked:
        parser.error(f"--engines: {'unknown ' + str(bad) if bad else 'none given'}; choose from "
                     f"{','.join(ENGINES)}")
    if args.max_minutes is not None and args.max_minutes <= 0:
        parser.error(f"--max-minutes {args.max_minutes}: must be > 0")
    if args.matmul_size is not None and args.matmul_size < 1:
        parser.error(f"--matmul-size {args.matmul_size}: must be >= 1")
    if args.fla_warmup_workers is not None and args.fla_warmup_workers < 0:
        parser.error(f"--fla-warmup-workers {args.fla_warmup_workers}: must be >= 0")
    if not args.smoke:
        args.output_json = args.output_json or "runs/benchmark/benchmark.json"
        args.output_md = args.output_md or "docs/performance.md"
    try:
        spec = spec_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    device = torch.device("cuda", torch.cuda.current_device()) if (
        torch.cuda.is_available() and not args.smoke) else torch.device("cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("tools/benchmark.py: no CUDA device; use --smoke for the CPU check")
    if args.smoke:
        from megatron_hybrid.hf.validate import hide_fla_on_cpu

        hide_fla_on_cpu(device)
    from megatron_hybrid.parallel import initialize_distributed

    initialize_distributed(1, 1, 1, spec.seed)
    run = Run(args, spec, device)
    engines = run.engines
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    dynamo_off = (torch._dynamo.config.patch(disable=True) if args.smoke
                  else contextlib.nullcontext())
    _say(f"{run.results['environment']['device']}: {spec.num_layers} layers x S "
         f"{spec.seq_length} x B {spec.micro_batch_size}, {spec.dtype}; engines {engines}")
    try:
        with dynamo_off:
            run.phase("matmul ceiling", run.ceiling_phase)
            if device.type == "cuda":
                run.phase("fla warm-up", run.warmup_phase)
            for name in engines:
                run.phase(name, getattr(run, f"{name}_phase"), engine=name)
            from megatron_hybrid.benchmark.diagnostics import census_summary, fla_autotune_census
            from megatron_hybrid.runtime.hopper_guard import hopper_selfcheck_result

            run.results["hopper_selfcheck"] = hopper_selfcheck_result()
            try:
                census = fla_autotune_census()
                run.results["autotune"] = {"summary": census_summary(census), "kernels": census}
            except Exception as err:  # diagnostics only
                run.results["autotune"] = {"error": f"{type(err).__name__}: {err}"}
    except Interrupted:
        run.results["notes"].append("run interrupted by SIGTERM: later phases did not run")
    finally:
        signal.signal(signal.SIGTERM, previous)
        run.write()
    print(report.console_summary(run.results), flush=True)
    return run.results


def _raise_interrupted(signum, frame):
    raise Interrupted()
