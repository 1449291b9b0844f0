"""The fault-injection hook object (``training/fault_injection.py``): parsing, when a fault fires,
and what the loss wrapper changes (the end-to-end faults are in ``test_fault_injection.py``)."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_hybrid.training.fault_injection import ENV, FaultInjector


def test_parse_and_fire():
    f = FaultInjector.from_environment({ENV: "nan-loss@3+, kill-during-save@4"})
    assert [i for i in range(1, 7) if f.fires("nan-loss", i)] == [3, 4, 5, 6]
    assert [i for i in range(1, 7) if f.fires("kill-during-save", i)] == [4]
    assert not FaultInjector.from_environment({}).faults


@pytest.mark.parametrize("spec, expected", [("nan-loss@x", "NAME@ITERATION"),
                                            ("nan-loss", "NAME@ITERATION"),
                                            ("nan-los@3", "unknown fault 'nan-los'")])
def test_bad_values_name_the_variable(spec, expected):
    with pytest.raises(ValueError, match=ENV) as err:
        FaultInjector.parse(spec)
    assert expected in str(err.value) and repr(spec) in str(err.value)


def test_wrap_loss_only_where_the_fault_fires():
    def loss_func(out):
        return out.sum(), {"lm loss": out.mean(), "z loss": out.max()}

    f = FaultInjector.parse("nan-loss@2")
    assert f.wrap_loss(loss_func, 1) is loss_func        # production path: untouched
    x = torch.ones(3, requires_grad=True)
    total, report = f.wrap_loss(loss_func, 2)(x)
    assert math.isnan(total.item()) and math.isnan(report["lm loss"].item())
    assert report["z loss"].item() == 1.0
    total.backward()
    assert torch.isnan(x.grad).all()                     # every gradient is NaN, as the rule needs
