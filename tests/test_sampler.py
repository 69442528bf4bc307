"""Sharding guarantees of the training sampler and the stratified split (no processes needed)."""

import numpy as np
import pytest

from flowerdist.data.folder import stratified_split
from flowerdist.data.sampler import ShardedSampler, eval_shard
from flowerdist.errors import FlowerdistError


def shards(n, batch, world, accum=1, seed=0, epoch=0):
    out = []
    for rank in range(world):
        s = ShardedSampler(list(range(100, 100 + n)), batch, rank, world, accum, seed)
        s.set_epoch(epoch)
        out.append([i for _, i in s])
    return out


@pytest.mark.parametrize("n, batch, world, accum", [(103, 4, 3, 1), (100, 5, 2, 2), (37, 3, 1, 4), (64, 8, 4, 2)])
def test_shards_disjoint_equal_and_cover_all_but_the_tail(n, batch, world, accum):
    parts = shards(n, batch, world, accum)
    step_images = batch * world * accum
    used = n // step_images * step_images
    assert all(len(p) == used // world for p in parts)  # same number of steps on every rank
    flat = [i for p in parts for i in p]
    assert len(set(flat)) == len(flat) == used  # disjoint
    assert set(flat) <= set(range(100, 100 + n))
    assert n - used < step_images  # only the tail of less than one optimizer step is dropped


def test_order_changes_per_epoch_and_repeats_per_seed():
    a0, a1 = shards(60, 4, 2, epoch=0), shards(60, 4, 2, epoch=1)
    assert a0 != a1
    assert shards(60, 4, 2, epoch=1) == a1
    assert shards(60, 4, 2, seed=1, epoch=1) != a1


def test_two_ranks_of_b_see_what_one_rank_of_2b_sees():
    (r0, r1), (single,) = shards(50, 3, 2), shards(50, 6, 1)
    for step in range(len(r0) // 3):
        assert sorted(r0[step * 3 : step * 3 + 3] + r1[step * 3 : step * 3 + 3]) == sorted(single[step * 6 : step * 6 + 6])


def test_accumulation_sees_what_the_big_batch_sees():
    (acc,), (big,) = shards(50, 2, 1, accum=4), shards(50, 8, 1)
    assert acc == big


def test_resume_skips_seen_micro_batches():
    s = ShardedSampler(list(range(40)), 4, 0, 1, 1, seed=3)
    s.set_epoch(2)
    full = [i for _, i in s]
    s.set_epoch(2, start_sample=12)
    assert [i for _, i in s] == full[12:] and len(s) == len(full) - 12


def test_too_few_images_for_one_step():
    with pytest.raises(FlowerdistError, match="fewer than one optimizer step"):
        ShardedSampler(list(range(10)), 4, 0, 2, 2)


def test_eval_shards_count_every_image_once():
    parts = [eval_shard(list(range(17)), r, 3) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(17))


def test_stratified_split_is_deterministic_disjoint_and_stratified():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    train, val = stratified_split(labels, 0.2, seed=5)
    assert (train, val) == stratified_split(labels, 0.2, seed=5)
    assert stratified_split(labels, 0.2, seed=6) != (train, val)
    assert not set(train) & set(val) and sorted(train + val) == list(range(100))
    assert np.bincount(np.asarray(labels)[val]).tolist() == [10, 6, 4]
