"""Validation metrics with exact counts at any world size.

Each rank evaluates its strided shard (no padding) and the per-rank confusion matrices and loss
sums are summed across ranks, so a 3-process evaluation counts every image exactly once and
equals the 1-process result on the same weights.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from flowerdist.data.transforms import to_model_input


class FlipAverage(torch.nn.Module):
    """Flip test-time augmentation (`eval.flip`): the mean of the logits of each image and of its mirror image.
    A module, so the exported model holds it too."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x) + self.model(x.flip(-1))) / 2


def for_evaluation(model: torch.nn.Module, flip: bool) -> torch.nn.Module:
    return FlipAverage(model) if flip else model


def memory_format(channels_last: bool) -> torch.memory_format:
    """The memory format of `model.channels_last`. Evaluation (`eval`, `predict`) uses the run's, as training does:
    the CPU's bf16 kernels for the two formats round differently (on AVX-512 without AMX), so only the run's own
    format reproduces its validation."""
    return torch.channels_last if channels_last else torch.contiguous_format


def autocast_for(device: torch.device, precision: str):
    """The context evaluation runs in: autocast at `precision` (bf16, fp16) or none (no)."""
    if precision == "no":
        return contextlib.nullcontext
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return lambda: torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader,
    num_classes: int,
    device: torch.device,
    *,
    channels_last: bool = False,
    autocast=contextlib.nullcontext,
    reduce=None,
    keep_predictions: bool = False,
) -> dict[str, Any]:
    """Loss, accuracy, per-class accuracy and confusion matrix (rows: actual, columns: predicted).

    `reduce(tensor)` sums a tensor over ranks (e.g. `lambda t: accelerator.reduce(t, "sum")`).
    `keep_predictions`: also return this rank's (index, label, predicted, probability) per image.
    """
    kept: list[tuple[int, int, int, float]] = []
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    layout = memory_format(channels_last)
    for images, labels, *rest in loader:
        images = to_model_input(images, device, layout)
        labels = labels.to(device, non_blocking=True)
        with autocast():
            logits = model(images)
        if keep_predictions:
            prob, pred = logits.float().softmax(1).max(1)
            kept += zip(rest[0].tolist(), labels.tolist(), pred.tolist(), prob.tolist())
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes**2).view(
            num_classes, num_classes
        )
    if reduce is not None:
        confusion = reduce(confusion)
        loss_sum = reduce(loss_sum)
    model.train(was_training)
    return {**summarize(confusion.cpu(), float(loss_sum)), **({"predictions": kept} if keep_predictions else {})}


def summarize(confusion: torch.Tensor, loss_sum: float) -> dict[str, Any]:
    total = int(confusion.sum())
    per_class_total = confusion.sum(1)
    correct = confusion.diag()
    return {
        "count": total,
        "loss": loss_sum / max(1, total),
        "accuracy": float(correct.sum()) / max(1, total),
        "per_class_accuracy": [float(c) / max(1, int(n)) for c, n in zip(correct, per_class_total)],
        "confusion": confusion.tolist(),
    }
