"""Messy image folders: convert what can be converted, skip what cannot with names, never crash."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, run_cli
from flowerdist.data.check import check_folder, usable_index
from flowerdist.data.dataset import FlowerDataset
from flowerdist.data.folder import scan_folder
from flowerdist.data.transforms import eval_transform
from flowerdist.errors import FlowerdistError

CLASSES = ("daisy", "dandelion", "roses", "sunflowers", "tulips")


def rgb(seed: int, size=48) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


@pytest.fixture
def messy(tmp_path):
    root = tmp_path / "messy"
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(8):
            rgb(c * 100 + i).save(root / name / f"good_{i}.jpg")
    d = root / "daisy"
    jpeg = io.BytesIO()
    rgb(1).save(jpeg, "JPEG")
    (d / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (d / "zero.jpg").write_bytes(b"")
    (d / "notes.jpg").write_text("this is not a picture")
    rgb(2).convert("L").save(d / "gray.jpg")
    rgb(3).convert("CMYK").save(d / "cmyk.jpg")
    rgb(4).convert("P").save(d / "palette.png")
    rgb(5).convert("RGBA").save(d / "alpha.png")
    rgb(6).save(d / "photo.webp")
    Image.new("1", (9000, 8000)).save(d / "bomb.png")  # 72 Mpx, a few kB on disk
    (d / ".hidden.jpg").write_text("hidden files are ignored")
    (d / ".AppleDouble").mkdir()
    (d / ".AppleDouble" / "x.jpg").write_text("ignored too")
    (d / "readme.txt").write_text("not an image extension: ignored")
    return root


def test_check_reports_every_problem(messy):
    index = scan_folder(messy)
    assert len(index) == 40 + 9  # hidden files, hidden folders and .txt are not listed
    report = check_folder(index)
    assert report.skipped.keys() == {"daisy/truncated.jpg", "daisy/zero.jpg", "daisy/notes.jpg", "daisy/bomb.png"}
    assert report.skipped["daisy/zero.jpg"] == "empty file"
    assert report.skipped["daisy/notes.jpg"] == "not an image"
    assert report.skipped["daisy/bomb.png"].startswith("too large (9000x8000")
    assert report.skipped["daisy/truncated.jpg"].startswith("truncated or corrupt")
    assert report.converted == {"daisy/gray.jpg": "L", "daisy/cmyk.jpg": "CMYK", "daisy/palette.png": "P", "daisy/alpha.png": "RGBA"}
    assert report.counts == {"daisy": 13, "dandelion": 8, "roses": 8, "sunflowers": 8, "tulips": 8}
    # the usable images all load as 3-channel tensors
    usable = usable_index(index, report.skipped)
    ds = FlowerDataset(usable, eval_transform(32))
    assert all(ds[i][0].shape == (3, 32, 32) for i in range(len(ds)))


def test_data_check_cli(messy):
    out = run_cli("data", "check", str(messy)).stdout
    assert "49 images, 45 usable, 4 skipped, 4 converted to RGB" in out and "skipped daisy/bomb.png" in out
    data = json.loads(run_cli("data", "check", str(messy), "--json").stdout)
    assert len(data["skipped"]) == 4


def test_a_class_left_empty_stops_before_training(messy, tmp_path):
    for f in (messy / "tulips").iterdir():
        f.write_bytes(b"")
    with pytest.raises(FlowerdistError, match="class tulips .* has no readable image left"):
        usable_index(scan_folder(messy), check_folder(scan_folder(messy)).skipped)
    proc = run_cli("train", "-c", "configs/quickstart.yaml", f"data.root={messy}", *TINY, f"train.output_dir={tmp_path / 'r'}", check=False)
    assert proc.returncode == 2 and "class tulips" in proc.stderr and not (tmp_path / "r" / "checkpoints").exists()
    proc = run_cli("data", "check", str(messy), check=False)
    assert proc.returncode == 2 and "skipped tulips/good_0.jpg: empty file" in proc.stdout


def test_folder_errors(tmp_path):
    with pytest.raises(FlowerdistError, match="does not exist; set data.root"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "f" / "daisy").mkdir(parents=True)
    (tmp_path / "f" / "roses").mkdir()
    rgb(0).save(tmp_path / "f" / "roses" / "a.jpg")
    with pytest.raises(FlowerdistError, match="class daisy in .* holds no images; add images"):
        scan_folder(tmp_path / "f")


@pytest.mark.slow
def test_training_on_a_messy_folder_skips_and_finishes(messy, tmp_path):
    out = run_cli(
        "train", "-c", "configs/quickstart.yaml", f"data.root={messy}", *TINY, "data.batch_size=4", "data.image_size=32",
        "train.epochs=1", f"train.output_dir={tmp_path / 'run'}",
    ).stdout
    assert "4 skipped, 4 converted to RGB" in out and "skipped daisy/truncated.jpg" in out
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) == 45
    assert (tmp_path / "run" / "checkpoints" / "last" / "model.safetensors").is_file()
