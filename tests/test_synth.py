"""The procedural flower set: layout, determinism, decodable JPEGs, and colour alone not enough."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from flowerdist.data import FLOWER_CLASSES
from flowerdist.data.synth import generate, render
from flowerdist.errors import FlowerdistError

PER_CLASS = 30
SIZE = 64


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synth") / "flowers", per_class=PER_CLASS, size=SIZE, seed=0)


def test_layout_and_counts(synth_set):
    assert sorted(p.name for p in synth_set.iterdir()) == list(FLOWER_CLASSES)
    for name in FLOWER_CLASSES:
        files = sorted(p.name for p in (synth_set / name).iterdir())
        assert files == [f"{name}_{i:05d}.jpg" for i in range(PER_CLASS)]
    assert not [p for p in synth_set.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_jpegs_decode_at_the_requested_size(synth_set):
    for name in FLOWER_CLASSES:
        for path in list((synth_set / name).iterdir())[:5]:
            with Image.open(path) as img:
                assert img.format == "JPEG"
                img.load()
                assert img.size == (SIZE, SIZE) and img.mode == "RGB"


def test_same_seed_gives_identical_bytes_and_another_seed_differs(synth_set, tmp_path):
    again = generate(tmp_path / "again", per_class=PER_CLASS, size=SIZE, seed=0)
    other = generate(tmp_path / "other", per_class=PER_CLASS, size=SIZE, seed=1)
    files = _files(synth_set)
    assert _files(again) == files == _files(other)
    assert all((synth_set / f).read_bytes() == (again / f).read_bytes() for f in files)
    differ = sum((synth_set / f).read_bytes() != (other / f).read_bytes() for f in files)
    assert differ == len(files)


def test_workers_give_the_same_bytes(tmp_path):
    one = generate(tmp_path / "one", per_class=3, size=32, seed=5)
    two = generate(tmp_path / "two", per_class=3, size=32, seed=5, workers=2)
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in _files(one))


def test_colour_alone_does_not_separate_the_classes(synth_set):
    """Nearest centroid on the mean RGB of each image, trained on even indices, tested on odd ones."""
    feats, labels = [], []
    for ci, name in enumerate(FLOWER_CLASSES):
        for path in sorted((synth_set / name).iterdir()):
            with Image.open(path) as img:
                feats.append(np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(0))
            labels.append(ci)
    x, y = np.stack(feats), np.array(labels)
    train = np.arange(len(y)) % 2 == 0
    centroids = np.stack([x[train & (y == k)].mean(0) for k in range(len(FLOWER_CLASSES))])
    pred = np.argmin(((x[~train, None] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = (pred == y[~train]).mean()
    assert accuracy < 0.4, accuracy  # measured 0.25-0.34 (chance 0.20): shape, not colour, must tell the classes apart


def test_existing_non_empty_out_is_refused(synth_set):
    before = _files(synth_set)
    with pytest.raises(FlowerdistError, match=re.escape(str(synth_set)) + ".*already exists.*--out"):
        generate(synth_set, per_class=1, size=SIZE)
    assert _files(synth_set) == before


def test_empty_existing_out_is_filled(tmp_path):
    (tmp_path / "empty").mkdir()
    out = generate(tmp_path / "empty", per_class=1, size=32)
    assert len(_files(out)) == len(FLOWER_CLASSES)


@pytest.mark.parametrize(
    "kwargs, flag", [({"per_class": 0}, "--per-class"), ({"size": 8}, "--size"), ({"seed": -1}, "--seed")]
)
def test_bad_arguments_name_the_flag(tmp_path, kwargs, flag):
    with pytest.raises(FlowerdistError, match=flag):
        generate(tmp_path / "x", **kwargs)
    assert not list(tmp_path.iterdir())


def test_render_rejects_an_unknown_class():
    with pytest.raises(FlowerdistError, match="daisy"):
        render("orchid", np.random.default_rng(0), 32)
