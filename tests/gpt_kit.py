"""A tiny megatron-core GPT "kit" shared by the compat tests and the optimizer-checkpoint tests.

megatron-core's own GPTModel on ``get_gpt_layer_local_spec()`` (RMSNorm,
use_cpu_initialization=True, dropout 0), run through megatron's schedules, DDP and distributed
optimizer, so multi-process tests can compare layouts against TP1/PP1 runs.
"""
from __future__ import annotations

import re

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig

VOCAB, SEQ, MICRO_BATCH, NUM_MICRO, LAYERS = 64, 16, 2, 2, 2


class GPTKit:
    """Tiny GPT on the local spec: config, model, data, loss via megatron's schedules."""

    @staticmethod
    def config(tp=1, pp=1, sp=False, **overrides) -> TransformerConfig:
        """TransformerConfig for a 2-layer h64 GPT at the given layout (fp32, dropout 0)."""
        kwargs = dict(
            num_layers=LAYERS, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
            num_query_groups=2, normalization="RMSNorm", use_cpu_initialization=True,
            hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp, sequence_parallel=sp, pipeline_dtype=torch.float32,
            add_bias_linear=False,
        )
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)

    @staticmethod
    def build(config: TransformerConfig, tied: bool = False) -> GPTModel:
        """GPTModel for this pipeline stage (RoPE; embeddings untied unless ``tied``)."""
        return GPTModel(
            config=config,
            transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
            vocab_size=VOCAB, max_sequence_length=SEQ,
            pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
            position_embedding_type="rope", share_embeddings_and_output_weights=tied,
        )

    @staticmethod
    def batches(seed=0, num_micro=NUM_MICRO):
        """`num_micro` micro-batches of token ids/labels, identical on every rank."""
        gen = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(num_micro):
            tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=gen)
            out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:]})
        return out

    @staticmethod
    def _forward_step(data_iterator, model):
        batch = next(data_iterator)
        position_ids = torch.arange(SEQ).unsqueeze(0).expand(MICRO_BATCH, SEQ)
        output = model(batch["tokens"], position_ids, None, labels=batch["labels"])

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    @classmethod
    def forward_backward(cls, model, batches, forward_only=False):
        """Run megatron's `get_forward_backward_func()`; micro-batch losses (last stage) or []."""
        fwd_bwd = get_forward_backward_func()
        out = fwd_bwd(
            forward_step_func=cls._forward_step, data_iterator=iter(batches), model=[model],
            num_microbatches=len(batches), seq_length=SEQ, micro_batch_size=MICRO_BATCH,
            forward_only=forward_only,
        )
        return [float(d["loss"]) for d in out]

    @staticmethod
    def stage_state_dict(full_state: dict, config: TransformerConfig) -> dict:
        """Entries of a PP1 state dict that belong to this pipeline stage, layers renumbered."""
        per_stage = config.num_layers // ps.get_pipeline_model_parallel_world_size()
        offset = ps.get_pipeline_model_parallel_rank() * per_stage
        out = {}
        for key, value in full_state.items():
            match = re.match(r"decoder\.layers\.(\d+)\.(.*)", key)
            if match:
                local = int(match.group(1)) - offset
                if 0 <= local < per_stage:
                    out[f"decoder.layers.{local}.{match.group(2)}"] = value
            elif key.startswith("embedding."):
                if ps.is_pipeline_first_stage():
                    out[key] = value
            elif ps.is_pipeline_last_stage():
                out[key] = value
        return out

    @classmethod
    def train(cls, config: TransformerConfig, steps=3, lr=1e-2):
        """DDP + distributed Adam (fp32) for `steps` steps; returns (losses, grad norms, model)."""
        config.finalize_model_grads_func = finalize_model_grads
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=True, overlap_grad_reduce=False
        )
        model = DistributedDataParallel(config, ddp_config, module=cls.build(config))
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=lr, use_distributed_optimizer=True, bf16=False,
                            clip_grad=1.0),
            [model],
        )
        losses, norms = [], []
        for step in range(steps):
            model.zero_grad_buffer()
            optimizer.zero_grad()
            losses.append(cls.forward_backward(model, cls.batches(seed=step)))
            ok, grad_norm, _ = optimizer.step()
            assert ok
            norms.append(float(grad_norm))
        return losses, norms, model
