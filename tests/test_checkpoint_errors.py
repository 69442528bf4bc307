"""Checkpoints that do not match, corrupt files, and a diverging run: clear one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


def one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def copy_best(trained_run, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree((trained_run / "checkpoints" / "best").resolve(), dst)
    return dst


def test_corrupt_weights(trained_run, tmp_path, tiny_data):
    ckpt = copy_best(trained_run, tmp_path)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 3])
    one_line_error(run_cli("predict", "--checkpoint", str(ckpt), str(tiny_data / "roses"), check=False), "are unreadable")
    (ckpt / "meta.json").write_text("{not json")
    one_line_error(run_cli("eval", "--checkpoint", str(ckpt), f"data.root={tiny_data}", check=False), "meta.json is unreadable")


def test_architecture_mismatch(trained_run, tmp_path, tiny_data):
    ckpt = copy_best(trained_run, tmp_path)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["config"]["model"]["name"] = "resnet18"
    (ckpt / "meta.json").write_text(json.dumps(meta))
    one_line_error(run_cli("predict", "--checkpoint", str(ckpt), str(tiny_data / "roses"), check=False), "does not fit model 'resnet18'")


def test_class_mismatch(trained_run, tmp_path, tiny_data):
    other = tmp_path / "three"
    for name in ("daisy", "roses", "tulips"):
        shutil.copytree(tiny_data / name, other / name)
    one_line_error(
        run_cli("eval", "--checkpoint", str(trained_run), f"data.root={other}", check=False),
        "has classes ['daisy', 'roses', 'tulips'] but the checkpoint was trained on",
    )
