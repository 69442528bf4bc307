"""`flowerdist eval` and `flowerdist predict`: load a checkpoint and use it, single process."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms.v2.functional import pil_to_tensor

from flowerdist.checkpoint import read_meta, read_weights, resolve_checkpoint
from flowerdist.config import Config, apply_overrides, config_from_dict
from flowerdist.data.check import check_folder, usable_index
from flowerdist.data.dataset import FlowerDataset
from flowerdist.data.folder import load_split, scan_folder
from flowerdist.data.images import IMAGE_EXTENSIONS, check_image, load_rgb
from flowerdist.data.costs import choose_data_path
from flowerdist.data.loader import make_loader
from flowerdist.data.transforms import eval_transform, to_model_input
from flowerdist.errors import FlowerdistError
from flowerdist.evaluate import autocast_for, evaluate, for_evaluation, memory_format
from flowerdist.models import create_model
from flowerdist.report import EVALS


def load_model(checkpoint: str | Path) -> tuple[torch.nn.Module, Config, tuple[str, ...], Path]:
    """The checkpoint's model in eval mode, its config, its classes and its directory."""
    ckpt = resolve_checkpoint(checkpoint)
    meta = read_meta(ckpt)
    cfg = config_from_dict(meta["config"], where=str(ckpt / "meta.json"))
    classes = tuple(meta["classes"])
    model = create_model(
        cfg.model.name,
        num_classes=len(classes),
        shortcut=cfg.model.shortcut,
        image_size=cfg.data.image_size,
        init_weights=False,
    )
    try:
        model.load_state_dict(read_weights(ckpt))
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise FlowerdistError(
            f"checkpoint {ckpt} does not fit model '{cfg.model.name}' (shortcut {cfg.model.shortcut}, {len(classes)} classes): "
            f"{first[1].strip() if len(first) > 1 else first[0]}"
        ) from None
    return model.to(memory_format=memory_format(cfg.model.channels_last)).eval(), cfg, classes, ckpt


