"""transformers' ``OlmoHybridForCausalLM`` trained like ours: same config, weights, tokens, AdamW.

transformers binds fla's kernels when fla imports (the GPU machine); on CPU fla is hidden before
transformers' olmo_hybrid module is imported, so its PyTorch reference path runs (docs/model.md §12).
Precision (``spec.hf_precision``): ``autocast`` = fp32 weights, gradients and AdamW state with
bf16 autocast (transformers' Trainer ``--bf16``; the counterpart of megatron's bf16 compute with
fp32 main weights); ``bf16`` = bf16 weights and AdamW state; ``fp32`` = no autocast (smoke).

Loss: mean token cross-entropy of the fp32 logits against the next tokens (no z-loss). AdamW:
``torch.optim.AdamW`` (its default foreach implementation, as megatron-core's without Transformer
Engine / apex) with the trainer's betas, eps and weight decay on every parameter but the input
embedding (docs/model.md §8), global grad-norm clipping.

Letters: B micro-batch, S sequence length, V vocabulary.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from megatron_hybrid.benchmark.spec import BenchSpec, make_batch
from megatron_hybrid.benchmark.timing import RegionTimer
from megatron_hybrid.config import OlmoHybridConfig
from megatron_hybrid.config.gdn_projection import HF_CONV_NAMES
from megatron_hybrid.hf.exporter import build_hf_config
from megatron_hybrid.hf.mapping import megatron_to_hf
from megatron_hybrid.hf.validate import hide_fla_on_cpu


def fit_to_model(hf_sd: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Released-layout HF tensors -> the names this transformers version holds in memory.

    Recent transformers keep one fused ``linear_attn.conv1d.weight`` ([q|k|v] channels) where
    the release has ``q/k/v_conv1d`` (docs/model.md §6 trap 2): concatenate them when the model wants the
    fused tensor. Tensors are cast to the model's parameter dtypes.
    """
    own = model.state_dict()
    out = dict(hf_sd)
    first = f"linear_attn.{HF_CONV_NAMES[0]}.weight"
    for key in list(out):
        if key.endswith(first):
            base = key[: -len(first)] + "linear_attn."
            if base + "conv1d.weight" in own and key not in own:
                out[base + "conv1d.weight"] = torch.cat(
                    [out.pop(f"{base}{n}.weight") for n in HF_CONV_NAMES])
    return {k: v.to(own[k].dtype) if k in own else v for k, v in out.items()}


class HFEngine:
    """transformers' model + AdamW on one fixed batch (see the module doc).

    Args:
        spec, cfg, device: as ``ours.MegatronEngine``.
        weights: ours' global Megatron state dict (``MegatronEngine.global_state_dict``) to load
            through ``hf.mapping.megatron_to_hf``, or None for transformers' own random init.

    Attributes: ``load_report`` ({"loaded", "missing", "unexpected"} or None),
    ``attn_implementation``, ``kernel_bindings`` (``diagnostics.hf_kernel_bindings``).
    """

    def __init__(self, spec: BenchSpec, cfg: OlmoHybridConfig, device: torch.device,
                 weights: dict[str, torch.Tensor] | None = None):
        hide_fla_on_cpu(device)
        from transformers import OlmoHybridForCausalLM

        from megatron_hybrid.benchmark.diagnostics import hf_kernel_bindings

        self.spec, self.cfg, self.device = spec, cfg, device
        hcfg = build_hf_config(cfg, torch.float32)  # NoPE set after construction (docs/model.md §6)
        try:
            hcfg._attn_implementation = "sdpa"
        except Exception:  # older/newer config classes: keep transformers' default
            pass
        torch.manual_seed(spec.seed)
        with torch.device(device):
            model = OlmoHybridForCausalLM(hcfg)
        if spec.hf_precision == "bf16":
            model = model.to(torch.bfloat16)
        self.model = model.train()
        self.attn_implementation = getattr(model.config, "_attn_implementation", None)
        self.kernel_bindings = hf_kernel_bindings(model)
        self.load_report = None
        if weights is not None:
            self.load_report = self._load(weights)
        self.batch = make_batch(spec, cfg.vocab_size, device)
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            (no_decay if name.endswith("embed_tokens.weight") else decay).append(p)
        self.params = decay + no_decay
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": spec.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=spec.lr, betas=(spec.adam_beta1, spec.adam_beta2), eps=spec.adam_eps)
        self.grad_norms = []

    def _load(self, weights: dict[str, torch.Tensor]) -> dict:
        hf_sd = fit_to_model(megatron_to_hf(weights, self.cfg), self.model)
        own = set(self.model.state_dict())
        missing, unexpected = self.model.load_state_dict(
            {k: v for k, v in hf_sd.items() if k in own}, strict=False)
        return {"loaded": len(own & set(hf_sd)), "missing": sorted(missing),
                "unexpected": sorted(set(hf_sd) - own)}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def _autocast(self):
        if self.spec.hf_precision == "autocast" and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, timer: RegionTimer) -> torch.Tensor:
        b = self.batch
        with timer.region("zero_grad"):
            self.optimizer.zero_grad(set_to_none=True)
        with timer.region("fwd_bwd"):
            with self._autocast():
                logits = self.model(input_ids=b["tokens"], use_cache=False).logits  # [B, S, V]
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                   b["labels"].reshape(-1))
            loss.backward()
        with timer.region("optimizer"):
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.spec.clip_grad)
            self.optimizer.step()
        self.grad_norms.append(norm.detach())
        return loss.detach()

    def close(self) -> None:
        self.model = self.optimizer = self.params = self.batch = None
