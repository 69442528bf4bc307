"""An exponential moving average of the weights (timm's ModelEmaV3), or an object that does nothing.

Under DDP every rank holds the same weights, so every rank's average is the same too; it is
updated after each optimizer step from the step count alone (no hidden counter), which makes a
resume exact. Its state goes into training checkpoints; `checkpoints/best` holds it when
`train.best_of=ema`.
"""

from __future__ import annotations

from typing import Any

import torch


class NoEma:
    """`train.ema_decay=0`: nothing to update, evaluate or save."""

    module = None

    def update(self, model: torch.nn.Module, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def build_ema(model: torch.nn.Module, decay: float, warmup: bool):
    """timm's ModelEmaV3 of `model` (unwrapped, on its device), or NoEma when `decay` is 0."""
    if not decay:
        return NoEma()
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=warmup)
