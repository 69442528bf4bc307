"""MixUp / CutMix over the global micro-batch, the same whatever the number of ranks.

torchvision's `v2.MixUp` and `v2.CutMix` pair every sample with the one before it in the batch
(`roll(1)`) and draw one mixing weight (and CutMix box) per batch. Applied to the global
micro-batch (every rank's slice, in rank order), sample j is mixed with sample j - 1, and the
first sample of rank r with the last sample of rank r - 1. So each rank prepends that one sample
(an all-gather of one image per rank), mixes its b + 1 images with the RNG seeded by
(seed, step, micro-step), and drops the extra one: 2 processes x b see exactly the images and
targets of 1 process x 2b.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from flowerdist.data.dataset import sample_seed


class NoMix:
    """MixUp and CutMix off: images and integer labels pass through."""

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int):
        return images, labels


class GlobalBatchMix:
    def __init__(self, mixup_alpha: float, cutmix_alpha: float, prob: float, num_classes: int, seed: int, accelerator):
        ops = [op for alpha, op in ((mixup_alpha, v2.MixUp), (cutmix_alpha, v2.CutMix)) if alpha > 0]
        alphas = [a for a in (mixup_alpha, cutmix_alpha) if a > 0]
        self.op = v2.RandomChoice([op(alpha=a, num_classes=num_classes) for op, a in zip(ops, alphas)])
        self.prob = prob
        self.num_classes = num_classes
        self.seed = seed
        self.accelerator = accelerator
        self.step, self.micro = -1, 0

    def previous_sample(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sample before this rank's first in the global micro-batch (wrapping around)."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        if world == 1:
            return images[-1:], labels[-1:]
        last_images = self.accelerator.gather(images[-1:].contiguous())  # (world, C, H, W)
        last_labels = self.accelerator.gather(labels[-1:].contiguous())
        r = (rank - 1) % world
        return last_images[r : r + 1], last_labels[r : r + 1]

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int):
        """Mixed images and soft targets for optimizer step `step` (0-based) of this micro-batch."""
        self.micro = self.micro + 1 if step == self.step else 0
        self.step = step
        prev_images, prev_labels = self.previous_sample(images, labels)
        x, y = torch.cat([prev_images, images]), torch.cat([prev_labels, labels])
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, step, self.micro))
            if torch.rand(()).item() < self.prob:
                x, y = self.op(x, y)
            else:
                y = F.one_hot(y, self.num_classes).to(x.dtype)
        layout = torch.channels_last if images.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return x[1:].contiguous(memory_format=layout), y[1:]


def build_mix(augment, num_classes: int, seed: int, accelerator):
    """GlobalBatchMix when `augment.mixup_alpha` or `augment.cutmix_alpha` is set, else NoMix."""
    if augment.mixup_alpha <= 0 and augment.cutmix_alpha <= 0:
        return NoMix()
    return GlobalBatchMix(augment.mixup_alpha, augment.cutmix_alpha, augment.mix_prob, num_classes, seed, accelerator)
