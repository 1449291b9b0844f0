"""Parallel-layout tuner for Olmo Hybrid training (``tools/tune_parallelism.py``).

A memory and throughput model of the trainer that knows the two layer kinds (GDN and attention):

- ``meta_model``: the parameters of each pipeline stage and TP rank, in ``named_parameters()``
  order, read from the trainer's model built on the meta device (no process group);
- ``params``: the bytes megatron-core's DDP buffers and distributed optimizer allocate for them
  (exact);
- ``activations``: the tensors autograd saves per token for a GDN layer (fla kernels), an
  attention layer (torch SDPA), the LM head and loss, under TP / SP / CP / recompute;
- ``memory``: the peak memory of each rank of a plan (1F1B in-flight micro-batches, transients);
- ``throughput``: time per iteration from FLOPs per layer kind (docs/model.md §10), H200-measured
  efficiencies, TP / CP (all-to-all) / DP / PP communication and the pipeline bubble;
- ``plans``: the candidate layouts (TP, PP, CP, DP, ...) and the constraints that refuse them;
- ``search``: evaluating and ranking plans; ``report``: tables, ``--explain``, launch flags;
  ``measure``: running plans and comparing prediction with measurement; ``cli``: the flags.
"""
