"""The generated flower set: deterministic, laid out like flower_photos, and not a colour task."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flowerdist.data import FLOWER_CLASSES
from flowerdist.data.synth import generate
from flowerdist.errors import FlowerdistError


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("s") / "flowers", per_class=30, size=64, seed=3)


def files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))


def test_layout_and_images(small):
    assert sorted(p.name for p in small.iterdir()) == list(FLOWER_CLASSES)
    assert all(len(list((small / c).glob("*.jpg"))) == 30 for c in FLOWER_CLASSES)
    with Image.open(small / "roses" / "roses_00007.jpg") as img:
        assert img.format == "JPEG" and img.size == (64, 64) and img.mode == "RGB"


def test_same_seed_same_bytes_other_seed_other_images(small, tmp_path):
    again = generate(tmp_path / "again", per_class=30, size=64, seed=3, workers=2)
    assert files(again) == files(small)
    assert all((again / f).read_bytes() == (small / f).read_bytes() for f in files(small))
    other = generate(tmp_path / "other", per_class=30, size=64, seed=4)
    assert (other / "daisy" / "daisy_00000.jpg").read_bytes() != (small / "daisy" / "daisy_00000.jpg").read_bytes()


def test_refuses_to_overwrite(small):
    with pytest.raises(FlowerdistError, match="exists"):
        generate(small, per_class=2, size=32)


def test_colour_alone_does_not_separate_the_classes(small):
    """Nearest class centroid on a coarse colour histogram, fitted on half, scored on the other half."""

    def feature(path):
        a = np.asarray(Image.open(path).convert("RGB")) // 64  # 4 levels per channel
        h = np.bincount((a[..., 0] * 16 + a[..., 1] * 4 + a[..., 2]).ravel(), minlength=64)
        return h / h.sum()

    X = {c: np.stack([feature(p) for p in sorted((small / c).glob("*.jpg"))]) for c in FLOWER_CLASSES}
    centroids = np.stack([X[c][::2].mean(0) for c in FLOWER_CLASSES])
    correct = total = 0
    for label, c in enumerate(FLOWER_CLASSES):
        for x in X[c][1::2]:
            correct += int(np.argmin(((centroids - x) ** 2).sum(1)) == label)
            total += 1
    assert correct / total < 0.6, f"colour histograms alone reach {correct / total:.2f}"
