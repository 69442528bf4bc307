"""One real training run on generated flowers, then eval, predict and the W&B read-back."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import run_cli
from wandb_offline import read_run

pytestmark = pytest.mark.slow


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def epochs(run_dir):
    return [m for m in metrics(run_dir) if "val/accuracy" in m]


def test_run_directory_is_complete(trained_run):
    for name in ("config.yaml", "class_indices.json", "split.json", "metrics.jsonl"):
        assert (trained_run / name).is_file(), name
    assert json.loads((trained_run / "class_indices.json").read_text()) == {
        "0": "daisy", "1": "dandelion", "2": "roses", "3": "sunflowers", "4": "tulips"
    }
    cfg = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert cfg["model"]["name"] == "seed_resnet" and cfg["train"]["epochs"] == 8 and cfg["data"]["image_size"] == 64
    split = json.loads((trained_run / "split.json").read_text())
    assert len(split["val"]) == 80 and len(split["train"]) == 320 and not set(split["val"]) & set(split["train"])
    ckpts = trained_run / "checkpoints"
    assert (ckpts / "last" / "model.safetensors").is_file() and (ckpts / "best" / "model.safetensors").is_file()
    state = load_file(ckpts / "last" / "model.safetensors")
    assert state["fc.weight"].shape[0] == 5


def test_learns_clearly_above_chance(trained_run):
    accs = [m["val/accuracy"] for m in epochs(trained_run)]
    assert len(accs) == 8
    assert max(accs) >= 0.55, accs  # measured 0.625 (80 images at 64 px, 8 epochs); chance is 0.20
    losses = [m["train/epoch_loss"] for m in epochs(trained_run)]
    assert losses[-1] < losses[0]


def test_best_checkpoint_is_the_best_epoch(trained_run):
    meta = json.loads((trained_run / "checkpoints" / "best" / "meta.json").read_text())
    best = max(epochs(trained_run), key=lambda m: m["val/accuracy"])
    assert meta["val_accuracy"] == best["val/accuracy"] and meta["step"] == best["step"]
    assert meta["classes"] == ["daisy", "dandelion", "roses", "sunflowers", "tulips"]


def test_eval_reproduces_the_validation_metrics(trained_run):
    out = json.loads(run_cli("eval", "--checkpoint", str(trained_run), "--json").stdout)
    best = max(epochs(trained_run), key=lambda m: m["val/accuracy"])
    assert out["count"] == 80
    assert out["accuracy"] == pytest.approx(best["val/accuracy"], abs=1e-9)
    assert out["confusion"] == best["val/confusion"]
    assert sum(map(sum, out["confusion"])) == 80
    assert out["loss"] == pytest.approx(best["val/loss"], rel=1e-4)
    text = run_cli("eval", "--checkpoint", str(trained_run / "checkpoints" / "last")).stdout
    assert "accuracy" in text and "tulips" in text


def test_eval_on_another_folder_counts_all_of_it(trained_run, tiny_data):
    out = json.loads(run_cli("eval", "--checkpoint", str(trained_run), "--json", f"data.root={tiny_data}").stdout)
    assert out["count"] == 200  # all 5 x 40 images of another generated folder
    assert out["scope"] == f"all of {tiny_data}"


def test_predict_agrees_with_eval(trained_run, e2e_data):
    split = json.loads((trained_run / "split.json").read_text())
    images = [str(e2e_data / f) for f in split["val"]]
    preds = json.loads(run_cli("predict", "--checkpoint", str(trained_run), "--topk", "3", "--json", *images).stdout)
    assert len(preds) == 80
    for p in preds:
        probs = [c["probability"] for c in p["predictions"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    correct = sum(p["predictions"][0]["class"] == p["image"].split("/")[-2] for p in preds)
    out = json.loads(run_cli("eval", "--checkpoint", str(trained_run), "--json").stdout)
    assert correct / 80 == pytest.approx(out["accuracy"])
    # a folder works too, and the text output names each file
    text = run_cli("predict", "--checkpoint", str(trained_run), str(e2e_data / "roses")).stdout
    assert len(text.strip().splitlines()) == 80 and "roses_00000.jpg" in text


def test_wandb_offline_run_matches_metrics_jsonl(trained_run):
    run = read_run(trained_run)
    logged = metrics(trained_run)
    steps = [m for m in logged if "train/loss" in m]
    history_loss = [(row["_step"], row["train/loss"]) for row in run["history"] if "train/loss" in row]
    assert history_loss == [(m["step"], m["train/loss"]) for m in steps]
    history_acc = [(row["_step"], row["val/accuracy"]) for row in run["history"] if "val/accuracy" in row]
    assert history_acc == [(m["step"], m["val/accuracy"]) for m in epochs(trained_run)]
    per_class = [row["val/accuracy/tulips"] for row in run["history"] if "val/accuracy/tulips" in row]
    assert per_class == [m["val/accuracy/tulips"] for m in epochs(trained_run)]
    tables = [row for row in run["history"] if row.get("val/confusion_table/_type") == "table-file"]
    assert len(tables) == 8 and all(row["val/confusion_table/nrows"] == 25 for row in tables)  # 5 x 5 (actual, predicted)
    assert run["config"]["optim.lr"] == 0.001 and run["config"]["world_size"] == 1
    assert run["config"]["global_batch"] == 16 and run["config"]["model.name"] == "seed_resnet"
    state = torch.load(trained_run / "checkpoints" / "last" / "train_state.pt", weights_only=True)
    assert state["logger"]["wandb_run_id"] == run["run_id"]


def test_user_errors_are_one_line(trained_run, tmp_path):
    cases = [
        (["eval", "--checkpoint", str(tmp_path / "nope")], "does not exist"),
        (["train", "optim.lr=-1"], "config key 'optim.lr' must be positive"),
        (["train", "model.name=resnet19"], "resnet18"),
        (["predict", "--checkpoint", str(trained_run), str(tmp_path)], "no images found"),
        (["predict", "--checkpoint", str(trained_run), "--topk", "9", str(tmp_path)], "--topk must lie between 1 and 5"),
    ]
    for args, needle in cases:  # in this process: cli.main prints the error and returns the exit status
        proc = run_cli(*args, check=False)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("flowerdist: error:"), proc.stderr
