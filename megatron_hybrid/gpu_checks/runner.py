"""What every GPU check shares: launching logged subprocesses, the time budget, the results table.

A check (``megatron_hybrid/gpu_checks/<check>.py``) holds its run matrix as data (a list of case
objects), launches each case through :class:`Launcher` (``torchrun`` or ``python``, from the
repository root, output into a log under ``--out``, a time limit per launch), and prints its
results table last, also writing it as markdown into ``--out``. ``--dry-run`` prints the commands
instead of running them. Settings come from flags; environment variables of the same name (``OUT``,
``BUDGET_S`` ...) stay as fallbacks for the flags' defaults.

Units: seconds throughout (budget, time limits, wall times), MB for the Triton cache size.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Sequence

#: the repository root (the folder holding ``megatron_hybrid``, ``tools`` and the trainer); the
#: checks launch ``pretrain_olmo_hybrid.py``, ``tools/*.py`` and ``examples/*.sh`` from here
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: exit status of a launch stopped at its time limit (as coreutils ``timeout`` reports it)
TIMED_OUT = 124


def env(name: str, default: str | None = None) -> str | None:
    """The environment variable ``name`` when set and non-empty (a flag's fallback), else
    ``default`` (as the shell's ``${NAME:-default}``)."""
    value = os.environ.get(name)
    return value if value else default


def env_flag(name: str) -> bool:
    """A 0/1 environment variable as a flag's default; raises SystemExit(2) for other values."""
    value = env(name, "0")
    if value not in ("0", "1"):
        print(f"error: the environment variable {name} must be 0 or 1, got {value!r}", file=sys.stderr)
        raise SystemExit(2)
    return value == "1"


def default_out(check: str) -> str:
    """``OUT`` from the environment, else ``runs/gpu_check_<check>`` under the repository root."""
    return env("OUT", os.path.join(ROOT, "runs", f"gpu_check_{check}"))


def whole(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``minimum`` (``08`` reads as 8)."""
    def parse(text: str) -> int:
        if not text.strip().isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, got {text!r}")
        return int(text)
    return parse


def whole_list(text: str, minimum: int, name: str) -> list[int]:
    """Whole numbers >= ``minimum`` from a space-separated environment value ``name`` (a list
    flag's fallback); raises SystemExit(2) naming ``name`` for a bad one."""
    try:
        return [whole(minimum)(x) for x in text.split()]
    except argparse.ArgumentTypeError as exc:
        print(f"error: the environment variable {name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def number(minimum: float, strict: bool = False) -> Callable[[str], float]:
    """An argparse type: a decimal number >= ``minimum`` (> with ``strict``)."""
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            x = float("nan")
        if not (x > minimum if strict else x >= minimum):
            raise argparse.ArgumentTypeError(
                f"must be a number {'>' if strict else '>='} {minimum:g}, got {text!r}")
        return x
    return parse


def log(message: str) -> None:
    """Print ``[HH:MM:SS] message`` (the progress lines of every check)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def child_env(defaults: dict | None = None, force: dict | None = None) -> dict:
    """The environment of a launch: this one, ``defaults`` where unset, then ``force``."""
    out = dict(os.environ)
    for k, v in (defaults or {}).items():
        out.setdefault(k, v)
    out.update(force or {})
    return out


def torchrun(nproc: int, script: str, args: Sequence[str]) -> list[str]:
    """The command of a standalone ``torchrun`` with ``nproc`` processes on this node."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(nproc), script, *args]


def python(script: str, args: Sequence[str] = ()) -> list[str]:
    """The command of a Python script run by this interpreter."""
    return [sys.executable, script, *args]


def shown(cmd: Sequence[str]) -> str:
    """A command as one shell-quoted line (the interpreter's path shortened to ``python3``)."""
    return shlex.join(["python3" if c == sys.executable else c for c in cmd])


class Budget:
    """Seconds counted from ``start`` (epoch s; default now) against ``budget_s``."""

    def __init__(self, budget_s: float, start: float | None = None):
        self.budget_s = budget_s
        self.start = time.time() if start is None else start

    def elapsed(self) -> float:
        return time.time() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()


class Launcher:
    """Starts the launches of one check, each in its own session (process group), and ends them.

    ``run`` waits for one launch; a timeout sends SIGTERM to its group (``torchrun`` forwards it to
    its workers) and SIGKILL ``kill_after_s`` later, as ``timeout -k`` does, and gives
    :data:`TIMED_OUT`. ``stop_all`` ends every launch still running (an interrupted check ends
    exactly the runs it started). With ``dry_run`` nothing starts: the command is printed.
    """

    def __init__(self, dry_run: bool = False, kill_after_s: float = 45):
        self.dry_run, self.kill_after_s = dry_run, kill_after_s
        self._running: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def run(self, cmd: Sequence[str], log_path: str | None = None, timeout_s: float | None = None,
            env: dict | None = None, echo: Callable[[str], bool] | None = None,
            header: str | None = None, cwd: str = ROOT, dry_prefix: str = "",
            width: int | None = None) -> int:
        """Run ``cmd``; its output goes to ``log_path`` (appended after ``header``) and, line by
        line (cut at ``width`` characters), to stdout where ``echo(line)`` is true (every line
        when there is no log and no ``echo``). Returns the exit status (TIMED_OUT at
        ``timeout_s``; 0 in a dry run, where the command is printed after ``dry_prefix``)."""
        if self.dry_run:
            print(f"  (dry run) {dry_prefix}{shown(cmd)}", flush=True)
            return 0
        logf = open(log_path, "a") if log_path else None  # closed in the finally below
        try:
            if header and logf:
                logf.write(header + "\n")
                logf.flush()
            piped = echo is not None or logf is None
            proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, start_new_session=True,
                                    stdout=subprocess.PIPE if piped else logf,
                                    stderr=subprocess.STDOUT, text=piped, errors="replace")
            with self._lock:
                self._running.add(proc)
            reader = None
            if piped:
                reader = threading.Thread(target=_pump, args=(proc.stdout, logf, echo, width),
                                          daemon=True)
                reader.start()
            rc = self._wait(proc, timeout_s)
            if reader:
                reader.join(10)
            return rc
        finally:
            if logf:
                logf.close()

    def _wait(self, proc: subprocess.Popen, timeout_s: float | None) -> int:
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=self.kill_after_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            return TIMED_OUT
        finally:
            with self._lock:
                self._running.discard(proc)

    def stop_all(self) -> None:
        """SIGTERM to the group of every launch still running."""
        with self._lock:
            running = list(self._running)
        for proc in running:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)


def _pump(stream, logf, echo, width) -> None:
    """Copy a launch's output into its log and, filtered, to stdout."""
    for line in stream:
        if logf:
            logf.write(line)
            logf.flush()
        if echo is None or echo(line):
            sys.stdout.write(line if width is None else line.rstrip("\n")[:width] + "\n")
            sys.stdout.flush()


class Tail:
    """An ``echo`` filter for :meth:`Launcher.run` that shows nothing live and keeps the last
    ``n`` lines (``text``), as ``| tail -n``."""

    def __init__(self, n: int):
        self.n, self.lines = n, []

    def __call__(self, line: str) -> bool:
        self.lines = (self.lines + [line])[-self.n:]
        return False

    def text(self) -> str:
        return "".join(self.lines).rstrip("\n")


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def raise_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so a check's ``finally`` ends its launches."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table: the header, the ``|---|`` line, one line per row (cells as ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def finish(text: str, path: str | None) -> None:
    """Print the results (the last thing a check prints) and write them to ``path`` (markdown)."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text.rstrip("\n") + "\n")
    print(f"\n{text.rstrip()}", flush=True)


def pack_logs(out: str, folder: str = "logs", archive: str = "logs.tar.gz") -> str:
    """Pack ``out/folder`` into ``out/archive`` (gzip tar) and remove the folder; returns the path."""
    import shutil

    path = os.path.join(out, archive)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(os.path.join(out, folder), arcname=folder)
    shutil.rmtree(os.path.join(out, folder))
    return path


def gpu_query(fields: str) -> list[str]:
    """``nvidia-smi --query-gpu=FIELDS`` lines (one per GPU), [] without nvidia-smi."""
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [ln.strip() for ln in r.stdout.splitlines() if ln.strip()] if r.returncode == 0 else []


def dir_mb(path: str) -> int:
    """Size of a folder in MB (0 when absent), as ``du -sm``."""
    total = 0
    for base, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(base, name)).st_size
            except OSError:
                pass
    return (total + 2 ** 20 - 1) // 2 ** 20


def triton_cache_dir() -> str:
    """Triton's kernel cache (``TRITON_CACHE_DIR``, default ``~/.triton/cache``)."""
    return env("TRITON_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".triton", "cache"))


def hopper_selfcheck_env() -> dict:
    """The opt-in every GPU check sets unless told otherwise: on Hopper with Triton < 3.7.1 the
    fla gradient self-check (docs/gpu.md, "fla's Hopper guard")."""
    return {"MEGATRON_HYBRID_FLA_HOPPER_SELFCHECK": "1"}
