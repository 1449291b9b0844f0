"""Fixtures for the kernel tests: seeded RNG and a collector of measured relative errors."""

from __future__ import annotations

import pytest
import torch

_MAX_ERR: dict[str, float] = {}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def record_err():
    """record_err(category, value): keeps the largest value per category for the terminal summary."""
    def rec(category: str, value: float) -> float:
        _MAX_ERR[category] = max(_MAX_ERR.get(category, 0.0), float(value))
        return value
    return rec


def pytest_terminal_summary(terminalreporter):
    if _MAX_ERR:
        terminalreporter.write_sep("-", "kernels: max norm-wise relative errors")
        for k in sorted(_MAX_ERR):
            terminalreporter.write_line(f"{k:40s} {_MAX_ERR[k]:.3e}")
