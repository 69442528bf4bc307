"""The decoded-image cache (data.cache=true) gives the same samples and labels as the folder path."""

from __future__ import annotations

import os
import re

import pytest
import torch

from conftest import TINY, copy_flowers, run_cli
from flowerdist.data.cache import _estimated_bytes, cache_key, open_cache
from flowerdist.data.dataset import FlowerDataset
from flowerdist.data.folder import scan_folder
from flowerdist.data.transforms import eval_resize, eval_transform, train_transform
from flowerdist.data.sampler import ShardedSampler
from flowerdist.errors import FlowerdistError

SILENT = dict(log=lambda message: None)


def batches(dataset, sampler, workers):
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, sampler=sampler, num_workers=workers)
    return list(loader)


@pytest.mark.parametrize("rank", [0, 1])
def test_cache_equals_folder_bit_for_bit_per_rank(tiny_data, tmp_path, rank):
    # image_size 56 -> the cache keeps the 64 px originals untouched, so every crop must be identical
    index = scan_folder(tiny_data)
    cache = open_cache(index, eval_resize(56), tmp_path, build=True, **SILENT)
    sampler = ShardedSampler(list(range(0, len(index), 2)), 8, rank=rank, world_size=2, seed=3)
    sampler.set_epoch(1)
    folder = batches(FlowerDataset(index, train_transform(56), seed=3), sampler, workers=0)
    cached = batches(FlowerDataset(index, train_transform(56), seed=3, cache=cache), sampler, workers=1)
    assert len(folder) == len(cached) == sampler.micro_steps_per_epoch
    for (a, la, ia), (b, lb, ib) in zip(folder, cached):
        assert torch.equal(ia, ib) and torch.equal(la, lb)
        assert a.dtype == b.dtype == torch.uint8 and torch.equal(a, b)


def test_a_short_side_gives_the_same_pixels_from_the_folder_and_from_the_cache(tiny_data, tmp_path):
    """data.cache_size: the folder path resizes as the cache stores, so training and evaluation pixels are the same
    whichever path a machine takes; without the short side the originals' crops differ (another resolution)."""
    index = scan_folder(tiny_data)
    cache = open_cache(index, 52, tmp_path, build=True, **SILENT)  # 64 px originals stored at 52 px
    assert tuple(cache[0].shape[1:]) == (52, 52)
    for transform, key in ((train_transform(40), lambda i: (3, i)), (eval_transform(40), lambda i: i)):
        folder = FlowerDataset(index, transform, seed=1, short_side=52)
        cached = FlowerDataset(index, transform, seed=1, cache=cache, short_side=52)
        originals = FlowerDataset(index, transform, seed=1)
        for i in range(0, len(index), 7):
            assert folder[key(i)][1:] == cached[key(i)][1:] and torch.equal(folder[key(i)][0], cached[key(i)][0])
        assert any(not torch.equal(originals[key(i)][0], cached[key(i)][0]) for i in range(0, len(index), 7))


