"""Checkpoint conversion between Hugging Face ``olmo_hybrid`` and megatron-hybrid checkpoints."""
import warnings

#: library warnings that say nothing to a converter's user (the local, non-TE path is intended)
_QUIET = (r".*(Transformer Engine|Apex).*not installed.*", r".*full scope is deprecated.*",
          r".*`load_state_dict` is deprecated.*")


def quiet_library_warnings() -> None:
    """Silence megatron-core's import-time and deprecation warnings irrelevant to conversion."""
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)
