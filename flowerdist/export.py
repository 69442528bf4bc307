"""`flowerdist export --checkpoint RUN --format onnx|torchscript --out FILE`: the run's best weights as a file a
deployment runs without flowerdist, the evaluation preprocessing beside it (FILE.json), and a parity check.

The parity check runs the exported file (onnxruntime, or TorchScript) and the eager model on a few of the
run's own validation images and fails when a logit differs by more than `tolerance` (1e-4 in fp32).
onnx and onnxruntime are an optional extra: `pip install -e '.[export]'` from a clone (`make setup` installs it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from flowerdist.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_resize
from flowerdist.errors import FlowerdistError

#: Newest first: the first one the exporter and onnxruntime both take is used.
OPSETS = (23, 22, 21, 20, 19, 18, 17)


def preprocessing(cfg, classes) -> dict[str, Any]:
    """Everything a deployment needs to turn a photo into the model's input, and its output into a class."""
    size = cfg.eval_image_size
    return {
        "classes": list(classes),
        "input": {"shape": ["batch", 3, size, size], "dtype": "float32", "layout": "NCHW", "channel_order": "RGB"},
        "resize": {"short_side": eval_resize(size), "interpolation": "bilinear", "antialias": True,
                   "then": f"center crop {size}x{size}"},
        "scale": "pixel values / 255",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "output": "logits, one per class in `classes` order; softmax gives probabilities",
        "model": cfg.model.name,
        "shortcut": cfg.model.shortcut,
        "test_time_augmentation": "flip: the model averages the logits of the image and its mirror" if cfg.eval.flip else "none",
        "precision": "fp32",
    }


def sample_inputs(ckpt: Path, cfg, classes, count: int = 8) -> tuple[torch.Tensor, str]:
    """A few of the run's validation images as model input, or random images when the data is not here."""
    from flowerdist.data.dataset import FlowerDataset
    from flowerdist.data.folder import load_split, scan_folder
    from flowerdist.data.transforms import eval_transform, to_model_input

    split = ckpt.parent.parent / "split.json"
    try:
        index = scan_folder(cfg.data.root, classes=tuple(classes))
        _, val = load_split(split, index)
        dataset = FlowerDataset(index, eval_transform(cfg.eval_image_size))
        batch = torch.stack([dataset[i][0] for i in val[:count]])
        return to_model_input(batch, torch.device("cpu")), f"{len(batch)} validation images of {cfg.data.root}"
    except (FlowerdistError, OSError, KeyError):
        size = cfg.eval_image_size
        return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(0)), f"{count} random images (the run's data is not here)"


def export(checkpoint: str | Path, fmt: str, out: str | Path, tolerance: float = 1e-4, log=print) -> dict[str, Any]:
    from flowerdist.inference import load_model

    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError:
            raise FlowerdistError("--format onnx needs onnx and onnxruntime: pip install -e '.[export]' in your clone (make setup installs them)") from None
    model, cfg, classes, ckpt = load_model(checkpoint)
    from flowerdist.evaluate import for_evaluation

    model = for_evaluation(model, cfg.eval.flip).eval()  # the run's flip TTA goes into the exported graph
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FlowerdistError(f"--out {out} cannot be written ({err.strerror}); choose a file in a folder you can write to") from None
    inputs, what = sample_inputs(ckpt, cfg, classes)
    with torch.no_grad():
        expected = model(inputs)
    if fmt == "onnx":
        opset, actual = _onnx(model, inputs, out)
        detail = f"opset {opset}, onnxruntime"
    else:
        actual = _torchscript(model, inputs, out)
        detail = "TorchScript"
    diff = float((actual - expected).abs().max())
    sidecar = out.with_name(out.name + ".json")
    sidecar.write_text(json.dumps({**preprocessing(cfg, classes), "format": fmt, "source": str(ckpt)}, indent=1))
    log(f"export: {out} ({detail}) and {sidecar}; largest logit difference against PyTorch on {what}: {diff:.2e}")
    if not diff <= tolerance:
        raise FlowerdistError(f"the exported model differs from PyTorch by {diff:.2e} (> {tolerance:g}) on {what}; do not deploy {out}")
    return {"out": str(out), "sidecar": str(sidecar), "max_abs_diff": diff, "inputs": what}


def _onnx(model: torch.nn.Module, inputs: torch.Tensor, out: Path) -> tuple[int, torch.Tensor]:
    """Export with a dynamic batch axis at the newest opset that works, then run it in onnxruntime."""
    import onnxruntime

    errors = []
    for opset in OPSETS:
        try:
            torch.onnx.export(model, (inputs[:1],), str(out), input_names=["images"], output_names=["logits"], opset_version=opset,
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
            session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            return opset, torch.from_numpy(session.run(["logits"], {"images": inputs.numpy()})[0])
        except Exception as err:  # this opset is too new for the exporter or for onnxruntime: try the next
            errors.append(f"opset {opset}: {type(err).__name__}")
    raise FlowerdistError(f"ONNX export failed at every opset ({'; '.join(errors[-3:])}); try --format torchscript")


def _torchscript(model: torch.nn.Module, inputs: torch.Tensor, out: Path) -> torch.Tensor:
    """Traced (the models have no data-dependent control flow), saved, loaded back and run."""
    with torch.no_grad():
        traced = torch.jit.trace(model, inputs[:1])
    traced.save(str(out))
    loaded = torch.jit.load(str(out))
    with torch.no_grad():
        return loaded(inputs)
