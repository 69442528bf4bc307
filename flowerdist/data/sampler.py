"""Per-rank sharding of the training split: disjoint, reshuffled every epoch, equal step counts.

Epoch e shuffles the training indices with a generator seeded by (seed, e), identically on every
rank. The permutation is cut into *global* micro-batches of `batch_size x world_size` images;
rank r takes the r-th slice of `batch_size` of each. The tail that does not fill a whole
optimizer step (`batch_size x world_size x grad_accum_steps` images) is dropped for that epoch, so
every rank runs the same number of steps (no DDP hang) and no image is seen twice; since the
order changes each epoch, a different handful of images is dropped each time.

Consequences the tests pin: 2 ranks with batch b see, step by step, exactly the images 1 rank
with batch 2b sees; accumulation of k micro-batches of b equals one batch of k x b.
"""

from __future__ import annotations

import numpy as np
import torch

from flowerdist.errors import FlowerdistError


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 7919]).permutation(n)


class ShardedSampler(torch.utils.data.Sampler):
    """Yields `(epoch, index)` keys of this rank's share of `indices` for the current epoch."""

    def __init__(
        self,
        indices: list[int],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        grad_accum_steps: int = 1,
        seed: int = 0,
    ):
        self.indices = np.asarray(indices)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.grad_accum_steps = grad_accum_steps
        self.seed = seed
        self.epoch = 0
        self.start_micro_step = 0
        self.global_micro_batch = batch_size * world_size
        step_images = batch_size * world_size * grad_accum_steps
        self.steps_per_epoch = len(self.indices) // step_images
        if self.steps_per_epoch == 0:
            raise FlowerdistError(
                f"the training split has {len(self.indices)} images, fewer than one optimizer step needs "
                f"({batch_size} per device x {world_size} processes x {grad_accum_steps} accumulation); "
                "lower data.batch_size or train.grad_accum_steps, or add images"
            )

    @property
    def micro_steps_per_epoch(self) -> int:
        return self.steps_per_epoch * self.grad_accum_steps

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        """Select the epoch's order; skip its first `start_sample` samples, counted over all ranks (resume)."""
        if start_sample % self.global_micro_batch:
            raise FlowerdistError(
                f"cannot resume {start_sample} samples into epoch {epoch}: not a whole number of global micro-batches "
                f"of {self.global_micro_batch} ({self.batch_size} per device x {self.world_size} processes)"
            )
        self.epoch = epoch
        self.start_micro_step = start_sample // self.global_micro_batch

    def rank_indices(self) -> np.ndarray:
        """This rank's indices for the epoch, in order, before skipping (micro-batch major)."""
        b, w = self.batch_size, self.world_size
        used = self.micro_steps_per_epoch * b * w
        perm = self.indices[epoch_permutation(len(self.indices), self.seed, self.epoch)[:used]]
        return perm.reshape(self.micro_steps_per_epoch, w, b)[:, self.rank, :].reshape(-1)

    def __iter__(self):
        for i in self.rank_indices()[self.start_micro_step * self.batch_size :]:
            yield (self.epoch, int(i))

    def __len__(self) -> int:
        return (self.micro_steps_per_epoch - self.start_micro_step) * self.batch_size


def eval_shard(indices: list[int], rank: int, world_size: int) -> list[int]:
    """Strided validation shard: every index on exactly one rank, no padding, sums reduce exactly."""
    return list(indices[rank::world_size])
