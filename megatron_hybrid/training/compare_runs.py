"""Compare the per-iteration losses of training logs with a reference run's.

    python tools/compare_runs.py --reference runs/ref.log [--iterations 1-20] [--rtol 1e-3] \\
        "TP2 SP=runs/tp2_sp.log" runs/pp2.log ...

Reads the iteration lines ``pretrain_olmo_hybrid.py`` prints (Megatron's format, written by
``megatron_hybrid/training/metrics.py``; log with ``--log-interval 1`` to get every iteration)::

     [2026-11-29 10:00:00] iteration       10/      20 | consumed samples: ... | lm loss: 5.123456E+00 | ...

and, for each run (``NAME=LOG``, or ``LOG`` named after its file), compares the metric
(``--metric``, default ``lm loss``) at every iteration of ``--iterations`` (default: every
iteration of the reference) with the reference's. An iteration passes when
``|run - reference| <= atol + rtol * |reference|``. A run fails at the first iteration beyond the
tolerance, at a non-finite value, and when iterations are missing from its log (a crashed,
timed-out or resumed run: which iterations, where the log starts and ends, and the first error
line of the log are named) or from the reference's.

Prints a markdown table, one row per run (``--no-header``: rows only, for assembling a table from
several calls): iterations compared, the largest absolute and relative difference and where, and
``pass`` or ``FAIL: <reason>``. ``--json FILE`` writes the same as a list of objects.
Exit status: 0 when every run passes, 1 when one fails, 2 for bad arguments: a log that does not
exist or cannot be read, a ``--metric`` that no iteration line of any log holds (names are spelled
as in the log, e.g. ``lm loss``, ``z loss``), a ``--json`` file that cannot be written (checked
before comparing), a bad ``--iterations``, ``--rtol`` or ``--atol``.
Standard library only (no torch import): it runs anywhere in a fraction of a second.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

#: ``iteration <n>/<total> |`` of a training line (validation lines say ``at iteration <n> |``).
_ITERATION = re.compile(r"\biteration\s+(\d+)/\s*\d+\s*\|")
#: A line that states an error: ``SomeError: ...`` / ``...Exception: ...`` (Python, NCCL), or
#: ``prog: error: ...`` (argparse and the trainer's own messages).
_ERROR = re.compile(r"[\w.]*(?:Error|Exception)\b\s*:|:\s*error\s*:")
#: ``| name: value |`` fields of an iteration line (the names ``--metric`` accepts).
_FIELD = re.compile(r"\|\s*([A-Za-z][^|:]*?)\s*:\s*[-+.\w]+\s*(?=\|)")
#: torchrun's failure summary and similar echoes, which name no cause.
_NOISE = re.compile(r"ChildFailedError|error_file|traceback\s*:|To enable traceback|warning",
                    re.IGNORECASE)
_TIMED_OUT = re.compile(r"timed out after \d+ ?s")


@dataclass
class ParsedLog:
    """What a training log holds: ``values`` {iteration: metric} (the last line wins when an
    iteration repeats, as after a relaunch), iterations whose line lacks the metric (a skipped
    update logs no loss), repeated iterations, the first line that states an error (the cause,
    usually: other ranks fail after it) and whether the run was stopped by a timeout (the
    ``timed out after N s`` line ``tools/gpu_check.py multi-gpu`` appends) and the field names of
    the iteration lines (``fields``, in their order: what ``--metric`` can name)."""

    values: dict[int, float] = field(default_factory=dict)
    without_metric: list[int] = field(default_factory=list)
    repeated: list[int] = field(default_factory=list)
    first_error: str | None = None
    timed_out: bool = False
    found: bool = True  # False: the file does not exist
    fields: list[str] = field(default_factory=list)

    @property
    def first_iteration(self) -> int | None:
        its = list(self.values) + self.without_metric
        return min(its) if its else None

    @property
    def last_iteration(self) -> int | None:
        its = list(self.values) + self.without_metric
        return max(its) if its else None


@dataclass
class Comparison:
    """One run against the reference."""

    run: str
    reference: str
    iterations: str            # the compared range, e.g. "1-20"
    compared: int              # iterations present in both
    max_abs_diff: float | None
    max_rel_diff: float | None
    worst_iteration: int | None
    passed: bool
    result: str                # "pass" or "FAIL: <reason>"
    rtol: float
    atol: float


def _metric_pattern(metric: str) -> re.Pattern:
    return re.compile(r"\|\s*" + re.escape(metric) + r":\s*([^\s|]+)\s*\|")


def parse_log_text(text: str, metric: str = "lm loss") -> ParsedLog:
    """Parse the text of a training log (see the module docstring for the line format)."""
    out = ParsedLog()
    value_re = _metric_pattern(metric)
    seen = set()
    for line in text.splitlines():
        m = _ITERATION.search(line)
        if m is None:
            if _TIMED_OUT.search(line):
                out.timed_out = True
            elif (out.first_error is None and _ERROR.search(line)
                  and not _NOISE.search(line)):
                out.first_error = line.strip()
            continue
        it = int(m.group(1))
        for name in _FIELD.findall(line, m.end() - 1):
            if name not in out.fields:
                out.fields.append(name)
        if it in seen:
            out.repeated.append(it)
        seen.add(it)
        v = value_re.search(line, m.end())
        if v is None:
            out.values.pop(it, None)
            if it not in out.without_metric:
                out.without_metric.append(it)
            continue
        try:
            out.values[it] = float(v.group(1))
        except ValueError:  # a garbled number counts as non-finite
            out.values[it] = float("nan")
        if it in out.without_metric:
            out.without_metric.remove(it)
    return out


def parse_log(path: str, metric: str = "lm loss") -> ParsedLog:
    """Parse the log file ``path`` (any readable file: ``/dev/null`` is an empty log); a missing
    file gives ``found=False`` (no values). Other errors (a directory, no permission) raise
    OSError."""
    if not os.path.exists(path):
        return ParsedLog(found=False)
    with open(path, errors="replace") as f:
        return parse_log_text(f.read(), metric)


def parse_range(text: str) -> tuple[int, int]:
    """``"11-20"`` -> (11, 20); ``"5"`` -> (5, 5). Raises ValueError for anything else."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not m:
        raise ValueError(f"--iterations {text!r}: expected FIRST-LAST, e.g. 1-20")
    first, last = int(m.group(1)), int(m.group(2) or m.group(1))
    if first < 1 or last < first:
        raise ValueError(f"--iterations {text!r}: need 1 <= FIRST <= LAST")
    return first, last