def run_eval(checkpoint: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """Metrics on the run's validation split, or on all of another folder given by data.root=."""
    model, cfg, classes, ckpt = load_model(checkpoint)
    other_root = any(o.split("=", 1)[0].strip() == "data.root" for o in overrides)
    trained_in = cfg.train.mixed_precision
    cfg = apply_overrides(cfg, list(overrides))
    if cfg.train.mixed_precision != trained_in:
        raise FlowerdistError(f"train.mixed_precision={cfg.train.mixed_precision}: {ckpt} trained in {trained_in}; "
                              f"evaluate in another precision with eval.precision=no, bf16 or fp16")
    index = scan_folder(cfg.data.root, classes=classes)
    report = check_folder(index)
    index = usable_index(index, report.skipped)
    if other_root:
        indices, scope = list(range(len(index))), f"all of {index.root}"
    else:
        _, indices = load_split(run_split(ckpt, cfg, classes), index)
        scope = f"validation split of {ckpt.parent.parent}"
    cpu = torch.device("cpu")
    workers = choose_data_path(cfg.data.num_workers, False, cpu, 1).workers
    short = None if other_root else (cfg.data.cache_size or None)  # the run's own photos as its validation saw them
    loader = make_loader(FlowerDataset(index, eval_transform(cfg.eval_image_size), short_side=short), indices, cfg.data.batch_size, workers, cpu)
    result = evaluate(for_evaluation(model, cfg.eval.flip), loader, len(classes), cpu, channels_last=cfg.model.channels_last,
                      autocast=autocast_for(cpu, cfg.eval_precision))
    result = {"checkpoint": str(ckpt), "scope": scope, "classes": list(classes), "flip": cfg.eval.flip, "precision": cfg.eval_precision, **result}
    return {**result, "recorded": record_eval(ckpt, list(overrides), result)}


def record_eval(ckpt: Path, overrides: list[str], result: dict[str, Any]) -> str | None:
    """Append the result to RUN/evals.jsonl when the checkpoint is its run's own, so an evaluation at another size or
    on another folder stays with the run (and its record) and `report` can tabulate it; None when not recorded.
    The entry names the checkpoint by the link that points at it (best, last) and its step, so a later resume shows
    it stale."""
    if ckpt.parent.name != "checkpoints":
        return None
    name = next((link for link in ("best", "last") if (ckpt.parent / link).resolve() == ckpt), ckpt.name)
    entry = {"time": datetime.now().isoformat(timespec="seconds"), "checkpoint": name, "step": read_meta(ckpt).get("step"),
             "overrides": overrides, **{k: result[k] for k in ("scope", "count", "accuracy", "loss", "flip", "precision")}}
    target = ckpt.parent.parent / EVALS
    try:
        with target.open("a") as f:
            f.write(json.dumps(entry) + "\n")
    except OSError as err:
        print(f"flowerdist: the result was not recorded in {target} ({err.strerror}); the printed result is complete", file=sys.stderr)
        return None
    return str(target)


@torch.no_grad()
def predict_indices(checkpoint: str | Path, index, indices: list[int], batch_size: int = 32):
    """Items `indices` of a folder index through a checkpoint: (HWC uint8 images as the model saw them, true labels,
    predicted labels, predicted probabilities)."""
    model, cfg, _, _ = load_model(checkpoint)
    model, autocast = for_evaluation(model, cfg.eval.flip), autocast_for(torch.device("cpu"), cfg.eval_precision)
    dataset = FlowerDataset(index, eval_transform(cfg.eval_image_size))
    cpu, layout = torch.device("cpu"), memory_format(cfg.model.channels_last)
    images, true, pred, prob = [], [], [], []
    for batch, labels, _ in make_loader(dataset, indices, batch_size, 0, cpu):
        with autocast():
            probs = model(to_model_input(batch, cpu, layout)).float().softmax(1)
        p, k = probs.max(1)
        images += [img.permute(1, 2, 0).numpy() for img in batch]
        true += labels.tolist()
        pred += k.tolist()
        prob += p.tolist()
    return images, true, pred, prob


def run_split(ckpt: Path, cfg: Config, classes: tuple[str, ...]) -> Path:
    """The split.json of the checkpoint's own run (RUN/checkpoints/<name>): same data root, same classes."""
    split = ckpt.parent.parent / "split.json"
    if ckpt.parent.name == "checkpoints" and split.is_file():
        saved = json.loads(split.read_text())
        if saved.get("classes") == list(classes) and Path(saved.get("root", "")).resolve() == Path(cfg.data.root).resolve():
            return split
    raise FlowerdistError(
        f"checkpoint {ckpt} has no validation split of its own (it is not in RUN/checkpoints/ next to the run's split.json "
        f"for {cfg.data.root}); pass data.root=FOLDER to evaluate all of a folder"
    )


def collect_images(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(
                sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."))
            )
        elif p.is_file():
            files.append(p)
        else:
            raise FlowerdistError(f"image or folder {p} does not exist")
    if not files:
        raise FlowerdistError(f"no images found in {', '.join(paths)} (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return files


@torch.no_grad()
def run_predict(checkpoint: str | Path, paths: list[str], topk: int = 1, batch_size: int = 32) -> list[dict[str, Any]]:
    """Top-k classes per image, in the order given; an image that cannot be used gets {"image", "skipped": reason}
    instead (the same checks as training: corrupt, not an image, over the pixel limit). The run's eval.flip and
    eval.precision apply, as in `eval`."""
    model, cfg, classes, _ = load_model(checkpoint)
    model, autocast = for_evaluation(model, cfg.eval.flip), autocast_for(torch.device("cpu"), cfg.eval_precision)
    if not 1 <= topk <= len(classes):
        raise FlowerdistError(f"--topk must lie between 1 and {len(classes)} (the number of classes), got {topk}")
    transform, cpu, layout = eval_transform(cfg.eval_image_size), torch.device("cpu"), memory_format(cfg.model.channels_last)
    files = collect_images(paths)
    results: list[dict[str, Any]] = [{"image": str(f)} for f in files]
    usable = []
    for result, f in zip(results, files):
        status, detail = check_image(f)
        if status == "skip":
            result["skipped"] = detail
        else:
            usable.append((result, f))
    for start in range(0, len(usable), batch_size):
        chunk = usable[start : start + batch_size]
        batch = torch.stack([transform(pil_to_tensor(load_rgb(f))) for _, f in chunk])
        with autocast():
            probs = model(to_model_input(batch, cpu, layout)).float().softmax(1)
        top = probs.topk(topk, dim=1)
        for (result, _), p, i in zip(chunk, top.values.tolist(), top.indices.tolist()):
            result["predictions"] = [{"class": classes[k], "probability": v} for v, k in zip(p, i)]
    return results


#: images in a `predict --plot` picture at most: a folder of hundreds would make a picture nobody reads, drawn for minutes
PLOT_LIMIT = 24


def plot_predictions(results: list[dict[str, Any]], out: str | Path) -> tuple[Path, int, int]:
    """The tutorial's picture of `run_predict`'s results (skipped images are left out; the first PLOT_LIMIT are
    drawn): (the file, images drawn, images predicted)."""
    import numpy as np

    from flowerdist import figures

    predicted = [r for r in results if "predictions" in r]
    shown = predicted[:PLOT_LIMIT]
    if not shown:
        raise FlowerdistError("no image could be predicted, so there is nothing to plot")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise FlowerdistError(f"--plot {out} must name a .png file")
    images = [np.asarray(load_rgb(Path(r["image"]))) for r in shown]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        figures.save(figures.prediction_figure(images, [r["image"] for r in shown], [r["predictions"] for r in shown]), out)
    except OSError as err:
        raise FlowerdistError(f"--plot {out} cannot be written ({err.strerror}); choose a writable path") from None
    return out, len(shown), len(predicted)
