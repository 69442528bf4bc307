"""Transforms: seeded training augmentation and evaluation crops on uint8 tensors, then the
normalisation that turns a uint8 batch into model input on the device."""

from __future__ import annotations

import math

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomResizedCrop:
    """torchvision's RandomResizedCrop (same scale/ratio rule, same fallback) with its random draws taken
    as fractions of the image instead of pixel offsets.

    Why: the same seeded draws then cut the same region from an original photo and from its
    pre-resized copy in the decoded cache (`flowerdist.data.cache`), so both data paths train on
    the same crops, differing only by resampling.
    """

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.size = [size, size]
        self.scale = scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.ratio = ratio

    def params(self, height: int, width: int) -> tuple[int, int, int, int]:
        area = height * width
        for _ in range(10):
            u_area, u_ratio, u_top, u_left = torch.rand(4).tolist()
            target = area * (self.scale[0] + u_area * (self.scale[1] - self.scale[0]))
            aspect = math.exp(self.log_ratio[0] + u_ratio * (self.log_ratio[1] - self.log_ratio[0]))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
        in_ratio = width / height  # fallback: the largest centred crop within the ratio range
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: torch.Tensor, side: int | None = None) -> torch.Tensor:
        top, left, h, w = self.params(*image.shape[-2:])
        return v2.functional.resized_crop(image, top, left, h, w, [side, side] if side else self.size, antialias=True)


class RandomErasing(v2.RandomErasing):
    """torchvision's RandomErasing for uint8 images: the erased box gets uniform uint8 noise (torchvision's
    `value="random"` draws normal floats, which a uint8 image would wrap to 0, 1 and 255)."""

    def make_params(self, flat_inputs):
        params = super().make_params(flat_inputs)
        if params["v"] is not None:
            params["v"] = torch.randint(0, 256, params["v"].shape, dtype=torch.uint8)
        return params


def progressive_sides(final: int, start: int = 0, until: float = 0.85, epochs: int = 1):
    """Epoch -> training side: `start` px at epoch 0 growing linearly to `final` by `until` of the `epochs`, in
    multiples of 16 (FFCV's progressive resizing); always `final` when `start` is 0."""
    if not start:
        return lambda epoch: final
    end = max(1, round(until * epochs))

    def side(epoch: int) -> int:
        exact = start + min(1.0, epoch / end) * (final - start)
        return min(final, max(start, int(round(exact / 16)) * 16))

    return side


class TrainTransform:
    """The training pipeline: the random crop at the epoch's side, then the other ops. Called with (image, epoch);
    `transforms` lists the ops (at the final side) for `flowerdist.data.costs`."""

    def __init__(self, crop: RandomResizedCrop, rest: list, sides=None):
        self.crop, self.rest = crop, rest
        self.sides = sides or (lambda epoch: crop.size[0])

    @property
    def transforms(self) -> list:
        return [self.crop, *self.rest]

    def __call__(self, image: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        image = self.crop(image, self.sides(epoch))
        for op in self.rest:
            image = op(image)
        return image


def train_transform(image_size: int, min_scale: float = 0.35, augment=None, sides=None) -> TrainTransform:
    """Random crop + flip, then what `augment` (an AugmentConfig) switches on, all on uint8 CHW tensors; `sides`
    (`progressive_sides`) sets the crop's side per epoch.

    Every op draws from torch's RNG, which `FlowerDataset` seeds per sample. Scaling to float and
    normalising happen on the device.
    """
    ops = [RandomResizedCrop(image_size, scale=(min_scale, 1.0)), v2.RandomHorizontalFlip()]
    if augment is not None:
        if augment.color_jitter > 0:
            ops.append(v2.ColorJitter(brightness=augment.color_jitter, contrast=augment.color_jitter, saturation=augment.color_jitter))
        if augment.auto_augment == "randaugment":
            ops.append(v2.RandAugment(num_ops=2, magnitude=augment.randaugment_magnitude))
        elif augment.auto_augment == "trivialaugment":
            ops.append(v2.TrivialAugmentWide())
        if augment.random_erasing > 0:
            ops.append(RandomErasing(p=augment.random_erasing, value="random"))
    return TrainTransform(ops[0], ops[1:], sides)


class ShrinkShortSide(torch.nn.Module):
    """data.cache_size: resize an image whose short side exceeds `side` down to it; smaller images stay as they are.
    That is how a folder of N-px copies is made (a photo already under N is copied as it is), so originals shrunk
    here give the copies' sizes, and the copies themselves pass unchanged."""

    def __init__(self, side: int):
        super().__init__()
        self.side = side

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if min(image.shape[-2:]) <= self.side:
            return image
        return v2.functional.resize(image, self.side, antialias=True).contiguous()


def shrunk_size(width: int, height: int, side: int | None) -> tuple[int, int]:
    """The (width, height) ShrinkShortSide(side) gives an image of that size (side None or 0: unchanged)."""
    if not side or min(width, height) <= side:
        return width, height
    long = int(side * max(width, height) / min(width, height))  # torchvision's rounding (truncation)
    return (side, long) if width <= height else (long, side)


def eval_resize(image_size: int) -> int:
    """Short side before the centre crop: the standard 0.875 crop ratio (256 for 224)."""
    return round(image_size / 0.875)


def eval_transform(image_size: int) -> v2.Compose:
    """Resize the short side to `eval_resize(image_size)`, then centre-crop (uint8 in, uint8 out)."""
    return v2.Compose([v2.Resize(eval_resize(image_size), antialias=True), v2.CenterCrop(image_size)])


_STATS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def to_model_input(images: torch.Tensor, device: torch.device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """uint8 batch -> normalised float on `device`.

    Batches travel as uint8 (4x fewer bytes through worker shared memory and host-to-device
    copies than float32); the scaling and ImageNet normalisation run on the device.
    """
    if device not in _STATS:
        _STATS[device] = tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) * 255 for v in (IMAGENET_MEAN, IMAGENET_STD))
    mean, std = _STATS[device]
    x = images.to(device, non_blocking=True).to(memory_format=memory_format)
    return x.float().sub_(mean).div_(std)