def format_ranges(its: Sequence[int]) -> str:
    """[1, 2, 3, 7, 9, 10] -> "1-3, 7, 9-10"."""
    its = sorted(set(its))
    parts: list[str] = []
    i = 0
    while i < len(its):
        j = i
        while j + 1 < len(its) and its[j + 1] == its[j] + 1:
            j += 1
        parts.append(str(its[i]) if i == j else f"{its[i]}-{its[j]}")
        i = j + 1
    return ", ".join(parts)


def _join(parts: Sequence[str]) -> str:
    """["a"] -> "a"; ["a", "b", "c"] -> "a, b and c"."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _missing_reason(who: str, log: ParsedLog, missing: list[int], path: str,
                    metric: str = "lm loss") -> str:
    """``run lacks iterations 1-4 (log starts at iteration 5) and 7-20 (log ends at iteration
    6)``: the missing iterations grouped by why, plus a timeout and the log's first error."""
    if not log.found:
        return f"{who} log not found ({path})"
    first, last = log.first_iteration, log.last_iteration
    timed_out = ", timed out" if log.timed_out else ""
    if first is None:
        text = (f"{who} lacks iterations {format_ranges(missing)} (no iteration lines in "
                f"{path or 'the log'}{timed_out})")
    else:
        before = [i for i in missing if i < first]
        after = [i for i in missing if i > last]
        inside = [i for i in missing if first <= i <= last]
        no_metric = [i for i in inside if i in log.without_metric]
        gaps = [i for i in inside if i not in log.without_metric]
        parts = []
        if before:
            parts.append(f"{format_ranges(before)} (log starts at iteration {first})")
        if gaps:
            parts.append(f"{format_ranges(gaps)} (not in the log)")
        if no_metric:
            parts.append(f"{format_ranges(no_metric)} (logged without {metric})")
        if after:
            parts.append(f"{format_ranges(after)} (log ends at iteration {last}{timed_out})")
        text = f"{who} lacks iterations {_join(parts)}"
        if timed_out and not after:
            text += " (timed out)"
    if log.first_error:
        err = log.first_error if len(log.first_error) <= 200 else log.first_error[:197] + "..."
        text += f"; first error: {err}"
    return text


