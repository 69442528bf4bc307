"""Config keys the recipes depend on, each switched on and off: the test fails when the key stops doing what its
docstring (and the README's key table) says."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, initial_weights, run_cli, weights_of

pytestmark = pytest.mark.slow  # every test trains


def common(data, run, *extra):
    return ("train", "-c", "configs/quickstart.yaml", f"data.root={data}", f"train.output_dir={run}", *TINY, "train.epochs=1",
            "train.log_every=1", *extra)


def first_losses(run):
    return [json.loads(line)["train/loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]


def update_norm(run, model="seed_resnet", image_size=64):
    init, final = initial_weights(model, image_size), weights_of(run)
    return sum(float((final[k].double() - init[k].double()).pow(2).sum()) for k in init if init[k].is_floating_point()) ** 0.5


def test_label_smoothing_changes_the_loss_and_the_update(tiny_data, tmp_path):
    """The same first batch through the same initial weights: only the loss's targets differ."""
    for name, smoothing in (("hard", 0.0), ("smooth", 0.4)):
        run_cli(*common(tiny_data, tmp_path / name, "train.max_steps=1", f"train.label_smoothing={smoothing}"))
    hard, smooth = first_losses(tmp_path / "hard")[0], first_losses(tmp_path / "smooth")[0]
    assert abs(hard - smooth) > 1e-3, (hard, smooth)
    assert not torch.equal(weights_of(tmp_path / "hard")["fc.weight"], weights_of(tmp_path / "smooth")["fc.weight"])


def test_gradient_clipping_bounds_the_update(tiny_data, tmp_path):
    """SGD without momentum or decay: one clipped step moves the weights by exactly lr x clip."""
    sgd = ("train.max_steps=1", "optim.name=sgd", "optim.momentum=0", "optim.weight_decay=0", "optim.lr=0.1", "optim.warmup_steps=0")
    run_cli(*common(tiny_data, tmp_path / "clipped", *sgd, "optim.clip_grad_norm=0.001"))
    run_cli(*common(tiny_data, tmp_path / "free", *sgd))
    assert update_norm(tmp_path / "clipped") == pytest.approx(0.1 * 0.001, rel=1e-3)
    assert update_norm(tmp_path / "free") > 100 * 0.1 * 0.001  # unclipped, the same step is far larger


def test_evaluation_runs_at_eval_image_size(tiny_data, tmp_path):
    """data.eval_image_size=48 with 32-px training: validation, eval, predict and export all see 48-px inputs."""
    run = tmp_path / "run"
    sizes = ("model.name=resnet18", "data.image_size=32", "data.eval_image_size=48", "train.max_steps=2")
    seen = []
    from flowerdist.models import resnet

    original = resnet.ResNet.forward
    try:  # record the input side of every forward pass, training and validation alike (nothing else changes)
        resnet.ResNet.forward = lambda self, x: (seen.append((self.training, x.shape[-1])), original(self, x))[1]
        run_cli(*common(tiny_data, run, *sizes))
        run_cli("predict", "--checkpoint", str(run), str(tiny_data / "roses" / "roses_00000.jpg"))
    finally:
        resnet.ResNet.forward = original
    assert {side for training, side in seen if training} == {32} and {side for training, side in seen if not training} == {48}
    run_cli("export", "--checkpoint", str(run), "--format", "torchscript", "--out", str(tmp_path / "m.pt"))
    assert json.loads((tmp_path / "m.pt.json").read_text())["input"]["shape"][2:] == [48, 48]


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_sets_the_memory_format(tiny_data, tmp_path, channels_last):
    """model.channels_last: the weights and inputs of the model's convolutions are in that format, or not."""
    formats = []
    from flowerdist.models import seed

    original = seed.SeedResNet.forward
    try:
        seed.SeedResNet.forward = lambda self, x: (formats.append((x.is_contiguous(memory_format=torch.channels_last),
                                                                  self.conv1.weight.is_contiguous(memory_format=torch.channels_last))),
                                                   original(self, x))[1]
        run_cli(*common(tiny_data, tmp_path / "run", "train.max_steps=1", f"model.channels_last={channels_last}"))
    finally:
        seed.SeedResNet.forward = original
    assert formats and set(formats) == {(channels_last, channels_last)}


