"""The decoded-image cache: the fast data path (`data.cache`, on by default for CPU training).

Every usable image is decoded once and stored as uint8 CHW in one flat file that every rank
memory-maps: the page cache holds one copy per node, shared by all ranks and DataLoader workers,
and a sample costs a memory copy plus its crop instead of a JPEG decode. Each rank reads only
the items its sampler yields, so the per-rank sharding is unchanged.

By default (`data.cache_size=0`) the images are stored at their original size: the cache then
changes speed, never pixels, and training from it is bit-identical to reading the folder. With
`data.cache_size=N` those with a short side over N are stored shrunk to N (smaller file, for large photos):
evaluation crops at `eval_resize(image_size) <= N` stay bit-identical, training crops follow the
same seeded recipe on the smaller image (the same regions, resampled from fewer pixels).

Why it matters: on the CPU, decoding takes a third of the per-image data cost and DataLoader
worker processes compete with the model for the same cores, so the default CPU path reads the
cache in the training process; on a GPU, decoding becomes the bottleneck of a fast model.

The cache lives in `data.cache_dir` (default `<data.root>/.flowerdist-cache`) under a key of the
file list (path, size, mtime, label) and the short side: a changed folder or size builds a new
cache instead of reading a stale one. Building is atomic, so a killed build never leaves a cache
that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from flowerdist.data.folder import ImageFolderIndex
from flowerdist.data.images import load_rgb
from flowerdist.data.loader import make_loader
from flowerdist.data.transforms import ShrinkShortSide, shrunk_size
from flowerdist.errors import FlowerdistError
from flowerdist.files import atomic_dir

CACHE_VERSION = 2  # 2: data.cache_size shrinks only (images under it are stored as they are)


def cache_root(data_root: str, cache_dir: str) -> Path:
    return Path(cache_dir) if cache_dir else Path(data_root) / ".flowerdist-cache"


def cache_key(index: ImageFolderIndex, short_side: int | None) -> str:
    """Digest of what the cache's bytes depend on: every file's path, size, mtime and label, and the short side."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, short_side, list(index.classes)]).encode())
    for rel, label in zip(index.files, index.labels):
        st = (index.root / rel).stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
    return h.hexdigest()[:20]


class DecodedCache:
    """Item i of the index as a uint8 CHW tensor, read from the memory-mapped cache file."""

    def __init__(self, folder: Path):
        self.folder = folder
        meta = json.loads((folder / "index.json").read_text())
        self.files: list[str] = meta["files"]
        self.offsets = np.asarray(meta["offsets"], dtype=np.int64)
        self.shapes = np.asarray(meta["shapes"], dtype=np.int64)
        self._data: np.memmap | None = None  # opened lazily: a memmap must not be pickled into workers

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._data is None:
            self._data = np.memmap(self.folder / "images.u8", dtype=np.uint8, mode="r")
        c, h, w = self.shapes[i]
        start = self.offsets[i]
        return torch.from_numpy(np.array(self._data[start : start + c * h * w])).view(int(c), int(h), int(w))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_data": None}


class _Decode(torch.utils.data.Dataset):
    """Decode (+ resize, when a short side is given), run in DataLoader workers while the cache is built."""

    def __init__(self, index: ImageFolderIndex, short_side: int | None):
        self.index = index
        self.resize = ShrinkShortSide(short_side) if short_side else torch.nn.Identity()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.resize(v2.functional.pil_to_tensor(load_rgb(self.index.root / self.index.files[i]))).contiguous()


def _estimated_bytes(index: ImageFolderIndex, short_side: int | None, sample: int | None = None) -> int:
    """From the image headers (no decoding): what the cache file will take, within rounding; from `sample` evenly
    spread headers scaled to the whole folder when given (a quick estimate for a large folder)."""
    picks = range(len(index)) if sample is None or sample >= len(index) else [i * len(index) // sample for i in range(sample)]
    total = 0
    for i in picks:
        with Image.open(index.root / index.files[i]) as img:
            w, h = img.size
        total += 3 * math.prod(shrunk_size(w, h, short_side))
    return total * len(index) // max(1, len(picks))


def cache_fits(index: ImageFolderIndex, short_side: int | None, root: Path) -> bool:
    """Whether the cache would fit the free disk at `root` and half of this machine's memory (so that the page
    cache keeps it: a cache read from disk on every epoch would not be faster than the JPEGs)."""
    need = _estimated_bytes(index, short_side, sample=64)
    probe = next((p for p in (root, *root.parents) if p.exists()), Path("."))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return need * 1.05 < shutil.disk_usage(probe).free and need < memory / 2


def build_cache(index: ImageFolderIndex, short_side: int | None, folder: Path, workers: int = 0, log=print) -> None:
    """Decode every image of `index` into `folder` (atomically: nothing is left behind if it fails)."""
    parent = folder.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(parent).free
        if not os.access(parent, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as err:
        raise FlowerdistError(f"cannot create the image cache in {parent} ({err.strerror}); set data.cache_dir=DIR to a writable folder") from None
    need = _estimated_bytes(index, short_side)
    if need * 1.05 > free:
        raise FlowerdistError(
            f"the image cache needs about {need / 2**30:.1f} GiB but {parent} has {free / 2**30:.1f} GiB free; "
            "set data.cache_dir=DIR elsewhere or data.cache=false"
        )
    size = f"short side {short_side}" if short_side else "original sizes"
    log(f"flowerdist: caching {len(index)} decoded images ({size}, about {need / 2**20:.0f} MiB) in {folder} (once)")
    start = time.perf_counter()
    loader = make_loader(_Decode(index, short_side), None, None, workers, torch.device("cpu"))
    offsets, shapes, offset = [], [], 0
    # exist_ok: another node or process may finish the same cache first; theirs is identical
    with atomic_dir(folder, exist_ok=True) as tmp:
        with open(tmp / "images.u8", "wb") as f:
            for image in loader:
                offsets.append(offset)
                shapes.append(list(image.shape))
                f.write(image.numpy().tobytes())
                offset += image.numel()
        meta = {"version": CACHE_VERSION, "short_side": short_side, "root": str(index.root), "files": list(index.files),
                "labels": list(index.labels), "offsets": offsets, "shapes": shapes}
        (tmp / "index.json").write_text(json.dumps(meta))
    log(f"flowerdist: cached {len(index)} images, {offset / 2**20:.0f} MiB, in {time.perf_counter() - start:.1f} s")


def open_cache(index: ImageFolderIndex, short_side: int | None, root: Path, *, build: bool, workers: int = 0, log=print) -> DecodedCache:
    """The cache for exactly this index and short side (None: original sizes), built first if missing and `build` is set."""
    folder = root / cache_key(index, short_side)
    if not (folder / "index.json").is_file():
        if not build:
            raise FlowerdistError(f"the image cache {folder} is missing after its build; check that data.cache_dir is shared by the ranks of a node")
        build_cache(index, short_side, folder, workers, log)
    cache = DecodedCache(folder)
    if cache.files != list(index.files):
        raise FlowerdistError(f"the image cache {folder} does not list the files of {index.root}; delete it and rerun")
    return cache
