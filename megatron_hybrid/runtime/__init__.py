"""Run-time machinery around the kernels, apart from their math (``docs/architecture.md``).

- ``hopper_guard``: fla 0.6.0's Hopper guard for the gated chunk backward and its opt-in self-check;
- ``fla_warmup``: fla's Triton autotune candidates compiled in parallel worker processes;
- ``kernel_warmup``: the trainer's use of it (the GDN shapes of one run, once per node);
- ``local_workers``: forked CPU worker processes over gloo for offline tools.
"""
