"""Training-throughput benchmark of Olmo Hybrid on one GPU (``tools/benchmark.py``).

One command, one process, one GPU: the 7B-width model (d 3840, 30 attention heads of 128, GDN 30
heads with Dk 96 / Dv 192, FFN 11008, vocabulary 100352) at a reduced depth that keeps the 3:1
GDN : attention pattern, sequence 8192, micro-batch 1, bf16, trained with AdamW on fixed random
tokens by three engines:

- ``ours``: the project's model through its training path (``model_setup.setup_model_and_optimizer``:
  megatron-core DDP, distributed optimizer, megatron-core's forward-backward schedule, z-loss);
- ``hf``: transformers' ``OlmoHybridForCausalLM`` (fla kernels where transformers binds them) with
  ``torch.optim.AdamW`` and the same hyper-parameters, on the same weights and tokens;
- ``mc``: megatron-core 0.16's own ``GatedDeltaNet`` in a hybrid stack assembled from local specs
  (megatron-core's own hybrid spec needs Transformer Engine: ``mc_peer`` records why).

Modules: ``spec`` (shapes, tokens, versions), ``timing`` (CUDA-event timers, the bf16 matmul
ceiling, the ``--max-minutes`` guard), ``ours`` (the megatron-core engines), ``breakdown``
(per-layer-kind fwd+bwd times in isolation and the ``docs/design.md`` §9 extrapolation to 32 layers),
``hf_peer``, ``mc_peer``, ``diagnostics`` (fla autotune census, transformers' kernel bindings,
profiler top kernels), ``report`` (JSON, markdown, console), ``cli`` (flags and the run order).
``conversion`` is a separate CPU benchmark of the two checkpoint converters
(``tools/bench_conversion.py``).

Units everywhere: milliseconds (``*_ms``), seconds (``*_s``), GiB, TFLOP/s; MFU in [0, 1].
"""
