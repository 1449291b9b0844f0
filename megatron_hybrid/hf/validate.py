"""Check a conversion by logits: the same tokens through the Megatron model and transformers.

A conversion that passes key and shape checks can still be wrong (a right-shaped tensor under
the wrong name gave a published hybrid conversion a 38 % logit error, spec ``docs/model.md`` §6
trap 8), so converters compare logits. The two models run one after the other, in fp32 on the
CPU, so peak memory is one fp32 model (4 bytes per parameter). Before the Megatron forward its
weights are rounded through the exported dtype, so only implementation differences remain.

Letters: B batch, T tokens, V vocabulary (the HF config's ``vocab_size``).
"""
from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass

import torch

#: tokens compared by default: [B, T] = [2, 32], ids drawn with this seed
DEFAULT_SHAPE = (2, 32)
SEED = 1234


@dataclass
class LogitComparison:
    """max |dlogits| between the Megatron model and transformers, and the reference scale."""

    max_abs_diff: float
    max_abs_logit: float
    shape: tuple

    def summary(self) -> str:
        """One line for logs."""
        return (f"max |dlogits| = {self.max_abs_diff:.3e} over {list(self.shape)} logits "
                f"(max |logit| {self.max_abs_logit:.2f})")


def validation_ids(vocab_size: int, shape=DEFAULT_SHAPE) -> torch.Tensor:
    """Deterministic token ids [B, T] in [0, vocab_size)."""
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(0, vocab_size, shape, generator=g)


def hide_fla_on_cpu(device: torch.device | None = None) -> None:
    """Keep transformers from binding fla's Triton kernels (they need a GPU) when the model will
    run on the CPU: ``device`` not CUDA, or no CUDA at all when no device is given. Call it before
    transformers' olmo_hybrid module is imported."""
    on_cpu = device.type != "cuda" if device is not None else not torch.cuda.is_available()
    if on_cpu and "fla" not in sys.modules:
        sys.modules["fla"] = None


def megatron_logits(load: str, input_ids: torch.Tensor, iteration: int | None = None,
                    round_to: torch.dtype | None = None) -> torch.Tensor:
    """fp32 logits [B, T, V] of checkpoint ``load`` at TP = PP = 1 in this process.

    Args:
        round_to: round every weight through this dtype first (what an export in it keeps).
    Initializes a single-process gloo group when none exists.
    """
    from megatron_hybrid.checkpoint.storage import load_model_checkpoint, read_run_config
    from megatron_hybrid.config import OlmoHybridConfig
    from megatron_hybrid.forward import forward_logits
    from megatron_hybrid.model import OlmoHybridModel
    from megatron_hybrid.parallel import initialize_distributed

    cfg = OlmoHybridConfig.from_dict(read_run_config(load, iteration)["model"])
    initialize_distributed(1, 1)
    model = OlmoHybridModel(cfg, cfg.to_transformer_config(
        1, 1, perform_initialization=False, use_cpu_initialization=True))
    load_model_checkpoint(load, model, iteration)
    if round_to is not None and round_to != torch.float32:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(round_to).float())
    model.eval()
    with torch.no_grad():
        logits = forward_logits(model, input_ids, vocab_size=cfg.vocab_size).float().cpu()
    del model
    gc.collect()
    return logits


def transformers_logits(hf_dir: str, input_ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits [B, T, V] of ``hf_dir`` loaded with transformers (pure-torch path on CPU)."""
    hide_fla_on_cpu()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()  # kernel fall-back notices, load reports
    transformers.utils.logging.disable_progress_bar()

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits.float()
    del model
    gc.collect()
    return logits


def compare_logits(load: str, hf_dir: str, iteration: int | None = None,
                   round_to: torch.dtype | None = None,
                   input_ids: torch.Tensor | None = None) -> LogitComparison:
    """Run the same ids through checkpoint ``load`` and HF directory ``hf_dir``; compare.

    Raises: ValueError when the two logit tensors differ in shape (a vocabulary mismatch).
    """
    from megatron_hybrid.checkpoint.storage import read_run_config

    vocab = read_run_config(load, iteration)["model"]["vocab_size"]
    ids = validation_ids(vocab) if input_ids is None else input_ids
    ref = megatron_logits(load, ids, iteration, round_to)
    got = transformers_logits(hf_dir, ids)
    if ref.shape != got.shape:
        raise ValueError(f"logit shapes differ: Megatron {tuple(ref.shape)}, transformers "
                         f"{tuple(got.shape)}")
    return LogitComparison(float((ref - got).abs().max()), float(ref.abs().max()),
                           tuple(ref.shape))
