"""The run's counters: where training stands, the same on every rank, saved in every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class TrainState:
    """Counters a resume needs to continue exactly where the run stopped."""

    epoch: int = 0
    """The epoch to run, or to continue."""
    samples_in_epoch: int = 0
    """Global samples (over all ranks) of `epoch` already trained on: the position in the epoch's order."""
    global_step: int = 0
    """Optimizer steps done."""
    best_accuracy: float = -1.0
    """Best validation accuracy so far (what `checkpoints/best` holds)."""

    def advance(self, global_batch: int) -> None:
        """One optimizer step of `global_batch` samples done."""
        self.global_step += 1
        self.samples_in_epoch += global_batch

    def next_epoch(self) -> None:
        self.epoch += 1
        self.samples_in_epoch = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            setattr(self, f.name, state[f.name])
