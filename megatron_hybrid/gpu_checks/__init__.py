"""GPU checks: the drivers behind ``tools/gpu_check.py`` (``docs/gpu.md``)."""
