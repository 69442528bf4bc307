"""flowerdist used as a hostile user would: reruns into a used folder, changed configs on resume, bad
checkpoints, bad paths, bad images. Each case once lost work or ended in a traceback; now each ends
in one line (exit 2) and leaves the run as it was."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO, TINY, copy_flowers, run_cli
from flowerdist.data import FLOWER_CLASSES
from flowerdist.data.images import load_rgb




def args(data, run, *extra):
    return ("train", "-c", "configs/quickstart.yaml", f"data.root={data}", f"train.output_dir={run}", *TINY,
            "data.image_size=32", "train.epochs=1", "train.max_steps=4", *extra)


def one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "weights_only=False" not in lines[0], proc.stderr


def snapshot(run):
    """Every file of a run with its bytes: what must not change when flowerdist refuses."""
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture
def done_run(tiny_data, tmp_path):
    run = tmp_path / "run"
    run_cli(*args(tiny_data, run))
    return run


# ---- a run directory belongs to one run -------------------------------------------------------


@pytest.mark.slow
def test_a_second_fresh_run_into_the_same_folder_is_refused_before_writing(done_run, tiny_data):
    before = snapshot(done_run)
    one_line_error(run_cli(*args(tiny_data, done_run, "train.seed=3"), check=False), "already holds a run")
    proc = run_cli(*args(tiny_data, done_run, "train.seed=3"), check=False)
    assert "train.resume=auto" in proc.stderr and "new train.output_dir" in proc.stderr
    assert snapshot(done_run) == before


@pytest.mark.slow
def test_overwrite_moves_the_old_run_aside(done_run, tiny_data):
    before = snapshot(done_run)
    out = run_cli(*args(tiny_data, done_run, "train.seed=3", "train.overwrite=true")).stdout
    (aside,) = done_run.parent.glob("run.replaced-*")
    assert "moved the previous run" in out and snapshot(aside) == before
    assert yaml.safe_load((done_run / "config.yaml").read_text())["train"]["seed"] == 3


# ---- resuming with a changed config -----------------------------------------------------------


@pytest.mark.parametrize("change, key", [("model.name=resnet18", "model.name"), ("model.shortcut=C", "model.shortcut"),
                                         ("train.seed=5", "train.seed"), ("data.val_fraction=0.3", "data.val_fraction")])
@pytest.mark.slow
def test_resume_refuses_another_model_or_other_data(done_run, tiny_data, change, key):
    before = snapshot(done_run)
    proc = run_cli(*args(tiny_data, done_run, "train.resume=auto", "train.max_steps=8", change), check=False)
    one_line_error(proc, f"with {key}=")
    assert "makes another model or other data" in proc.stderr and snapshot(done_run) == before


@pytest.mark.slow
def test_resume_refuses_another_class_set(done_run, tiny_data, tmp_path):
    three = tmp_path / "three"
    for name in ("daisy", "roses", "tulips"):
        shutil.copytree(tiny_data / name, three / name)
    before = snapshot(done_run)
    proc = run_cli(*args(three, done_run, "train.resume=auto", "train.max_steps=8"), check=False)
    one_line_error(proc, "has classes ['daisy', 'roses', 'tulips'] but the run was trained on")
    assert snapshot(done_run) == before


@pytest.mark.slow
def test_optimisation_changes_need_the_override_and_are_recorded(done_run, tiny_data):
    before = snapshot(done_run)
    one_line_error(run_cli(*args(tiny_data, done_run, "train.resume=auto", "train.max_steps=8", "optim.lr=0.0005"), check=False),
                   "pass train.resume_override=true")
    assert snapshot(done_run) == before
    run_cli(*args(tiny_data, done_run, "train.resume=auto", "train.epochs=2", "train.max_steps=8", "optim.lr=0.0005",
                  "train.resume_override=true"))
    config = yaml.safe_load((done_run / "config.yaml").read_text())
    assert config["optim"]["lr"] == 0.0005
    assert config["resumed_changes"] == [{"step": 4, "changes": {"optim.lr": {"was": 0.002, "now": 0.0005},
                                                                 "train.epochs": {"was": 1, "now": 2},
                                                                 "train.max_steps": {"was": 4, "now": 8}}}]
    events = [json.loads(line) for line in (done_run / "metrics.jsonl").read_text().splitlines()]
    changes = [e for e in events if "config_change" in e]
    assert changes == [{"step": 4, "config_change": {"train.epochs": [1, 2], "train.max_steps": [4, 8], "optim.lr": [0.002, 0.0005]}}]
    assert max(e["step"] for e in events) == 8


@pytest.mark.slow
def test_free_keys_may_change_on_resume(done_run, tiny_data):
    run_cli(*args(tiny_data, done_run, "train.resume=auto", "train.epochs=2", "train.max_steps=6", "train.log_every=2"))
    assert json.loads((done_run / "result.json").read_text())["global_step"] == 6


# ---- checkpoints that cannot be trusted -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "empty", "pickled code"])
def test_a_damaged_train_state_is_one_line(done_run, tiny_data, damage):
    state = done_run / "checkpoints" / "last" / "train_state.pt"
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[:100])
    elif damage == "empty":
        state.write_bytes(b"")
    else:
        torch.save({"state": {"global_step": 1}, "ranks": [], "x": io.StringIO("any object")}, state)
    proc = run_cli(*args(tiny_data, done_run, "train.resume=auto", "train.max_steps=8"), check=False)
    one_line_error(proc, "cannot be read safely")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["no", "auto"])  # auto reads the checkpoint's precision before anything else
def test_a_missing_resume_path_fails_before_writing(tiny_data, tmp_path, precision):
    run = tmp_path / "new"
    proc = run_cli(*args(tiny_data, run, f"train.resume={tmp_path / 'nope'}", f"train.mixed_precision={precision}"), check=False)
    one_line_error(proc, "is not a training checkpoint")
    assert not run.exists()


@pytest.mark.slow
def test_meta_with_a_string_for_classes_is_refused(done_run, tiny_data):
    meta_path = done_run / "checkpoints" / "best" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["classes"] = "daisy"
    meta_path.write_text(json.dumps(meta))
    one_line_error(run_cli("predict", "--checkpoint", str(done_run), str(tiny_data / "roses"), check=False), "'classes' (a list")


@pytest.mark.slow
def test_eval_never_uses_a_split_of_another_run(done_run, tiny_data, tmp_path):
    copied = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree((done_run / "checkpoints" / "best").resolve(), copied)
    shutil.copy(done_run / "split.json", tmp_path / "split.json")  # an unrelated split two levels up
    one_line_error(run_cli("eval", "--checkpoint", str(copied), check=False), "has no validation split of its own")
    assert json.loads(run_cli("eval", "--checkpoint", str(copied), f"data.root={tiny_data}", "--json").stdout)["count"] == 200


@pytest.mark.slow
def test_eval_refuses_to_rewrite_the_training_precision(done_run):
    """train.mixed_precision is what the run trained in; evaluating in another precision is eval.precision's job."""
    for value in ("auto", "bf16"):
        proc = run_cli("eval", "--checkpoint", str(done_run), f"train.mixed_precision={value}", check=False)
        one_line_error(proc, f"train.mixed_precision={value}: ")
        assert "trained in no" in proc.stderr and "eval.precision=" in proc.stderr