def compare(run: str, run_log: ParsedLog, reference: str, ref_log: ParsedLog,
            iterations: tuple[int, int] | None = None, rtol: float = 1e-3, atol: float = 0.0,
            run_path: str = "", ref_path: str = "", metric: str = "lm loss") -> Comparison:
    """Compare ``run_log`` with ``ref_log`` over ``iterations`` (default: every iteration of the
    reference); see the module docstring for the pass rule."""
    if iterations is None:
        ref_its = sorted(ref_log.values)
        wanted = list(range(ref_its[0], ref_its[-1] + 1)) if ref_its else []
        label = f"{ref_its[0]}-{ref_its[-1]}" if ref_its else "-"
    else:
        wanted = list(range(iterations[0], iterations[1] + 1))
        label = f"{iterations[0]}-{iterations[1]}"
    problems: list[str] = []
    if not wanted:
        if not ref_log.found:
            problems.append(f"reference log not found ({ref_path})")
        else:
            problems.append(f"reference has no iteration line with {metric}"
                            + (f"; first error: {ref_log.first_error[:200]}"
                               if ref_log.first_error else ""))
    ref_missing = [i for i in wanted if i not in ref_log.values]
    if wanted and ref_missing:
        problems.append(_missing_reason("reference", ref_log, ref_missing, ref_path, metric))
    run_missing = [i for i in wanted if i not in run_log.values]
    if wanted and run_missing:
        no_metric = [i for i in run_missing if i in run_log.without_metric]
        if run_log.found and no_metric and len(no_metric) == len(run_missing):
            problems.append(f"iterations {format_ranges(no_metric)} logged no {metric} "
                            f"(skipped updates?)")
        else:
            problems.append(_missing_reason("run", run_log, run_missing, run_path, metric))
    both = [i for i in wanted if i in ref_log.values and i in run_log.values]
    max_abs = max_rel = None
    worst = None
    first_bad: str | None = None
    for i in both:
        a, r = run_log.values[i], ref_log.values[i]
        if not (math.isfinite(a) and math.isfinite(r)):
            if first_bad is None:
                first_bad = f"iteration {i}: non-finite {metric} ({a!r} vs reference {r!r})"
            continue
        d = abs(a - r)
        rel = d / abs(r) if r != 0 else (0.0 if d == 0 else math.inf)
        if max_abs is None or d > max_abs:
            max_abs, worst = d, i
        max_rel = rel if max_rel is None else max(max_rel, rel)
        if d > atol + rtol * abs(r) and first_bad is None:
            first_bad = (f"iteration {i}: {a:.7g} vs reference {r:.7g} (diff {d:.3g}, "
                         f"rel {rel:.3g}, allowed {atol + rtol * abs(r):.3g})")
    if first_bad:
        problems.insert(0, first_bad)
    passed = not problems and bool(both)
    return Comparison(run=run, reference=reference, iterations=label, compared=len(both),
                      max_abs_diff=max_abs, max_rel_diff=max_rel, worst_iteration=worst,
                      passed=passed, result="pass" if passed else "FAIL: " + "; ".join(problems),
                      rtol=rtol, atol=atol)


def tolerance_text(rtol: float, atol: float) -> str:
    """``"rel 1e-03"`` or ``"rel 1e-03 + abs 1e-06"``."""
    return f"rel {rtol:.0e}" + (f" + abs {atol:.0e}" if atol else "")


HEADER = ("| run | reference | iterations | max abs diff (iteration) | max rel diff | tolerance "
          "| result |\n|---|---|---|---|---|---|---|")


def markdown_row(c: Comparison) -> str:
    """One table row of ``c``."""
    absd = "-" if c.max_abs_diff is None else f"{c.max_abs_diff:.2e} ({c.worst_iteration})"
    reld = "-" if c.max_rel_diff is None else f"{c.max_rel_diff:.2e}"
    return (f"| {c.run} | {c.reference} | {c.iterations} ({c.compared} compared) | {absd} | "
            f"{reld} | {tolerance_text(c.rtol, c.atol)} | {c.result.replace('|', '/')} |")


