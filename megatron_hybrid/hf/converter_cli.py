"""Checkpoint conversion between Hugging Face ``olmo_hybrid`` and megatron-hybrid checkpoints."""
import warnings

#: library warnings that say nothing to a converter's user (the local, non-TE path is intended)
_QUIET = (r".*(Transformer Engine|Apex).*not installed.*", r".*full scope is deprecated.*",
          r".*`load_state_dict` is deprecated.*")


def quiet_library_warnings() -> None:
    """Silence megatron-core's import-time and deprecation warnings irrelevant to conversion."""
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)


def peak_rss_gb() -> float:
    """This process's peak resident set size in GB (Linux ``ru_maxrss`` is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def run_converter(convert, args) -> int:
    """A converter's ``main``: ``convert(args)`` -> exit status, with one-line errors.

    Warnings print as ``warning: ...``; library noise is silenced; SIGTERM (kill, a scheduler's
    time limit) unwinds like Ctrl-C, so the temporary directory beside ``--save`` is removed
    instead of left behind. ValueError / KeyError / RuntimeError / OSError print ``error: ...``
    on stderr and give status 1.
    """
    import signal
    import sys

    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    quiet_library_warnings()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        return convert(args)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        # KeyError's str() is the repr of its message: print the message itself
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 1
