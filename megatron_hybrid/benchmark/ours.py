"""The megatron-core engines: the project's model through its training path (``ours``), and the
same path with another decoder-block spec (``mc_peer`` plugs megatron-core's GatedDeltaNet in).

The model, DDP wrapper, distributed optimizer and LR scheduler come from
``megatron_hybrid.model_setup.setup_model_and_optimizer`` with a ``TrainingConfig`` parsed
by the trainer's own flag parser (``config.arguments.parse_args``); one iteration is what
``training.train.train_step`` does for one micro-batch: zero the gradient buffers, run
megatron-core's forward-backward schedule (z-loss included), step the optimizer (grad-norm
clipping inside), step the LR schedule.

Letters: B micro-batch, S sequence length, V vocabulary rows.
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from unittest import mock

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_hybrid.benchmark.spec import BenchSpec, make_batch
from megatron_hybrid.benchmark.timing import RegionTimer
from megatron_hybrid.config import OlmoHybridConfig
from megatron_hybrid.config.arguments import parse_args
from megatron_hybrid.model_setup import setup_model_and_optimizer
from megatron_hybrid.training.loss import lm_loss_with_z_loss


def training_args(spec: BenchSpec, cfg: OlmoHybridConfig):
    """The trainer's ``TrainingConfig`` for the benchmark (world size 1, TP = PP = DP = 1).

    Distributed optimizer, bf16 (``--bf16``: bf16 weights and compute, fp32 main weights,
    gradients and Adam state) unless ``spec.dtype`` is fp32, constant LR, Olmo weight-decay
    grouping, no recompute, synthetic tokens.
    """
    flags = ["--seq-length", str(spec.seq_length), "--micro-batch-size",
             str(spec.micro_batch_size), "--global-batch-size", str(spec.micro_batch_size),
             "--train-iters", "100000", "--lr", repr(spec.lr), "--min-lr", repr(spec.min_lr),
             "--lr-decay-style", "constant", "--weight-decay", repr(spec.weight_decay),
             "--adam-beta1", repr(spec.adam_beta1), "--adam-beta2", repr(spec.adam_beta2),
             "--adam-eps", repr(spec.adam_eps), "--clip-grad", repr(spec.clip_grad),
             "--z-loss-weight", repr(spec.z_loss_weight), "--use-distributed-optimizer",
             "--mock-data", "--vocab-size", str(cfg.vocab_size), "--seed", str(spec.seed)]
    if spec.dtype == "bf16":
        flags.append("--bf16")
    return parse_args(flags, world_size=1)


@contextlib.contextmanager
def block_spec_override(fn: Callable | None):
    """Build ``OlmoHybridModel`` with ``fn(layer_types, backend)`` as its decoder-block spec.

    ``OlmoHybridModel.__init__`` resolves ``hybrid_block_spec`` from ``megatron_hybrid.model``;
    patching that name swaps the layers while everything else (embedding, output layer, DDP,
    optimizer) stays the training path's. ``fn=None``: no change.
    """
    if fn is None:
        yield
        return
    import megatron_hybrid.model as model_module

    with mock.patch.object(model_module, "hybrid_block_spec", fn):
        yield


class MegatronEngine:
    """One model + DDP + distributed optimizer, trained on one fixed batch.

    Args:
        spec: the benchmark configuration. cfg: the model (``spec.num_layers`` layers).
        device: the CUDA device (CPU in smoke mode).
        block_spec_fn: optional decoder-block spec builder (see ``block_spec_override``).

    ``step(timer)`` is one training iteration (regions ``zero_grad``, ``fwd_bwd``,
    ``optimizer``) and returns the lm loss (cross-entropy without the z-loss term) as a 0-dim
    tensor.
    """

    def __init__(self, spec: BenchSpec, cfg: OlmoHybridConfig, device: torch.device,
                 block_spec_fn: Callable | None = None):
        self.spec, self.cfg, self.device = spec, cfg, device
        self.args = training_args(spec, cfg)
        with block_spec_override(block_spec_fn):
            self.setup = setup_model_and_optimizer(self.args, cfg, device)
        self.batch = make_batch(spec, cfg.vocab_size, device)
        self.grad_norms = []

    @property
    def unwrapped(self):
        """The bare GPTModel (bf16 parameters under ``--bf16``)."""
        return self.setup.unwrapped

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.unwrapped.parameters())

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None)   # logits [B, S, V]

        def loss_func(output_tensor):
            total, lm, _ = lm_loss_with_z_loss(output_tensor, batch["labels"],
                                               batch["loss_mask"], self.spec.z_loss_weight)
            return total, {"lm loss": lm}

        return output, loss_func

    def step(self, timer: RegionTimer) -> torch.Tensor:
        s = self.setup
        with timer.region("zero_grad"):
            s.model.zero_grad_buffer()
            s.optimizer.zero_grad()
        with timer.region("fwd_bwd"):
            reports = get_forward_backward_func()(
                forward_step_func=self._forward_step, data_iterator=itertools.repeat(self.batch),
                model=[s.model], num_microbatches=1, seq_length=self.spec.seq_length,
                micro_batch_size=self.spec.micro_batch_size, forward_only=False)
        with timer.region("optimizer"):
            _, grad_norm, _ = s.optimizer.step()
            s.scheduler.step(increment=1)
        self.grad_norms.append(grad_norm)
        return reports[0]["lm loss"]

    def global_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's tensors on the CPU under global Megatron names (TP = PP = 1), no extras."""
        return {k: v.detach().to("cpu", copy=True)
                for k, v in self.unwrapped.state_dict().items()
                if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}

    def load_weights(self, global_sd: dict[str, torch.Tensor]) -> dict:
        """Copy matching tensors into the model, then refresh the optimizer's fp32 main weights.

        Returns {"loaded", "missing", "unexpected", "mismatched"} (key lists; ``_extra_state``
        entries ignored). Tensors whose shapes differ are not loaded.
        """
        own = {k: v for k, v in self.unwrapped.state_dict().items()
               if not k.endswith("_extra_state")}
        loadable = {k: v for k, v in global_sd.items()
                    if k in own and tuple(own[k].shape) == tuple(v.shape)}
        mismatched = sorted(k for k in global_sd if k in own and k not in loadable)
        with torch.no_grad():
            for k, v in loadable.items():
                own[k].copy_(v)
        self.setup.optimizer.reload_model_params()
        return {"loaded": len(loadable), "missing": sorted(set(own) - set(loadable)),
                "unexpected": sorted(set(global_sd) - set(own)), "mismatched": mismatched}

    def close(self) -> None:
        """Drop the model, optimizer and the config's references to them (frees GPU memory
        once garbage-collected)."""
        if self.setup is None:
            return
        tcfg = self.setup.transformer_config
        for attr in ("finalize_model_grads_func", "grad_scale_func", "no_sync_func",
                     "grad_sync_func", "param_sync_func"):
            if hasattr(tcfg, attr):
                setattr(tcfg, attr, None)
        self.setup = None
        self.batch = None


def prepare_fla_backward(cfg: OlmoHybridConfig, device: torch.device) -> str | None:
    """Apply the project's fla Hopper-guard policy before a peer runs fla's GDN backward.

    fla 0.6.0 refuses the gated-delta-rule backward on Hopper with Triton < 3.7.1 for every
    caller (transformers and megatron-core call fla directly). ``runtime.hopper_guard`` lifts
    that guard process-wide only after its gradient self-check passed, and only with
    ``MEGATRON_HYBRID_FLA_HOPPER_SELFCHECK=1``; ours has already triggered it when it ran first.

    Returns None when fla's backward may run (or fla is not in use), else the refusal message
    (the peer then fails with it).
    """
    if device.type != "cuda":
        return None
    from megatron_hybrid.kernels.fla_backend import fla_available

    if not fla_available():
        return None
    from megatron_hybrid.runtime import hopper_guard

    try:
        hopper_guard.ensure_fla_gdn_backward_allowed(
            cfg.linear_key_head_dim, cfg.linear_value_head_dim, torch.bfloat16, device,
            H=cfg.linear_num_key_heads, HV=cfg.linear_num_value_heads)
    except RuntimeError as err:
        return str(err)
    return None