def _split_spec(spec: str) -> tuple[str, str]:
    """``NAME=LOG`` -> (NAME, LOG); ``LOG`` -> (file name without extension, LOG)."""
    if "=" in spec:
        name, path = spec.split("=", 1)
        if name.strip() and path:
            return name.strip(), path
    return os.path.splitext(os.path.basename(spec))[0], spec


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="compare_runs.py", description=__doc__.split("\n")[0],
        epilog="Exit status: 0 all pass, 1 a run fails, 2 bad arguments.")
    p.add_argument("runs", nargs="+", metavar="[NAME=]LOG", help="training logs to check")
    p.add_argument("--reference", required=True, metavar="[NAME=]LOG",
                   help="the log the runs must match (e.g. the one-GPU run)")
    p.add_argument("--iterations", default=None, metavar="FIRST-LAST",
                   help="iterations to compare (default: every iteration of the reference)")
    p.add_argument("--rtol", type=float, default=1e-3,
                   help="relative tolerance (default 1e-3: layouts differ by reduction order)")
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0)")
    p.add_argument("--metric", default="lm loss",
                   help="the logged value to compare, named as in the log's iteration lines "
                        "(e.g. 'lm loss', 'z loss', 'grad norm'; default: 'lm loss')")
    p.add_argument("--no-header", action="store_true", help="print the table rows only")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write the results here (checked to be writable before comparing)")
    return p


def _read_log(what: str, path: str, metric: str) -> ParsedLog:
    """parse_log, with a missing or unreadable file raised as ValueError (bad arguments)."""
    if not os.path.exists(path):
        raise ValueError(f"{what} log {path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{what} log {path}: is a directory, not a log file")
    try:
        return parse_log(path, metric)
    except OSError as err:
        raise ValueError(f"{what} log {path}: cannot read it ({err.strerror or err})") from None


def _check_writable(path: str) -> None:
    """Raise ValueError unless ``path`` can be written (its folder exists and is writable, and
    the file, when it exists, is a writable file); writes nothing."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"--json {path}: is a directory")
    if not os.path.isdir(folder):
        raise ValueError(f"--json {path}: folder {folder} does not exist")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise ValueError(f"--json {path}: not writable")
    elif not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--json {path}: cannot create files in {folder}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        iterations = parse_range(args.iterations) if args.iterations else None
        if args.rtol < 0 or args.atol < 0 or not (math.isfinite(args.rtol)
                                                  and math.isfinite(args.atol)):
            raise ValueError(f"--rtol {args.rtol} / --atol {args.atol}: must be finite and >= 0")
        if args.json:
            _check_writable(args.json)
        ref_name, ref_path = _split_spec(args.reference)
        ref_log = _read_log("--reference", ref_path, args.metric)
        runs = []
        for spec in args.runs:
            name, path = _split_spec(spec)
            runs.append((name, path, _read_log("run", path, args.metric)))
        logs = [ref_log] + [log for _, _, log in runs]
        if not any(log.values for log in logs) and any(log.fields for log in logs):
            names = []
            for log in logs:
                names += [n for n in log.fields if n not in names]
            raise ValueError(f"--metric {args.metric!r}: no iteration line of the logs holds it "
                             f"(names as in the log: {', '.join(repr(n) for n in names)})")
    except ValueError as err:
        print(f"compare_runs.py: error: {err}", file=sys.stderr)
        return 2
    results = [compare(name, log, ref_name, ref_log, iterations, args.rtol, args.atol,
                       run_path=path, ref_path=ref_path, metric=args.metric)
               for name, path, log in runs]
    if not args.no_header:
        print(HEADER)
    for c in results:
        print(markdown_row(c))
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump([asdict(c) for c in results], f, indent=1)
        except OSError as err:
            print(f"compare_runs.py: error: --json {args.json}: cannot write it "
                  f"({err.strerror or err})", file=sys.stderr)
            return 2
    return 0 if all(c.passed for c in results) else 1