def test_bf16_trains_in_bf16_and_saves_fp32(tiny_data, tmp_path):
    """train.mixed_precision=bf16 end to end on the CPU: the convolutions compute in bf16, the loss stays finite, the
    checkpoint holds fp32 weights that eval reads."""
    dtypes = []
    from flowerdist.models import seed

    original = seed.SeedResNet.forward
    try:
        seed.SeedResNet.forward = lambda self, x: (dtypes.append(self.conv1(x).dtype), original(self, x))[1]
        run_cli(*common(tiny_data, tmp_path / "run", "train.max_steps=4", "train.mixed_precision=bf16"))
    finally:
        seed.SeedResNet.forward = original
    assert torch.bfloat16 in dtypes and all(d == torch.bfloat16 for d in dtypes)  # training and validation
    assert all(torch.isfinite(torch.tensor(first_losses(tmp_path / "run"))))
    assert {t.dtype for t in weights_of(tmp_path / "run").values() if t.is_floating_point()} == {torch.float32}
    assert json.loads(run_cli("eval", "--checkpoint", str(tmp_path / "run"), "--json").stdout)["count"] == 40


def test_the_synthetic_set_is_generated_on_first_use_only(tmp_path):
    """`make train`'s path: data.synthetic=true generates the set at data.root (its size from the config), once."""
    root = tmp_path / "synthetic_flowers"
    args = ("train", "-c", "configs/quickstart.yaml", f"data.root={root}", "data.synthetic_per_class=6", "data.synthetic_size=40",
            "data.image_size=32", "data.batch_size=4", "train.max_steps=1", "train.epochs=1", "log.wandb=disabled", "log.progress=false")
    out = run_cli(*args, f"train.output_dir={tmp_path / 'a'}").stdout
    files = sorted(root.rglob("*.jpg"))
    assert "generating SYNTHETIC flowers" in out and len(files) == 30
    from PIL import Image

    assert Image.open(files[0]).size == (40, 40)
    stamps = [f.stat().st_mtime_ns for f in files]
    out = run_cli(*args, f"train.output_dir={tmp_path / 'b'}").stdout
    assert "generating" not in out and [f.stat().st_mtime_ns for f in files] == stamps


def test_a_test_folder_is_held_out_of_training_and_evaluated_at_the_end(tiny_data, tmp_path):
    """data.test_root: its photos (matched by class and name) never enter the split; the best and the last weights are
    evaluated on all of it at the end, as `flowerdist eval data.root=TEST` evaluates them."""
    import shutil

    from flowerdist.data.folder import scan_folder

    test = tmp_path / "test"
    for cls in scan_folder(tiny_data).classes:  # the class folders, not the hidden image cache beside them
        (test / cls).mkdir(parents=True)
        for f in sorted((tiny_data / cls).glob("*.jpg"))[:3]:
            shutil.copy(f, test / cls / f.name.replace(".jpg", ".jpeg"))  # another extension: matched by name
    run = tmp_path / "run"
    out = run_cli(*common(tiny_data, run, "train.max_steps=3", f"data.test_root={test}")).stdout
    split = json.loads((run / "split.json").read_text())
    held = {f"{p.parent.name}/{p.stem}" for p in test.rglob("*.jpeg")}
    assert len(held) == 15 and not held & {f.rsplit(".", 1)[0] for f in split["train"] + split["val"]}
    assert len(split["train"]) + len(split["val"]) == 200 - 15
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "test/best/accuracy" in line]
    assert len(final) == 1 and final[0]["test/count"] == 15 and "never used to select" in out
    for name in ("best", "last"):
        checked = json.loads(run_cli("eval", "--checkpoint", str(run / "checkpoints" / name), f"data.root={test}", "--json").stdout)
        assert checked["count"] == 15 and checked["confusion"] == final[0][f"test/{name}/confusion"], name
    assert json.loads((run / "result.json").read_text())["last_metrics"]["test/count"] == 15


def test_flip_tta_is_used_alike_by_validation_eval_predict_and_export(tiny_data, tmp_path):
    """eval.flip=true: the logged validation equals `eval`, `predict` gives the flip-averaged probabilities, and the
    exported model holds the flip; turned off on the same checkpoint, eval gives another loss."""
    run = tmp_path / "run"
    run_cli(*common(tiny_data, run, "train.max_steps=3", "eval.flip=true"))
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val/loss" in line][-1]
    flipped = json.loads(run_cli("eval", "--checkpoint", str(run / "checkpoints" / "last"), "--json").stdout)
    plain = json.loads(run_cli("eval", "--checkpoint", str(run / "checkpoints" / "last"), "eval.flip=false", "--json").stdout)
    assert flipped["flip"] and flipped["confusion"] == logged["val/confusion"] and flipped["loss"] == pytest.approx(logged["val/loss"], rel=1e-6)
    assert abs(plain["loss"] - flipped["loss"]) > 1e-4
    model, x = photo_input(run, tiny_data)
    with torch.no_grad():
        expected = ((model(x) + model(x.flip(-1))) / 2).softmax(1)[0]
    assert predicted(run, tiny_data) == pytest.approx(expected.tolist(), abs=1e-6)
    assert grid_predicted(run, tiny_data) == (int(expected.argmax()), pytest.approx(expected.max().item(), abs=1e-6))
    run_cli("export", "--checkpoint", str(run / "checkpoints" / "last"), "--format", "torchscript", "--out", str(tmp_path / "m.pt"))
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(tmp_path / "m.pt"))(x).softmax(1)[0], expected, atol=1e-5)
    assert json.loads((tmp_path / "m.pt.json").read_text())["test_time_augmentation"].startswith("flip")


