"""The decoded-image cache (data.cache=true) gives the same samples and labels as the folder path."""

from __future__ import annotations

import os
import re
import statistics

import pytest
import torch

from conftest import TINY, run_cli
from flowerdist.data.cache import cache_key, open_cache
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


def test_downscaled_cache_same_labels_same_eval_pixels_close_train_crops(tiny_data, tmp_path):
    index = scan_folder(tiny_data)
    cache = open_cache(index, eval_resize(40), tmp_path, build=True, **SILENT)  # 64 px originals stored at 46 px
    assert tuple(cache[0].shape[1:]) == (46, 46)
    for i in range(0, len(index), 7):
        folder, cached = FlowerDataset(index, eval_transform(40))[i], FlowerDataset(index, eval_transform(40), cache=cache)[i]
        assert folder[1:] == cached[1:] and torch.equal(folder[0], cached[0])
    folder, cached = FlowerDataset(index, train_transform(40), seed=1), FlowerDataset(index, train_transform(40), seed=1, cache=cache)
    same = [(folder[(0, i)][0].float() - cached[(0, i)][0].float()).abs().mean().item() for i in range(0, len(index), 5)]
    other = [(folder[(0, i)][0].float() - folder[(9, i)][0].float()).abs().mean().item() for i in range(0, len(index), 5)]
    # the same region resampled from fewer pixels, not another crop
    assert statistics.mean(same) < 0.25 * statistics.mean(other)


def test_changed_folder_gets_a_new_cache(tiny_data, tmp_path):
    folder = tmp_path / "flowers"
    os.system(f"cp -r {tiny_data} {folder}")
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
def test_training_from_the_cache_ends_with_the_same_weights(tiny_data, tmp_path):
    digests = []
    for cache in ("false", "true"):
        out = run_cli(
            "train", "-c", "configs/quickstart.yaml", f"data.root={tiny_data}", *TINY, "data.image_size=56", "data.num_workers=1",
            f"data.cache={cache}", f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=3", "train.epochs=1",
            f"train.output_dir={tmp_path / cache}", "log.wandb=disabled",
        ).stdout
        digests.append(re.search(r"weights sha256 (\w+)", out).group(1))
    assert digests[0] == digests[1]
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_a_failed_build_leaves_nothing_behind(tiny_data, tmp_path):
    folder = tmp_path / "flowers"
    os.system(f"cp -r {tiny_data} {folder}")
    index = scan_folder(folder)
    (folder / index.files[-1]).write_bytes(b"not a jpeg")  # decoding fails at the last image
    with pytest.raises(OSError):
        open_cache(index, 64, tmp_path / "cache", build=True, **SILENT)
    assert list((tmp_path / "cache").iterdir()) == []
