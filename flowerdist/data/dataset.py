"""Image folders, the stratified split, transforms, and the dataset that applies them.

Augmentation is seeded per sample from (seed, epoch, index), so the images a step sees do not
depend on the number of ranks, DataLoader workers, or where a run was resumed.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from flowerdist.errors import FlowerdistError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageFolderIndex:
    """Sorted class names and (relative path, label) pairs of ROOT/<class>/<image>."""

    root: Path
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.files)

    def counts(self) -> dict[str, int]:
        c = Counter(self.labels)
        return {name: c.get(i, 0) for i, name in enumerate(self.classes)}


def scan_folder(root: str | Path, classes: tuple[str, ...] | None = None) -> ImageFolderIndex:
    """Index an ImageFolder tree (hidden files and non-image extensions are ignored).

    With `classes` given (e.g. from a checkpoint), the folder must have exactly those classes.
    """
    root = Path(root)
    if not root.is_dir():
        raise FlowerdistError(
            f"data folder {root} does not exist; set data.root=PATH to a ROOT/<class>/<image> folder "
            "(or create one with `flowerdist data synth --out PATH` / `flowerdist data download`)"
        )
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise FlowerdistError(f"data folder {root} has no class sub-folders; expected ROOT/<class>/<image>")
    if classes is not None and tuple(found) != tuple(classes):
        raise FlowerdistError(
            f"data folder {root} has classes {found} but the checkpoint was trained on {list(classes)}"
        )
    files, labels = [], []
    for label, name in enumerate(found):
        for path in sorted((root / name).rglob("*")):
            rel = path.relative_to(root)
            if any(part.startswith(".") for part in rel.parts):
                continue
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(rel.as_posix())
                labels.append(label)
    index = ImageFolderIndex(root, tuple(found), tuple(files), tuple(labels))
    empty = [name for name, n in index.counts().items() if n == 0]
    if empty:
        raise FlowerdistError(f"class folder(s) {', '.join(empty)} in {root} hold no images; add images or remove the folder")
    return index


def stratified_split(labels: tuple[int, ...] | list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic per-class split: round(val_fraction * n_class) of each class (at least one) to validation."""
    labels_arr = np.asarray(labels)
    rng = np.random.default_rng([seed, 20240521])
    train, val = [], []
    for label in np.unique(labels_arr):
        idx = np.flatnonzero(labels_arr == label)
        idx = idx[rng.permutation(len(idx))]
        n_val = min(max(1, round(val_fraction * len(idx))), len(idx) - 1)
        val.extend(idx[:n_val].tolist())
        train.extend(idx[n_val:].tolist())
    return sorted(train), sorted(val)


def save_split(path: Path, index: ImageFolderIndex, train: list[int], val: list[int]) -> None:
    path.write_text(
        json.dumps(
            {
                "root": str(index.root),
                "classes": list(index.classes),
                "train": [index.files[i] for i in train],
                "val": [index.files[i] for i in val],
            },
            indent=1,
        )
    )


def load_split(path: Path, index: ImageFolderIndex) -> tuple[list[int], list[int]]:
    """Map a saved split back onto a folder index (the files must still be there)."""
    data = json.loads(path.read_text())
    pos = {f: i for i, f in enumerate(index.files)}
    missing = [f for f in data["train"] + data["val"] if f not in pos]
    if missing:
        raise FlowerdistError(f"{len(missing)} file(s) of the split {path} are gone from {index.root}, e.g. {missing[0]}")
    return [pos[f] for f in data["train"]], [pos[f] for f in data["val"]]


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

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        top, left, h, w = self.params(*image.shape[-2:])
        return v2.functional.resized_crop(image, top, left, h, w, self.size, antialias=True)


def train_transform(image_size: int, min_scale: float = 0.35) -> v2.Compose:
    """Random crop + flip on uint8 CHW tensors; scaling to float and normalising happen on the device."""
    return v2.Compose([RandomResizedCrop(image_size, scale=(min_scale, 1.0)), v2.RandomHorizontalFlip()])


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


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


class FlowerDataset(torch.utils.data.Dataset):
    """Items are `(uint8 image, label, index)`, looked up by `(epoch, index)` keys from `ShardedSampler` (or plain indices).

    Images come from the folder (decoded per item) or, with `cache`, from the decoded-image cache
    (`flowerdist.data.cache`); both give item i of the same index, so labels and order agree.
    The random augmentation of item `index` in `epoch` is seeded from (seed, epoch, index),
    which makes a sample's pixels independent of rank, worker and resume position.
    """

    def __init__(self, index: ImageFolderIndex, transform, seed: int = 0, cache=None):
        self.index = index
        self.transform = transform
        self.seed = seed
        self.cache = cache

    def __len__(self) -> int:
        return len(self.index)

    def image(self, i: int) -> torch.Tensor:
        """Item i as a uint8 CHW tensor, before augmentation."""
        if self.cache is not None:
            return self.cache[i]
        return pil_to_tensor(load_rgb(self.index.root / self.index.files[i]))

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        image = self.image(i)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 10_000_019 + i) % 2**63)
            tensor = self.transform(image)
        return tensor, self.index.labels[i], i
