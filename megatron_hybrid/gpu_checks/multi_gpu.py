"""Multi-GPU acceptance check over NCCL on every GPU of this machine: layouts, a checkpoint, scaling.

    python tools/gpu_check.py multi-gpu --out /tmp/mgpu            # 2, 4 or 8 GPUs, 5-6 minutes warm
    python tools/gpu_check.py multi-gpu --cpu-smoke --out /tmp/mgpu   # the same logic on CPU (gloo)
    python tools/gpu_check.py multi-gpu --dry-run --num-gpus 8        # the waves and commands only

Exit status: 0 when every loss comparison passes, 1 when one fails, 2 for bad settings (checked
first, before anything runs or ``--out`` is touched), 130 when interrupted (the runs it started are
stopped). Logs under ``OUT/correctness/logs`` and ``OUT/scaling``; the two tables are printed last
and written to ``OUT/multi_gpu.md``. Settings: ``multi_gpu_settings.py`` (every flag has an
environment fallback of the old name: ITERS, LAYOUTS, BUDGET_S ...).

1. Correctness. Each layout (``--layouts``; data: ``multi_gpu_settings.LAYOUTS``) trains ``--iters``
   [20] iterations of the tiny preset with the GDN head dims of the 1B/7B (96/192) on the embedded
   corpus: fp32 (``--corr-dtype bf16``), sequence 1024, micro-batch 2, global batch 8, distributed
   optimizer, fla kernels on GPUs (``--corr-kernels torch``: the PyTorch ones). All layouts start from
   the same weights: a one-iteration lr=0 CPU run saves them and every run loads them with
   ``--finetune`` (the trainer seeds each pipeline stage differently, as Megatron does).
   tools/compare_runs.py compares each run's lm loss with ref's at every iteration: pass when
   |loss - ref| <= rtol x |ref| (+ atol; rtol 1e-3 fp32, 1e-2 bf16: layouts differ only in reduction
   order). Layouts that fit side by side run at once on disjoint GPUs (``scheduler.py``: first-fit
   waves; 8 GPUs 3 waves, 4 GPUs 5, 2 GPUs 6); one needing more GPUs than present is skipped.
2. Checkpoint. The ``--ckpt-source`` run [tp2pp2_sp; tp2_sp below 4 GPUs] saves at ``--save-at``
   [10]; its checkpoint (fully_reshardable: it loads at another TP / PP directly) resumes at
   TP1 x PP1 on one GPU and trains to ``--iters``; its losses are compared with the source run's and
   with ref's over save-at+1..iters.
3. Scaling (``--no-scaling`` skips it). For each GPU count in ``--scaling-gpus`` [1 2 4 8, up to
   the machine's], tools/tune_parallelism.py picks its top plan and measures it (``--measure``,
   ``--scaling-iters`` [8] iterations on mock data) for ``--scaling-models`` [1b 7b8l]; runs that
   fit side by side share the machine (marked * in the table; ``--scaling-serial``: one at a time).

CPU smoke: gloo processes stand for GPUs (4 at most, one run at a time), PyTorch kernels, the
layouts ref dp2 tp2_sp pp2 cp2 tp2pp2_sp, 3 iterations at sequence 256, the checkpoint saved at 2
by tp2pp2_sp and resumed at TP1, the scaling step for the tiny preset on 1 process; about 2.5
minutes on 2 cores. Time: a wave takes about 30-50 s on a warm machine; a cold one compiles fla's
autotune candidates (carry Triton's cache between machines: ``tools/gpu_kernel_cache.sh``, before
and after this command; the log gives the cache's growth). No wave starts ``--budget-s`` [480] s
after the start; a run stops after ``--corr-run-timeout`` [300] / ``--scaling-run-timeout`` [240] s.
Checkpoints go to a new directory under ``--work-dir`` [$TMPDIR], removed at the end unless
``--keep-work``. On Hopper with Triton < 3.7.1 it opts in to the fla gradient self-check.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import tempfile

from megatron_hybrid.gpu_checks import multi_gpu_report as report
from megatron_hybrid.gpu_checks.multi_gpu_settings import LAYOUTS, RESUME, SCALING_MODELS, Layout, settings
from megatron_hybrid.gpu_checks.runner import (
    TIMED_OUT,
    Budget,
    Launcher,
    child_env,
    dir_mb,
    finish,
    hopper_selfcheck_env,
    log,
    python,
    raise_on_sigterm,
    shown,
    torchrun,
    triton_cache_dir,
)
from megatron_hybrid.gpu_checks.scheduler import Case, Waves, run_waves


class Check:
    """One run of the check: settings, paths, the launcher, and the rows gathered so far."""

    def __init__(self, args):
        self.a, self.budget = args, Budget(args.budget_s)
        self.launcher = Launcher(dry_run=args.dry_run)
        self.unit, self.unit1 = ("processes", "process") if args.cpu_smoke else ("GPUs", "GPU")
        src = LAYOUTS[args.ckpt_source]
        self.layouts = {**LAYOUTS, RESUME: Layout(RESUME, 1, f"TP1 PP1 from the {src.desc} checkpoint "
                                                            f"at {args.save_at}")}
        self.out = os.path.abspath(args.out)
        self.work = os.path.join(args.work_dir or tempfile.gettempdir(), "gpu_check_multi_gpu.dry")
        self.corr_dir, self.scale_dir = f"{self.out}/correctness", f"{self.out}/scaling"
        self.work_created = False  # only a folder this run made is removed at the end
        self.skipped_rows: list[str] = []
        self.ran: set[str] = set()
        self.scaling_jobs: list[report.ScalingJob] = []
        force = {"PYTHONUNBUFFERED": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
        defaults = {"PYTHONWARNINGS": "ignore", **hopper_selfcheck_env()}
        if args.cpu_smoke:
            force["CUDA_VISIBLE_DEVICES"] = ""
            defaults.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
        self.env = child_env(defaults, force)

    # ------------------------------------------------------------------------- setup

    def label(self, name: str) -> str:
        lay = self.layouts[name]
        return f"{name}: {lay.desc}, {lay.nproc} {self.unit if lay.nproc > 1 else self.unit1}"

    def prepare(self) -> None:
        """The work folder (new, under --work-dir), the output folders, the corpus; exits 2 on failure."""
        a = self.a
        if not a.dry_run:
            try:
                self.work = tempfile.mkdtemp(prefix="gpu_check_multi_gpu.", dir=a.work_dir)
                self.work_created = True
                os.makedirs(self.out, exist_ok=True)
                for d in (self.corr_dir, self.scale_dir):
                    shutil.rmtree(d, ignore_errors=True)
                os.makedirs(f"{self.corr_dir}/logs")
                os.makedirs(self.scale_dir)
                os.makedirs(f"{self.work}/cache")
            except OSError as exc:
                die(f"cannot create the work and output folders ({exc}; --work-dir, --out)")
        log(f"{len(a.devices)} {self.unit} ({a.where or 'unknown GPU'}); logs in {self.out}"
            + (" (dry run: nothing is run and nothing written)" if a.dry_run else ""))
        if not a.dry_run:
            self.cache_mb_start = dir_mb(triton_cache_dir())
            log(f"Triton kernel cache at start: {self.cache_mb_start} MB ({triton_cache_dir()})")
            self.launcher.run(python("tools/build_embedded_corpus.py", ["--output-dir", a.data_dir]),
                              env=self.env, echo=_first_line())
            if not (os.path.isfile(f"{self.data}.bin") and os.path.isfile(self.tokenizer)):
                die(f"no corpus in {a.data_dir} (expected corpus_text_document.bin and tokenizer.model)")

    @property
    def data(self) -> str:
        return os.path.join(self.a.data_dir, "corpus_text_document")

    @property
    def tokenizer(self) -> str:
        return os.path.join(self.a.data_dir, "tokenizer.model")

    def common(self) -> list[str]:
        """The trainer flags of every correctness run."""
        a = self.a
        return ["pretrain_olmo_hybrid.py", *shlex.split(a.corr_model), "--seq-length", str(a.seq),
                "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(a.iters),
                "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters",
                "2", "--clip-grad", "1.0", "--use-distributed-optimizer", "--no-skip-step", "--seed",
                "1234", "--data-path", self.data, "--split", "98,2,0", "--tokenizer-type",
                "SentencePieceTokenizer", "--tokenizer-model", self.tokenizer, "--log-interval", "1",
                "--eval-iters", "0", "--eval-interval", "100000",
                "--num-workers", "0" if a.cpu_smoke else "1"]

    # ------------------------------------------------------------------------- launching

    def torchrun_logged(self, log_path: str, timeout_s: int, nproc: int, args: list[str],
                        env: dict) -> int:
        """One torchrun, its command line first in the log and its exit status last."""
        cmd = torchrun(nproc, args[0], args[1:])
        visible = f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')} "
        rc = self.launcher.run(cmd, log_path, timeout_s, env, header=f"# {visible}{shown(cmd)}",
                               dry_prefix=visible)
        if not self.a.dry_run:
            with open(log_path, "a") as f:
                f.write(f"# exit status {rc}"
                        + (f" (timed out after {timeout_s} s)\n" if rc == TIMED_OUT else "\n"))
        return rc

    @property
    def init(self) -> str:
        return f"{self.work}/init_weights"

    def src_ckpt(self) -> str:
        return f"{self.work}/ckpt_{self.a.ckpt_source}"

    def write_initial_weights(self) -> None:
        """One lr=0 iteration on the CPU, saved: the weights every layout starts from."""
        path = f"{self.corr_dir}/logs/init_weights.log"
        log(f"initial weights: one lr=0 iteration on the CPU, saved to {self.init}")
        env = {**self.env, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(self.a.init_threads)}
        self.torchrun_logged(path, 300, 1, self.common() + [
            "--train-iters", "1", "--lr", "0", "--min-lr", "0", "--lr-warmup-iters", "0",
            "--micro-batch-size", "1", "--global-batch-size", "1", "--use-cpu-initialization",
            "--save", self.init, "--no-save-optim", "--data-cache-path", f"{self.work}/cache/init"], env)
        if not self.a.dry_run and not os.path.isfile(f"{self.init}/latest_checkpointed_iteration.txt"):
            with open(path, errors="replace") as f:
                print("".join(f.readlines()[-5:]), file=sys.stderr, end="")
            die(f"the initial-weights run failed (see {path})")

    def corr_run(self, case: Case, visible: str, timeout_s: int) -> int:
        """One correctness run (a layout from the initial weights, or the resume)."""
        a, name = self.a, case.name
        path = f"{self.corr_dir}/logs/{name}.log"
        env = {**self.env, "CUDA_VISIBLE_DEVICES": visible}
        if a.corr_kernels != "auto":
            env["MEGATRON_HYBRID_KERNELS"] = a.corr_kernels
        flags = list(self.layouts[name].flags)
        if name == RESUME:
            resume = f"{self.work}/ckpt_at_{a.save_at}"
            it_dir = f"iter_{a.save_at:07d}"
            if not a.dry_run:
                if not os.path.isdir(f"{self.src_ckpt()}/{it_dir}"):
                    with open(path, "w") as f:
                        f.write(f"gpu_check.py multi-gpu: error: not run: no checkpoint {self.src_ckpt()}/"
                                f"{it_dir} (did the {a.ckpt_source} run fail? see its log)\n")
                    return 1
                shutil.rmtree(resume, ignore_errors=True)
                shutil.copytree(f"{self.src_ckpt()}/{it_dir}", f"{resume}/{it_dir}")
                with open(f"{resume}/latest_checkpointed_iteration.txt", "w") as f:
                    f.write(f"{a.save_at}\n")
            flags += ["--load", resume]
        else:
            flags += ["--load", self.init, "--finetune"]
            if name == a.ckpt_source:
                flags += ["--save", self.src_ckpt(), "--save-interval", str(a.save_at)]
        dtype = ["--bf16"] if a.corr_dtype == "bf16" else []
        return self.torchrun_logged(path, timeout_s, self.layouts[name].nproc,
                                    self.common() + dtype + flags
                                    + ["--data-cache-path", f"{self.work}/cache/{name}"], env)

    def scale_run(self, case: Case, visible: str, timeout_s: int) -> int:
        """One scaling measurement: the tuner's top plan for (model, GPU count), measured."""
        model, n = case.data
        spec, tag = SCALING_MODELS[model], f"{self.scale_dir}/{model}_{n}gpu"
        cmd = python("tools/tune_parallelism.py", [
            *spec.flags, "--vocab-size", str(spec.vocab), "--num-gpus", str(n), "--gpu-memory-gb",
            self.a.gpu_memory_gb, "--seq-length", str(spec.seq), "--global-batch-size",
            str(spec.per_gpu * n), "--top", "5", "--measure", "--measure-top-k", "1", "--measure-iters",
            str(self.a.scaling_iters), "--measure-dir", tag, "--measure-output", f"{tag}.jsonl",
            "--measure-timeout", "100000"])
        env = {**self.env, "CUDA_VISIBLE_DEVICES": visible}
        return self.launcher.run(cmd, f"{tag}.log", timeout_s, env, dry_prefix=f"CUDA_VISIBLE_DEVICES={visible} ")

    # ------------------------------------------------------------------------- the parts

    def waves(self, kind: str, cap: int, run, done, skip, one_per_wave=False) -> Waves:
        return Waves(kind, self.a.devices, self.budget, self.a.min_start_s, cap, run, done, skip,
                     cpu=self.a.cpu_smoke, one_per_wave=one_per_wave, sequential=self.a.dry_run)

    def correctness_cases(self) -> list[Case]:
        """The checkpoint source first, then ref, then --layouts' order; the resume last."""
        a, cases = self.a, []
        for name in dict.fromkeys([a.ckpt_source, "ref", *a.layouts]):
            if name not in a.layouts:
                continue
            lay = self.layouts[name]
            if lay.nproc > len(a.devices):
                self.skip_corr(Case(name, lay.nproc), f"skipped: needs {lay.nproc} {self.unit}")
            else:
                cases.append(Case(name, lay.nproc))
        if any(c.name == a.ckpt_source for c in cases):
            cases.append(Case(RESUME, 1, needs=a.ckpt_source))
        else:
            self.skipped_rows.append(report.skipped_row(
                self.label(RESUME), a.ckpt_source,
                f"skipped: its source layout {a.ckpt_source} does not run here"))
        return cases

    def skip_corr(self, case: Case, reason: str) -> None:
        self.skipped_rows.append(report.skipped_row(self.label(case.name), "ref", reason))
        log(f"  {case.name}: {reason}")

    def corr_done(self, case: Case, rc: int, seconds: float, peers: int) -> None:
        self.ran.add(case.name)
        if not self.a.dry_run:
            loss = report.last_loss(f"{self.corr_dir}/logs/{case.name}.log")
            log(f"  {case.name}: exit {rc} after {seconds:.0f} s; {loss}")

    def run_correctness(self) -> list[Case]:
        a = self.a
        log(f"correctness: {a.corr_dtype}, {kernels_desc(a)}, {a.iters} iterations, sequence {a.seq}, "
            f"global batch 8, layouts: {' '.join(a.layouts)}; checkpoint source: {a.ckpt_source}")
        self.write_initial_weights()
        cases = self.correctness_cases()
        run_waves(cases, self.waves("corr", a.corr_run_timeout, self.corr_run, self.corr_done,
                                    self.skip_corr))
        return cases

    def compare(self, cases: list[Case]) -> tuple[list[str], bool]:
        """The correctness rows (ref, the layouts, the resume twice, then the skipped) and whether
        every comparison passed."""
        a, logs = self.a, f"{self.corr_dir}/logs"
        log(f"comparing losses (tools/compare_runs.py, tolerance {a.rtol} relative)")
        ref_summary = report.last_loss(f"{logs}/ref.log")
        ok = ref_summary.startswith("lm loss")
        rows = [f"| {self.label('ref')} | - | 1-{a.iters} | - | - | - | reference: "
                f"{ref_summary.replace('|', '/')} |"]
        specs = [(self.label(c.name), f"{logs}/{c.name}.log") for c in cases
                 if c.name not in ("ref", RESUME) and c.name in self.ran]
        if specs:
            more, passed = report.compare_rows("ref", f"{logs}/ref.log", f"1-{a.iters}", specs,
                                               a.rtol, a.atol)
            rows, ok = rows + more, ok and passed
        if RESUME in self.ran:
            for against in (a.ckpt_source, "ref"):
                more, passed = report.compare_rows(
                    against, f"{logs}/{against}.log", f"{a.save_at + 1}-{a.iters}",
                    [(self.label(RESUME), f"{logs}/{RESUME}.log")], a.rtol, a.atol)
                rows, ok = rows + more, ok and passed
        return rows + self.skipped_rows, ok

    def run_scaling(self) -> None:
        a, cases = self.a, []
        for n in a.scaling_gpus:
            for m in a.scaling_models:
                case = Case(f"{m}:{n}", n, data=(m, n))
                if n > len(a.devices):
                    self.skip_scale(case, f"skipped: needs {n} {self.unit}")
                else:
                    cases.append(case)
        log(f"scaling: models {' '.join(a.scaling_models)} on {' '.join(map(str, a.scaling_gpus))} "
            f"GPU(s), bf16, mock data, {a.scaling_iters} iterations each, {a.gpu_memory_gb} GiB per GPU")
        run_waves(cases, self.waves("scale", a.scaling_run_timeout, self.scale_run, self.scale_done,
                                    self.skip_scale, one_per_wave=a.scaling_serial))

    def skip_scale(self, case: Case, reason: str) -> None:
        m, n = case.data
        self.scaling_jobs.append(report.ScalingJob(m, n, reason, "-", 0))
        log(f"  scaling {m} on {n} GPU(s): {reason}")

    def scale_done(self, case: Case, rc: int, seconds: float, peers: int) -> None:
        if self.a.dry_run:
            return
        m, n = case.data
        self.scaling_jobs.append(report.ScalingJob(m, n, f"exit {rc}", f"{seconds:.0f}", peers))
        try:
            with open(f"{self.scale_dir}/{m}_{n}gpu.log", errors="replace") as f:
                found = re.search(r"measuring [^:\n]*", f.read())
        except OSError:
            found = None
        log(f"  scaling {m} on {n} GPU(s): exit {rc} after {seconds:.0f} s; "
            f"{found.group(0) if found else ''}")

    def tables(self, rows: list[str]) -> str:
        a = self.a
        over = "gloo (CPU smoke)" if a.cpu_smoke else "NCCL"
        atol = f" + {a.atol}" if float(a.atol) != 0 else ""
        text = report.correctness_table(
            f"Correctness over {over}: {a.corr_dtype}, {kernels_desc(a)}, lm loss per iteration vs "
            f"the 1-{self.unit1} run; pass: |diff| <= {a.rtol} x |loss|{atol}", rows)
        if a.scaling:
            text += "\n\n" + report.scaling_table(self.scaling_jobs, self.scale_dir, a.scaling_iters)
        return text


