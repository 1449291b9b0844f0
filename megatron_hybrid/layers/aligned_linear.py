"""A column-parallel linear whose GEMM output width is padded to a multiple of 64 on GPUs.

Letters: S sequence length, B micro-batch, D input width, N output width per TP rank,
N_pad = N rounded up to a multiple of ``ALIGN``.

Why: the GDN's fused in_proj has N = ``GdnProjectionLayout.in_proj_dim`` / TP outputs: 17,340 for the 7B
(30 heads of 96 / 192 plus beta and alpha, 2 per head). A row of the output is then 34,680 bytes,
not a multiple of 16, and cuBLAS falls back to Ampere CUTLASS kernels with 2-element alignment
for the forward, the data gradient and the weight gradient. Measured on the H200 at S = 8192,
D = 3840 (``tools/benchmark.py --profile``): about 4.6 ms per GEMM, 240 TFLOP/s, against the
~1.5 ms of an aligned one; 13 ms of a 19 ms GDN mixer. Padding the weight with zero rows makes
every operand 16-byte aligned; the extra 24 zero rows cost 0.1 % more FLOPs.

The parameter keeps its shape [N, D] (checkpoints, resharding and conversion are unchanged). On
CUDA each forward pads a copy of the weight, which the linear keeps for its backward
(N_pad * D * 2 bytes per layer in bf16, 133 MB for the 7B), and returns a view of the first N
output columns; the gradient flows back through the padding to the parameter. On CPU it is
megatron-core's ColumnParallelLinear unchanged.
"""
from __future__ import annotations

import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear

__all__ = ["AlignedColumnParallelLinear", "ALIGN"]

ALIGN = 64
#: Pad on every device (tests use it to check the padded path on CPU against the plain one).
PAD_ON_CPU = False


class AlignedColumnParallelLinear(ColumnParallelLinear):
    """megatron-core ColumnParallelLinear (same arguments and state) with the GEMM run on a weight
    padded to ``ALIGN`` rows on CUDA. Input [S, B, D] -> output [S, B, N] (a view of [S, B, N_pad]
    on CUDA when N is not a multiple of ``ALIGN``). ``gather_output`` is not supported with padding.
    """

    def _forward_impl(self, input, weight, *args, **kwargs):
        n = weight.shape[0]
        pad = (-n) % ALIGN
        if pad == 0 or not (weight.is_cuda or PAD_ON_CPU):
            return super()._forward_impl(input, weight, *args, **kwargs)
        if self.gather_output:
            raise ValueError("AlignedColumnParallelLinear pads per-rank outputs; gather_output=True "
                             "would gather the padding too")
        out = super()._forward_impl(input, F.pad(weight, (0, 0, 0, pad)), *args, **kwargs)
        return out[..., :n]
