"""GPU checks: the drivers behind ``tools/gpu_check.py`` (``docs/gpu.md``, "GPU checks").

- ``cli``: the subcommands (gdn, training, features, benchmark, long-context, tuner, multi-gpu);
- ``runner``: what they share (logged launches in their own process group, the time budget, the
  results table printed last and written as markdown, flags with environment fallbacks);
- one module per check, its run matrix as data: ``gdn``, ``training``, ``features``, ``benchmark``,
  ``long_context``, ``tuner``, ``multi_gpu`` (with ``multi_gpu_settings``, ``multi_gpu_report`` and
  the first-fit wave scheduler ``scheduler``).
"""