def kernels_desc(a) -> str:
    if a.corr_kernels == "auto":
        return "PyTorch kernels" if a.cpu_smoke else "fla kernels"
    return f"{a.corr_kernels} kernels (forced)"


def die(message: str) -> None:
    print(f"gpu_check.py multi-gpu: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _first_line():
    seen = []

    def echo(line: str) -> bool:
        seen.append(line)
        return len(seen) == 1
    return echo


def main(argv=None) -> int:
    """Run the check; the exit status (see the module docstring)."""
    check = Check(settings(argv))
    a = check.a
    raise_on_sigterm()
    try:
        check.prepare()
        cases = check.run_correctness()
        rows, ok = check.compare(cases) if not a.dry_run else ([], True)
        if a.scaling:
            check.run_scaling()
        if a.dry_run:
            log("dry run done: nothing was run, nothing written to the output folder")
            return 0
        log(f"Triton kernel cache: {check.cache_mb_start} -> {dir_mb(triton_cache_dir())} MB "
            "(tools/gpu_kernel_cache.sh save carries it to the next machine)")
        log(f"done after {check.budget.elapsed():.0f} s")
        finish(check.tables(rows), f"{check.out}/multi_gpu.md")
        return 0 if ok else 1
    except KeyboardInterrupt:
        log("interrupted: stopping the runs")
        check.launcher.stop_all()
        return 130
    finally:
        if check.work_created:
            if a.keep_work:
                log(f"checkpoints kept in {check.work}")
            else:
                shutil.rmtree(check.work, ignore_errors=True)
