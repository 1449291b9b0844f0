"""Session fixtures of the end-to-end training tests (see pretrain_kit.py)."""
from __future__ import annotations

import pytest

from tests.dist import run_distributed
from tests.training.pretrain_kit import copy_checkpoint as _copy
from tests.training.pretrain_kit import flags as _flags
from tests.training.pretrain_kit import last_stage_losses as _losses
from tests.training.pretrain_kit import pretrain_worker as _pretrain_worker


@pytest.fixture(scope="session")
def reference_losses(embedded_small):
    """10 uninterrupted iterations at TP=2 x PP=2 (4 ranks)."""
    return _losses(run_distributed(_pretrain_worker, 4, _flags(embedded_small, tp=2, pp=2),
                                   tp=2, pp=2, timeout=300))


@pytest.fixture(scope="session")
def checkpoint_at_5(embedded_small, tmp_path_factory):
    """(directory, losses 1..5) of a TP=2 x PP=2 run stopped after saving at iteration 5."""
    ckpt = str(tmp_path_factory.mktemp("ckpt5") / "ckpt")
    first = _flags(embedded_small, ckpt, tp=2, pp=2, extra=["--exit-interval", "5",
                                                             "--save-interval", "5"])
    head = _losses(run_distributed(_pretrain_worker, 4, first, tp=2, pp=2, timeout=300))
    return ckpt, head


@pytest.fixture(scope="session")
def resumed_at_tp1_pp2(embedded_small, checkpoint_at_5, tmp_path_factory):
    """Losses 6..10 of the (fully reshardable) TP=2 x PP=2 checkpoint at iteration 5 resumed at
    TP=1 x PP=2 (2 ranks): model and optimizer resharded on load, RNG not restored."""
    ckpt = _copy(checkpoint_at_5[0], tmp_path_factory.mktemp("resumed_tp1_pp2"))
    return _losses(run_distributed(_pretrain_worker, 2, _flags(embedded_small, ckpt, tp=1, pp=2),
                                   pp=2, timeout=300))
