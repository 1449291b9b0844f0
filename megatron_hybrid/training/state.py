"""Run-time state of one pretraining run (``training.train.pretrain``).

The validated ``config.training.TrainingConfig`` is frozen: what the run learns at start-up (the
tokenizer's vocabulary and end-of-document id) and what the loop advances (iteration, consumed
samples, last losses) lives here, passed where it is needed.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunState:
    """What the data setup learns and the training loop advances.

    ``iteration``: completed iterations (the checkpoint's); ``consumed_train_samples``: global
    samples used so far (sequences; the data order resumes from it); ``start_iteration``: the
    iteration this run started from (0, or the resumed checkpoint's).
    """

    tokenizer_vocab_size: int
    eod_id: int
    iteration: int = 0
    consumed_train_samples: int = 0
    start_iteration: int = 0
    #: lm loss of each iteration of this run (last pipeline stage; empty elsewhere)
    last_losses: list[float] = field(default_factory=list)
    #: losses of the last validation run
    valid: dict[str, float] = field(default_factory=dict)
    #: iteration of the last checkpoint this run saved
    saved_at: int | None = None

    @property
    def current_iteration(self) -> int:
        """The iteration being run, 1-based (``iteration`` + 1 while ``train_step`` runs)."""
        return self.iteration + 1

    def resume_from(self, state: dict) -> None:
        """Take ``iteration`` / ``consumed_train_samples`` of a loaded checkpoint's state."""
        self.iteration = self.start_iteration = int(state["iteration"])
        self.consumed_train_samples = int(state["consumed_train_samples"])

    def checkpoint_state(self, skip_step_state: dict) -> dict:
        """The training-state entry a checkpoint saves (``checkpoint.training_state``)."""
        return {"iteration": self.iteration, "consumed_train_samples": self.consumed_train_samples,
                "skip_step": skip_step_state}
