"""What one training image costs a CPU core, stage by stage, and the data path that follows from it.

On a GPU node the CPU cores feed the GPUs: a rank's DataLoader workers must prepare images as fast as its
GPU consumes them. `stage_costs` times each stage of the real training pipeline on one core (decode or the
cache's memory copy, crop and resize, flip, the auto-augment policy, erasing, collate, pinning) on a sample of
the real images, the same ops `train_transform` builds, seeded as `FlowerDataset` seeds them. `choose_data_path`
turns `data.num_workers=auto` and `data.cache=auto` into numbers from that measurement and from the CPUs this
process may use, and says why in one line. `flowerdist bench --parts pipeline` prints the same table.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from torchvision.transforms.v2.functional import pil_to_tensor

from flowerdist.data.dataset import sample_seed
from flowerdist.data.images import load_rgb

#: Image rates a GPU may consume, for the cores-per-GPU table (ResNet-50 bf16 on an A100: ~2,500 img/s).
RATES = (1_000, 3_000, 10_000)


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (what Slurm or taskset gave it), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _stage_name(op) -> str:
    name = type(op).__name__
    return {"RandomResizedCrop": "crop + resize", "RandomHorizontalFlip": "flip", "TrivialAugmentWide": "trivialaugment",
            "RandAugment": "randaugment", "ColorJitter": "color jitter", "RandomErasing": "erasing"}.get(name, name)


def stage_costs(index, transform, cache=None, count: int = 48, seed: int = 0) -> dict[str, float]:
    """Milliseconds per image of each stage on this core, over `count` images spread over `index`: the source
    (`decode` from the folder, or `cache copy` from a `DecodedCache`), each op of `transform` (a v2.Compose), then
    `collate` (stacking a batch) and `pin` (page-locking it, where torch can: a CUDA host)."""
    picks = [round(i * (len(index) - 1) / max(1, count - 1)) for i in range(count)]
    ops = list(getattr(transform, "transforms", [transform]))
    totals: dict[str, float] = {}
    out = []
    source = "cache copy" if cache is not None else "decode"
    for i in picks:
        start = time.perf_counter()
        image = cache[i] if cache is not None else pil_to_tensor(load_rgb(index.root / index.files[i]))
        totals[source] = totals.get(source, 0.0) + time.perf_counter() - start
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(seed, 0, i))
            for op in ops:
                start = time.perf_counter()
                image = op(image)
                name = _stage_name(op)
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
        out.append(image)
    start = time.perf_counter()
    batch = torch.stack(out)
    totals["collate"] = time.perf_counter() - start
    if torch.cuda.is_available():
        start = time.perf_counter()
        batch.pin_memory()
        totals["pin"] = time.perf_counter() - start
    return {stage: 1000 * seconds / count for stage, seconds in totals.items()}


class DecodedSample(dict):
    """The images `stage_costs` samples, decoded (and shrunk to `short_side`) once, as the decoded-image cache holds
    them; indexing copies, as reading the memory-mapped cache does."""

    def __init__(self, index, short_side: int | None, count: int):
        from flowerdist.data.transforms import ShrinkShortSide

        resize = ShrinkShortSide(short_side) if short_side else (lambda x: x)
        picks = {round(i * (len(index) - 1) / max(1, count - 1)) for i in range(count)}
        super().__init__({i: resize(pil_to_tensor(load_rgb(index.root / index.files[i]))).contiguous() for i in picks})

    def __getitem__(self, i: int) -> torch.Tensor:
        return super().__getitem__(i).clone()


def folder_and_cache_costs(index, transform, short_side: int | None, seed: int = 0, count: int = 32) -> tuple[float, float]:
    """Milliseconds per training image on one core: from the folder, and from decoded images (the cache's path)."""
    folder = stage_costs(index, transform, count=count, seed=seed)
    cached = stage_costs(index, transform, cache=DecodedSample(index, short_side, count), count=count, seed=seed)
    return sum(folder.values()), sum(cached.values())


def cores_needed(ms_per_image: float, rate: float) -> float:
    """Cores that keep up with `rate` images/s at `ms_per_image` each (the workers of one GPU)."""
    return rate * ms_per_image / 1000


@dataclass(frozen=True)
class DataPath:
    """What a rank loads with, and why (the start line)."""

    workers: int
    cache: bool
    why: str


def choose_data_path(num_workers, cache, device: torch.device, local_processes: int, costs=None, cache_fits: bool = True,
                     cpus: int | None = None) -> DataPath:
    """`data.num_workers` and `data.cache`, with `auto` resolved.

    CPU training: the cache, read in the training process (0 workers): the model is the bottleneck there and
    worker processes would take cores from it. GPU training: every CPU this rank may use becomes a worker
    (`cpus`: the affinity mask, shared by the node's ranks); the cache when the measured per-image cost from it
    is lower than from the folder (`costs()` -> (folder ms, cache ms), measured only when needed) and it fits.
    """
    cpus = cpus or available_cpus()
    per_rank = max(1, cpus // max(1, local_processes))
    if device.type != "cuda":
        workers = 0 if num_workers == "auto" else int(num_workers)
        use_cache = cache is True or (cache == "auto" and cache_fits)
        why = (f"{workers} DataLoader workers (auto on the CPU: loading in the training process, the cores train the model); "
               if num_workers == "auto" else f"{workers} DataLoader workers (data.num_workers); ")
        return DataPath(workers, use_cache, why + f"decoded cache {'on' if use_cache else 'off'}")
    workers = per_rank if num_workers == "auto" else int(num_workers)
    why = (f"{workers} DataLoader workers per rank ({cpus} CPUs this process may use, {local_processes} rank(s) on this node)"
           if num_workers == "auto" else f"{workers} DataLoader workers per rank (data.num_workers)")
    if cache != "auto":
        return DataPath(workers, bool(cache), why + f"; decoded cache {'on' if cache else 'off'} (data.cache)")
    if not cache_fits:
        return DataPath(workers, False, why + "; decoded cache off (auto: it would not fit the disk or half the memory)")
    folder_ms, cache_ms = costs()
    use_cache = cache_ms < folder_ms
    rate = lambda ms: workers * 1000 / ms  # noqa: E731
    return DataPath(workers, use_cache, why + (
        f"; decoded cache {'on' if use_cache else 'off'} (auto: {cache_ms:.2f} ms per image from the cache, {folder_ms:.2f} ms "
        f"from the folder, measured here: about {rate(min(cache_ms, folder_ms)):,.0f} images/s per rank)"))
