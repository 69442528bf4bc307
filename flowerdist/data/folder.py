"""Image folders (ROOT/<class>/<image>, torchvision's ImageFolder layout) and the stratified split."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowerdist.data.images import IMAGE_EXTENSIONS
from flowerdist.errors import FlowerdistError


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

    def empty_classes(self) -> list[str]:
        return [name for name, n in self.counts().items() if n == 0]


def require_images_in_every_class(index: ImageFolderIndex, why: str, fix: str) -> None:
    """The one check that every class still has an image (`why` says what emptied it, `fix` what to do)."""
    empty = index.empty_classes()
    if empty:
        raise FlowerdistError(f"class {', '.join(empty)} in {index.root} {why}; {fix}")


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
    if classes is None and len(found) < 2:
        raise FlowerdistError(
            f"data folder {root} has {len(found)} class folder ({found[0]}); a classifier needs at least two: "
            "put each class's images in a folder of its own under data.root"
        )
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
    require_images_in_every_class(index, "holds no images", "add images or remove the folder")
    return index


def without(index: ImageFolderIndex, other: ImageFolderIndex) -> tuple[ImageFolderIndex, int]:
    """`index` without the images that `other` holds too, matched by class and file name without its extension (a
    resized copy and its original match); and how many were removed."""
    held = {(Path(f).parent.as_posix(), Path(f).stem) for f in other.files}
    keep = [i for i, f in enumerate(index.files) if (Path(f).parent.as_posix(), Path(f).stem) not in held]
    kept = ImageFolderIndex(index.root, index.classes, tuple(index.files[i] for i in keep), tuple(index.labels[i] for i in keep))
    require_images_in_every_class(kept, "has no image left once data.test_root's are held out", "point data.test_root at fewer photos")
    return kept, len(index) - len(keep)


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