# ---- divergence -------------------------------------------------------------------------------


@pytest.mark.parametrize("lr", ["inf", "1e30", "nan"])
def test_absurd_learning_rates_are_refused_by_the_config(lr, tmp_path):
    proc = run_cli("train", f"optim.lr={lr}", f"train.output_dir={tmp_path / 'r'}", check=False)
    one_line_error(proc, "optim.lr")
    assert not (tmp_path / "r").exists()


def diverge(data, run, *extra):
    """SGD at lr 10: the loss and the weights blow up within the first steps."""
    return run_cli(*args(data, run, "train.max_steps=0", "train.epochs=3", "optim.name=sgd", "optim.lr=10", "optim.warmup_steps=0", *extra),
                   check=False)


def finite_checkpoints(run):
    saved = sorted((run / "checkpoints").glob("*step-*")) if (run / "checkpoints").is_dir() else []
    return saved, all(torch.isfinite(t).all() for c in saved for t in load_file(c / "model.safetensors").values() if t.is_floating_point())


@pytest.mark.slow
def test_the_weights_guard_keeps_nonfinite_weights_out_of_checkpoints(tiny_data, tmp_path):
    """A checkpoint every step and no loss logged before step 50: the guard that stops the run is the one every save
    applies to the weights and optimizer state; the checkpoints written before are all finite."""
    proc = diverge(tiny_data, tmp_path / "nan", "train.log_every=50", "train.checkpoint_every=1")
    one_line_error(proc, "training diverged: the weights became non-finite by step")
    saved, finite = finite_checkpoints(tmp_path / "nan")
    assert saved and finite  # step 1 was checkpointed, and nothing spoiled was