def cfg_classes(run):
    return [c for _, c in sorted(json.loads((run / "class_indices.json").read_text()).items(), key=lambda kv: int(kv[0]))]


PHOTO = "roses/roses_00001.jpg"


def photo_input(run, data):
    """The run's last model and PHOTO as `predict` feeds it to the model."""
    from flowerdist.data.images import load_rgb
    from flowerdist.data.transforms import eval_transform, to_model_input
    from flowerdist.inference import load_model
    from torchvision.transforms.v2.functional import pil_to_tensor

    model, cfg, _, _ = load_model(run / "checkpoints" / "last")
    return model, to_model_input(eval_transform(cfg.eval_image_size)(pil_to_tensor(load_rgb(data / PHOTO)))[None], torch.device("cpu"))


def predicted(run, data) -> list[float]:
    """`flowerdist predict`'s probabilities for PHOTO, in class order."""
    out = json.loads(run_cli("predict", "--checkpoint", str(run / "checkpoints" / "last"), "--topk", "5", "--json", str(data / PHOTO)).stdout)
    got = {p["class"]: p["probability"] for p in out[0]["predictions"]}
    return [got[c] for c in cfg_classes(run)]


def grid_predicted(run, data) -> tuple[int, float]:
    """The report's mistakes grid's prediction for PHOTO (predict_indices): its class and probability."""
    from flowerdist.data.folder import scan_folder
    from flowerdist.inference import predict_indices

    index = scan_folder(data)
    _, _, pred, prob = predict_indices(run / "checkpoints" / "last", index, [index.files.index(PHOTO)])
    return pred[0], prob[0]


def test_eval_uses_the_precision_the_run_validated_in(tiny_data, tmp_path):
    """A bf16 run: `eval` (eval.precision=auto) reproduces the logged validation loss exactly; fp32 differs a little."""
    run = tmp_path / "run"
    run_cli(*common(tiny_data, run, "train.max_steps=3", "train.mixed_precision=bf16"))
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val/loss" in line][-1]
    auto = json.loads(run_cli("eval", "--checkpoint", str(run / "checkpoints" / "last"), "--json").stdout)
    fp32 = json.loads(run_cli("eval", "--checkpoint", str(run / "checkpoints" / "last"), "eval.precision=no", "--json").stdout)
    assert auto["precision"] == "bf16" and auto["loss"] == pytest.approx(logged["val/loss"], rel=1e-9)
    assert fp32["precision"] == "no" and 1e-6 < abs(fp32["loss"] - auto["loss"]) < 0.05
    # ... because eval also runs in the run's memory format (model.channels_last): on AVX-512 without AMX the bf16
    # kernels of the two formats round differently, and the loss above differs in the 4th digit without it
    from flowerdist.inference import load_model

    convs = [p for p in load_model(run / "checkpoints" / "last")[0].parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    # `predict` and the mistakes grid run in the same precision: the bf16 forward's probabilities, not the fp32 one's
    model, x = photo_input(run, tiny_data)
    with torch.no_grad():
        fp32 = model(x).softmax(1)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x).float().softmax(1)[0]
    got = torch.tensor(predicted(run, tiny_data))
    assert torch.allclose(got, bf16, atol=1e-6) and (got - fp32).abs().max() > 1e-5
    _, prob = grid_predicted(run, tiny_data)
    assert prob == pytest.approx(bf16.max().item(), abs=1e-6) and abs(prob - fp32.max().item()) > 1e-6


def test_eval_every_validates_every_nth_epoch_and_the_last(tiny_data, tmp_path):
    run = tmp_path / "run"
    run_cli(*common(tiny_data, run, "train.epochs=5", "train.eval_every=2", "train.max_steps=0"))
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "train/epoch_loss" in line]
    assert len(events) == 5 and [("val/accuracy" in e) for e in events] == [False, True, False, True, True]
    best = json.loads((run / "checkpoints" / "best" / "meta.json").read_text())["step"]
    assert best in {e["step"] for e in events if "val/accuracy" in e}
    assert json.loads((run / "checkpoints" / "last" / "meta.json").read_text())["step"] == events[-1]["step"]
