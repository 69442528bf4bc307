"""The dataset: item i of a folder index, decoded (or read from the cache) and augmented.

Augmentation is seeded per sample from (seed, epoch, index), so the images a step sees do not
depend on the number of ranks, DataLoader workers, or where a run was resumed.
"""

from __future__ import annotations

import torch
from torchvision.transforms.v2.functional import pil_to_tensor

from flowerdist.data.folder import ImageFolderIndex
from flowerdist.data.images import load_rgb
from flowerdist.data.transforms import ShrinkShortSide


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample `index` in `epoch`: the same wherever and whenever the sample is drawn."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % 2**63


class FlowerDataset(torch.utils.data.Dataset):
    """Items are `(uint8 image, label, index)`, looked up by `(epoch, index)` keys from `ShardedSampler` (or plain indices).

    Images come from the folder (decoded per item) or, with `cache`, from the decoded-image cache
    (`flowerdist.data.cache`); both give item i of the same index, so labels and order agree. With `short_side`
    (`data.cache_size`) a decoded image larger than that short side is first shrunk to it, as the cache stores it: the
    two paths give the same pixels, and originals give what a folder of resized copies gives.
    """

    def __init__(self, index: ImageFolderIndex, transform, seed: int = 0, cache=None, short_side: int | None = None):
        self.index = index
        self.transform = transform
        self.seed = seed
        self.cache = cache
        self.resize = ShrinkShortSide(short_side) if short_side and cache is None else None

    def __len__(self) -> int:
        return len(self.index)

    def image(self, i: int) -> torch.Tensor:
        """Item i as a uint8 CHW tensor, before augmentation."""
        if self.cache is not None:
            return self.cache[i]
        image = pil_to_tensor(load_rgb(self.index.root / self.index.files[i]))
        return self.resize(image) if self.resize is not None else image

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        image = self.image(i)
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also reseed every GPU (and costs 80x more)
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, i))
            tensor = self.transform(image, epoch) if isinstance(key, tuple) else self.transform(image)  # training keys carry the epoch
        return tensor, self.index.labels[i], i