@pytest.mark.slow
def test_the_loss_guard_stops_at_the_first_nonfinite_loss(tiny_data, tmp_path):
    """The loss logged every step: the run stops at the first non-finite loss, before any checkpoint (epoch end or
    save) can be reached, naming the step and the fix."""
    proc = diverge(tiny_data, tmp_path / "nan", "train.log_every=1")
    one_line_error(proc, "training loss became")
    step = int(re.search(r"by step (\d+);", proc.stderr).group(1))
    assert step < 10 and not finite_checkpoints(tmp_path / "nan")[0]  # within the first epoch (10 steps): no checkpoint yet
    assert "lower optim.lr or set optim.clip_grad_norm" in proc.stderr


# ---- silent wrong data ------------------------------------------------------------------------


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1))  # a horizontal gradient
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode.startswith("I")
    rgb = np.asarray(load_rgb(tmp_path / "ramp.png"))
    assert rgb.shape == (8, 256, 3) and rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255
    assert np.all(np.diff(rgb[0, :, 0].astype(int)) >= 0) and abs(int(rgb[0, 128, 0]) - 128) <= 1


@pytest.mark.slow
def test_one_class_is_refused(tiny_data, tmp_path):
    only = tmp_path / "only"
    shutil.copytree(tiny_data / "daisy", only / "daisy")
    one_line_error(run_cli(*args(only, tmp_path / "r"), check=False), "needs at least two")


def test_an_empty_data_root_is_refused(tmp_path):
    one_line_error(run_cli("train", "data.root=", f"train.output_dir={tmp_path / 'r'}", check=False), "data.root' is empty")


def test_a_mistyped_root_never_becomes_synthetic_flowers(tmp_path):
    typo = tmp_path / "flower_photoz"
    proc = run_cli("train", "-c", "configs/quickstart.yaml", f"data.root={typo}", f"train.output_dir={tmp_path / 'r'}", check=False)
    one_line_error(proc, "generates flowers only into a folder named synthetic*")
    assert not typo.exists()


# ---- predict, download, W&B, output folder ----------------------------------------------------