def test_the_short_side_shrinks_larger_photos_and_keeps_smaller_ones(tmp_path):
    """data.cache_size=N as a folder of N-px copies is made: a photo over N is shrunk to N, one already under N is
    kept as it is. So the copies train unchanged under the recipe's cache_size, and originals reach their sizes."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    sizes = {"a/big.png": (80, 64), "a/small.png": (50, 40), "b/tall.png": (45, 70), "b/exact.png": (48, 60)}
    rng = np.random.default_rng(0)
    for rel, (w, h) in sizes.items():
        (tmp_path / "photos" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "photos" / rel)
    index = scan_folder(tmp_path / "photos")
    cache = open_cache(index, 48, tmp_path / "cache", build=True, **SILENT)
    folder = FlowerDataset(index, None, short_side=48)
    expected = {"a/big.png": (48, 60), "a/small.png": (40, 50), "b/tall.png": (70, 45), "b/exact.png": (60, 48)}  # (h, w)
    for i, rel in enumerate(index.files):
        assert tuple(cache[i].shape[1:]) == tuple(folder.image(i).shape[1:]) == expected[rel], rel
        assert torch.equal(cache[i], folder.image(i))
        if min(sizes[rel]) <= 48:  # kept: the very pixels of the file
            assert torch.equal(cache[i], pil_to_tensor(Image.open(tmp_path / "photos" / rel).convert("RGB"))), rel
    assert _estimated_bytes(index, 48) == sum(cache[i].numel() for i in range(len(index)))


def test_changed_folder_gets_a_new_cache(tiny_data, tmp_path):
    folder = tmp_path / "flowers"
    copy_flowers(tiny_data, folder)
    index = scan_folder(folder)
    first = open_cache(index, 64, tmp_path / "cache", build=True, **SILENT).folder
    assert open_cache(index, 64, tmp_path / "cache", build=False).folder == first  # reused, not rebuilt
    path = folder / index.files[3]
    path.write_bytes(path.read_bytes())  # same bytes, new mtime: the key must change
    os.utime(path, ns=(1, 1))
    changed = scan_folder(folder)
    assert cache_key(changed, 64) != first.name
    with pytest.raises(FlowerdistError, match="missing"):
        open_cache(changed, 64, tmp_path / "cache", build=False)
    assert not list((tmp_path / "cache").glob(".tmp-*"))


def test_unwritable_cache_dir_is_a_one_line_error(tiny_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = run_cli("train", "-c", "configs/quickstart.yaml", f"data.root={tiny_data}", *TINY, "data.cache=true",
                   f"data.cache_dir={blocker}/cache", f"train.output_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and "data.cache_dir" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_the_gpu_data_paths_train_the_cpu_paths_weights(tiny_data, tmp_path):
    """The loader configurations a GPU run uses (worker processes that prefetch and stay alive across epochs, decoding
    the folder or reading the cache) give the same pixels, so the same weights, as the CPU default (the cache, read
    in the training process). Pinned memory is the one GPU piece left out: torch pins only with a CUDA driver."""
    digests = {}
    paths = {"cpu-default": ("data.num_workers=auto", "data.cache=auto"), "gpu-folder": ("data.num_workers=2", "data.cache=false"),
             "gpu-cache": ("data.num_workers=2", "data.cache=true")}
    for name, settings in paths.items():
        out = run_cli(
            "train", "-c", "configs/quickstart.yaml", f"data.root={tiny_data}", *TINY, "data.image_size=56", *settings,
            "data.prefetch_factor=4", f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=12", "train.epochs=2",
            f"train.output_dir={tmp_path / name}", "log.wandb=disabled",
        ).stdout
        digests[name] = re.search(r"weights sha256 ([0-9a-f]{16})", out).group(1)
        workers = 0 if name == "cpu-default" else 2
        assert f"flowerdist: data: {workers} DataLoader workers" in out and f"decoded cache {'off' if name == 'gpu-folder' else 'on'}" in out
    assert len(set(digests.values())) == 1, digests  # 12 steps over two epochs: the workers' second epoch too
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_a_failed_build_leaves_nothing_behind(tiny_data, tmp_path):
    folder = tmp_path / "flowers"
    copy_flowers(tiny_data, folder)
    index = scan_folder(folder)
    (folder / index.files[-1]).write_bytes(b"not a jpeg")  # decoding fails at the last image
    with pytest.raises(OSError):
        open_cache(index, 64, tmp_path / "cache", build=True, **SILENT)
    assert list((tmp_path / "cache").iterdir()) == []


# ---- data.num_workers=auto and data.cache=auto ------------------------------------------------------------------


def test_auto_on_the_cpu_reads_the_cache_in_the_training_process():
    from flowerdist.data.costs import choose_data_path

    path = choose_data_path("auto", "auto", torch.device("cpu"), 1, costs=lambda: pytest.fail("the CPU rule measures nothing"))
    assert (path.workers, path.cache) == (0, True) and "auto on the CPU" in path.why


def test_auto_on_a_gpu_takes_the_cpus_this_process_may_use():
    """Workers follow the affinity mask (what Slurm or taskset gives), shared by the node's ranks; not os.cpu_count()."""
    from flowerdist.data.costs import available_cpus, choose_data_path

    measured = lambda: (4.0, 1.0)  # noqa: E731
    gpu = torch.device("cuda")
    assert choose_data_path("auto", "auto", gpu, 1, measured, cpus=16).workers == 16
    assert choose_data_path("auto", "auto", gpu, 4, measured, cpus=16).workers == 4
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        assert available_cpus() == 1 and choose_data_path("auto", "auto", gpu, 1, measured).workers == 1
    finally:
        os.sched_setaffinity(0, before)
    assert choose_data_path(3, "auto", gpu, 1, measured, cpus=16).workers == 3  # a number is a number


def test_auto_cache_on_a_gpu_follows_the_measurement_and_the_room():
    from flowerdist.data.costs import choose_data_path

    gpu = torch.device("cuda")
    faster = choose_data_path("auto", "auto", gpu, 1, lambda: (4.0, 1.5), cpus=8)
    assert faster.cache and "1.50 ms per image from the cache, 4.00 ms from the folder" in faster.why
    assert "about 5,333 images/s per rank" in faster.why  # 8 workers at 1.5 ms
    assert not choose_data_path("auto", "auto", gpu, 1, lambda: (1.0, 1.5), cpus=8).cache  # measured slower: the folder
    assert not choose_data_path("auto", "auto", gpu, 1, lambda: (4.0, 1.5), cache_fits=False, cpus=8).cache
    assert choose_data_path("auto", True, gpu, 1, lambda: pytest.fail("no measurement"), cpus=8).cache


def test_stage_costs_time_every_stage_of_the_training_pipeline(tiny_data):
    from flowerdist.config import AugmentConfig
    from flowerdist.data.costs import DecodedSample, folder_and_cache_costs, stage_costs

    index = scan_folder(tiny_data)
    transform = train_transform(48, 0.25, AugmentConfig(auto_augment="trivialaugment", random_erasing=0.25))
    folder = stage_costs(index, transform, count=8)
    cached = stage_costs(index, transform, cache=DecodedSample(index, None, 8), count=8)
    assert list(folder) == ["decode", "crop + resize", "flip", "trivialaugment", "erasing", "collate"]
    assert list(cached)[0] == "cache copy" and list(cached)[1:] == list(folder)[1:]
    assert all(v > 0 for v in folder.values()) and cached["cache copy"] < folder["decode"]
    # timings on a shared machine: only the one stage that differs by ~10x (a JPEG decode vs a memory copy) is compared
    total_folder, total_cache = folder_and_cache_costs(index, transform, None, count=8)
    assert total_folder > 0 and total_cache > 0
