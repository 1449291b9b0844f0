"""Weight initialisers of megatron-hybrid (spec ``docs/model.md`` §5): the one home of the init.

Every linear weight and the GDN short convs start from a truncated normal, mean 0, std
``init_method_std`` (0.02), cut at +-3 std, with no depth scaling of the output layers
(megatron-core's default is an untruncated normal with scaled output layers, docs/model.md §7
difference 4). The initialiser is a class, not a closure, so that a TransformerConfig holding it
stays picklable (checkpoint run configs, spawned workers).

This module imports torch only (it sits below ``config`` in the import order, docs/design.md §1).
"""
from __future__ import annotations

import torch

__all__ = ["TruncNormalInit", "trunc_normal_init"]


class TruncNormalInit:
    """Truncated normal init in place: N(0, std^2) restricted to [-3 std, 3 std].

    Call it on a tensor of any shape (e.g. a weight [out, in], a conv [C, 1, W]); it fills the
    tensor from the default generator of the tensor's device and returns it.
    """

    def __init__(self, std: float = 0.02):
        self.std = std

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.init.trunc_normal_(tensor, mean=0.0, std=self.std, a=-3 * self.std,
                                           b=3 * self.std)

    def __repr__(self) -> str:
        return f"TruncNormalInit(std={self.std})"


def trunc_normal_init(std: float = 0.02) -> TruncNormalInit:
    """The truncated normal initialiser of docs/model.md §5 for ``std`` (see ``TruncNormalInit``)."""
    return TruncNormalInit(std)