@pytest.mark.slow
def test_predict_keeps_the_good_images_when_one_is_bad(done_run, tiny_data, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(tiny_data / "roses", folder)
    jpeg = (folder / "roses_00000.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    Image.new("1", (9000, 8000)).save(folder / "bomb.png")  # over the training pixel limit
    proc = run_cli("predict", "--checkpoint", str(done_run), "--json", str(folder), check=False)
    assert proc.returncode == 1
    results = {r["image"].split("/")[-1]: r for r in json.loads(proc.stdout)}
    assert sum("predictions" in r for r in results.values()) == 40
    assert results["truncated.jpg"]["skipped"].startswith("truncated or corrupt")
    assert results["bomb.png"]["skipped"].startswith("too large")
    assert "2 of 42 images skipped" in proc.stderr and "skipped" in proc.stderr


def test_online_wandb_without_a_key_fails_before_writing(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    proc = run_cli("train", "log.wandb=online", f"train.output_dir={tmp_path / 'r'}", check=False)
    one_line_error(proc, "log.wandb=online needs a W&B API key")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_an_output_dir_behind_a_file_is_one_line(tiny_data, tmp_path):
    (tmp_path / "file").write_text("in the way")
    one_line_error(run_cli(*args(tiny_data, tmp_path / "file" / "run"), check=False), "train.output_dir=")


def test_download_into_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("in the way")
    one_line_error(run_cli("data", "download", "--out", str(tmp_path / "file"), check=False), "--out")


# ---- the data check report --------------------------------------------------------------------


def test_check_report_escapes_names_and_summarises_by_reason(tiny_data, tmp_path):
    root = tmp_path / "many"
    copy_flowers(tiny_data, root)
    for i in range(300):
        (root / "daisy" / f"empty_{i:03d}.jpg").write_bytes(b"")
    (root / "roses" / "forged\n  skipped x.jpg: ok.jpg").write_text("not a picture")
    out = run_cli("data", "check", str(root)).stdout
    lines = out.strip().splitlines()
    assert len(lines) < 15, out  # not 300 lines of empty files
    assert "skipped 295 more: empty file" in out
    assert "'roses/forged\\n  skipped x.jpg: ok.jpg': not an image" in out  # escaped, so it cannot forge a line


def test_unreadable_files_say_permission(tiny_data, tmp_path):
    root = tmp_path / "perm"
    copy_flowers(tiny_data, root)
    locked = root / "daisy" / "daisy_00000.jpg"
    locked.chmod(0)
    # root reads anything; drop the capabilities that let it, so the check meets a real permission error
    drop = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    proc = subprocess.run([*drop, sys.executable, "-m", "flowerdist", "data", "check", str(root)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "skipped daisy/daisy_00000.jpg: cannot read (permission denied)" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.slow
def test_max_steps_ends_the_schedule(tiny_data, tmp_path):
    run = tmp_path / "short"
    run_cli(*args(tiny_data, run, "train.max_steps=6", "train.log_every=1", "optim.warmup_steps=2"))
    lrs = [json.loads(line)["train/lr"] for line in (run / "metrics.jsonl").read_text().splitlines() if "train/lr" in line]
    assert len(lrs) == 6 and lrs[-1] == pytest.approx(0.0, abs=1e-12)  # cosine reached its floor at max_steps


@pytest.mark.slow
def test_a_run_copied_with_cp_r_resumes(done_run, tiny_data, tmp_path):
    """`cp -r` follows the last/best links and leaves folders in their place; a resume must still work."""
    copy = tmp_path / "copy"
    shutil.copytree(done_run, copy)  # symlinks followed, as cp -r does
    assert (copy / "checkpoints" / "last").is_dir() and not (copy / "checkpoints" / "last").is_symlink()
    run_cli(*args(tiny_data, copy, "train.resume=auto", "train.max_steps=6"))
    assert (copy / "checkpoints" / "last").is_symlink() and json.loads((copy / "result.json").read_text())["global_step"] == 6


@pytest.mark.slow
def test_resume_from_another_run_refuses_a_folder_holding_a_third(done_run, tiny_data, tmp_path):
    """train.resume=PATH continues run A into train.output_dir; a folder that already holds run C is refused, as is."""
    third = tmp_path / "third"
    run_cli(*args(tiny_data, third, "train.seed=7"))
    before = snapshot(third)
    proc = run_cli(*args(tiny_data, third, f"train.resume={done_run}", "train.max_steps=6"), check=False)
    one_line_error(proc, "continues another run")
    assert "set train.output_dir to a new directory" in proc.stderr and snapshot(third) == before
    fresh = tmp_path / "fresh"  # ...while a new folder takes the continuation
    run_cli(*args(tiny_data, fresh, f"train.resume={done_run}", "train.max_steps=6"))
    assert json.loads((fresh / "result.json").read_text())["global_step"] == 6


@pytest.mark.parametrize("problem", ["missing", "other classes", "every photo of a class"])
def test_a_test_folder_that_cannot_be_one_is_one_line(tiny_data, tmp_path, problem):
    """data.test_root missing, with other classes, or holding all of a class's photos (as a second copy of data.root
    would): one line before any training, naming the key."""
    test = tmp_path / "test"
    if problem == "other classes":
        for name in ("daisy", "roses"):
            shutil.copytree(tiny_data / name, test / name)
    if problem == "every photo of a class":  # one photo of each other class, and all the tulips: tulips is emptied
        for name in FLOWER_CLASSES:  # the generated set's classes
            (test / name).mkdir(parents=True)
            for photo in sorted((tiny_data / name).glob("*.jpg"))[: None if name == "tulips" else 1]:
                Image.open(photo).save(test / name / f"{photo.stem}.png")  # matched by class and name, any format
    proc = run_cli(*args(tiny_data, tmp_path / "run", f"data.test_root={test}"), check=False)
    want = {"missing": ("data.test_root=", "does not exist"),
            "other classes": ("data.test_root=", "has classes ['daisy', 'roses'] but data.root has"),
            "every photo of a class": ("class tulips in", "has no image left once data.test_root's are held out; "
                                                          "point data.test_root at fewer photos")}[problem]
    one_line_error(proc, want[0])
    assert want[1] in proc.stderr and not (tmp_path / "run" / "checkpoints").exists()
