"""SIGTERM / SIGUSR1 (Slurm's warning before a time limit or preemption) ask for a clean stop."""

from __future__ import annotations

import signal

import torch


class StopSignal:
    """The handler only sets a flag; ranks agree on it at the next log step (a collective the loop
    already pays for), finish that step, checkpoint and exit with EXIT_PREEMPTED.

    A context manager: the previous handlers come back when the run ends, on error too.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self.previous = {}

    def __enter__(self) -> StopSignal:
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self, accelerator) -> bool:
        """True on every rank when any rank got a signal (one all-reduce)."""
        flag = torch.tensor(float(self.received is not None), device=accelerator.device)
        return accelerator.reduce(flag, "sum").item() > 0
