"""Checkpoints of megatron-hybrid: one package for everything that reads or writes one
(``docs/design.md`` §7, ``docs/checkpoints.md``).

- ``storage``: the Megatron directory layout (``iter_XXXXXXX``, the tracker, ``run_config.yaml``),
  atomic writes, file checks, ``save_state`` / ``load_state`` over megatron-core dist checkpointing;
- ``training_state``: a training checkpoint (model, optimizer, scheduler, data position, RNG);
- ``optimizer``: the distributed optimizer's checkpoint formats and megatron-core 0.16.1's fixes;
- ``resume_checks``: what a resumed run must share with its checkpoint (tokenizer, data);
- ``reader``: reading model tensors without a process group (the HF export);
- ``reshard``: the offline TP / PP / DP change; ``reshard_cli`` its command line
  (``tools/reshard_checkpoint.py``);
- ``dump_logits``: a checkpoint's fp32 logits for given ids at any TP / PP (``tools/dump_logits.py``).
"""
