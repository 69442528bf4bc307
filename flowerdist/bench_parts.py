"""The measured parts of `flowerdist bench`; each runs in a fresh process of its own.

A fresh process per part keeps one measurement from warming caches, allocators or thread pools
for the next. Every part reports images/s per window of `window` steps, after one window of
warm-up, with the device synchronised at window edges:

- model: the training step alone, on tensors already on the device;
- plain: a hand-written PyTorch loop over the same data pipeline (DataLoader, same dataset and
  transforms) with nothing else: no Accelerate, no logging, no metrics;
- flowerdist: `flowerdist.train.train`, the real loop, timed by its own back-to-back log windows;
- pipeline: the DataLoader alone, at each worker count;
- ddp: the model step under DistributedDataParallel (launched with several processes), with and
  without gradient synchronisation, plus the time of one all-reduce of all gradients.

    python -m flowerdist.bench_parts --part model --spec spec.json --out result.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_windows(step: Callable[[], Any], spec: dict, device: torch.device, images_per_step: int, on_start=None) -> list[float]:
    """images/s of each window of `spec["window"]` steps, after one window of warm-up."""
    for _ in range(spec["window"]):
        step()
    sync(device)
    if on_start is not None:
        on_start()
    rates, start = [], time.perf_counter()
    for _ in range(spec["windows"]):
        for _ in range(spec["window"]):
            step()
        sync(device)
        now = time.perf_counter()
        rates.append(spec["window"] * images_per_step / (now - start))
        start = now
    return rates


def autocast(device: torch.device, precision: str):
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


def build(spec: dict, device: torch.device, num_classes: int = 5):
    """Model (channels_last if asked, compiled if asked), AdamW as flowerdist builds it, loss, grad scaler."""
    from flowerdist.config import OptimConfig
    from flowerdist.distributed import set_device_fast_paths, use_fused_optimizer
    from flowerdist.models import create_model
    from flowerdist.optim import build_optimizer

    set_device_fast_paths(device)  # as the training loop does
    torch.manual_seed(0)
    model = create_model(spec["model"], num_classes=num_classes, image_size=spec["image_size"]).to(device)
    memory_format = torch.channels_last if spec["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = build_optimizer(model, OptimConfig(), 1e-3, fused=use_fused_optimizer(device, spec["precision"]))
    if spec["compile"]:
        model = torch.compile(model)
    scaler = torch.amp.GradScaler(device.type, enabled=spec["precision"] == "fp16")
    return model, optimizer, torch.nn.CrossEntropyLoss(), scaler, memory_format


def train_step(model, optimizer, criterion, scaler, device, precision):
    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with autocast(device, precision):
            loss = criterion(model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def part_model(spec: dict, device: torch.device) -> dict:
    model, optimizer, criterion, scaler, memory_format = build(spec, device)
    b, s = spec["batch"], spec["image_size"]
    images = torch.randn(b, 3, s, s, device=device).to(memory_format=memory_format)
    labels = torch.randint(0, 5, (b,), device=device)
    step = train_step(model, optimizer, criterion, scaler, device, spec["precision"])
    return {"rates": timed_windows(lambda: step(images, labels), spec, device, b)}


def train_loader(spec: dict, device: torch.device, workers: int):
    """What the plain loop and the pipeline part read: flowerdist's dataset, a plain shuffling DataLoader."""
    from flowerdist.data.cache import cache_root, open_cache
    from flowerdist.data.dataset import FlowerDataset
    from flowerdist.data.folder import scan_folder
    from flowerdist.data.loader import make_loader
    from flowerdist.data.transforms import train_transform

    index = scan_folder(spec["data"])
    cache = None
    if spec["cache"] is True or (spec["cache"] == "auto" and spec["device"] == "cpu"):  # auto: flowerdist's default
        cache = open_cache(index, None, cache_root(spec["data"], ""), build=True, workers=workers)
    dataset = FlowerDataset(index, train_transform(spec["image_size"]), seed=0, cache=cache)
    return make_loader(dataset, None, spec["batch"], workers, device, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))


def endless(loader):
    """Batches across epoch boundaries, the way a multi-epoch run meets them."""
    for _ in itertools.count():
        yield from loader


def part_plain(spec: dict, device: torch.device) -> dict:
    from flowerdist.data.transforms import to_model_input

    model, optimizer, criterion, scaler, memory_format = build(spec, device)
    step = train_step(model, optimizer, criterion, scaler, device, spec["precision"])
    batches = endless(train_loader({**spec, "cache": spec["cache"] is True}, device, spec["plain_workers"]))  # a plain loop reads the folder
    waited = [0.0]

    def loop_step() -> None:
        start = time.perf_counter()
        images, labels, _ = next(batches)
        waited[0] += time.perf_counter() - start
        step(to_model_input(images, device, memory_format), labels.to(device, non_blocking=True))

    rates = timed_windows(loop_step, spec, device, spec["batch"], on_start=lambda: waited.__setitem__(0, 0.0))
    timed = sum(spec["window"] * spec["batch"] / r for r in rates)
    return {"rates": rates, "data_wait": waited[0] / timed}


def part_flowerdist(spec: dict, device: torch.device) -> dict:
    from flowerdist.config import load_config
    from flowerdist.data.folder import scan_folder
    from flowerdist.train import train

    run_dir = Path(spec["run_dir"])
    steps = (spec["windows"] + 1) * spec["window"]
    n_train = len(scan_folder(spec["data"])) * 0.95
    epochs = max(1, math.ceil(steps / max(1, int(n_train // spec["batch"]))))
    overrides = [
        f"model.name={spec['model']}", f"model.channels_last={spec['channels_last']}", f"model.compile={spec['compile']}",
        f"data.root={spec['data']}", "data.synthetic=false", f"data.image_size={spec['image_size']}",
        f"data.batch_size={spec['batch']}", f"data.num_workers={spec['workers']}", f"data.cache={spec['cache']}",
        "data.val_fraction=0.05", f"train.mixed_precision={spec['precision']}", f"train.cpu={device.type == 'cpu'}",
        f"train.epochs={epochs}", f"train.max_steps={steps}", f"train.log_every={spec['window']}",
        f"train.output_dir={run_dir}", f"log.wandb={spec['wandb']}", "log.progress=true",
    ]
    train(load_config(None, overrides))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if "train/images_per_s" in r and r["step"] % spec["window"] == 0][1:]  # first: warm-up
    return {"rates": [r["train/images_per_s"] for r in windows], "data_wait": statistics.mean(r["train/data_wait"] for r in windows)}


def part_pipeline(spec: dict, device: torch.device) -> dict:
    out = {}
    for workers in spec["workers_list"]:
        batches = endless(train_loader(spec, torch.device("cpu"), workers))
        # 4x longer windows than the loops: the prefetch buffer filled during warm-up must not dominate one
        long = {**spec, "window": 4 * spec["window"]}
        out[str(workers)] = timed_windows(lambda: next(batches), long, torch.device("cpu"), spec["batch"])
        del batches  # stops this worker count's processes before the next is measured
    return {"rates_by_workers": out}


def part_ddp(spec: dict, device: torch.device) -> dict:
    """Global images/s of the model step with the global batch split over the processes."""
    import torch.distributed as dist
    from accelerate import Accelerator

    from accelerate.utils import DistributedDataParallelKwargs

    ddp_kwargs = DistributedDataParallelKwargs(bucket_cap_mb=spec.get("bucket_cap_mb") or 25)  # 25: DDP's default
    accelerator = Accelerator(cpu=device.type == "cpu", kwargs_handlers=[ddp_kwargs])
    device = accelerator.device
    world = accelerator.num_processes
    model, optimizer, criterion, scaler, memory_format = build(spec, device)
    model, optimizer = accelerator.prepare(model, optimizer)
    b, s = spec["batch"] // world, spec["image_size"]
    images = torch.randn(b, 3, s, s, device=device).to(memory_format=memory_format)
    labels = torch.randint(0, 5, (b,), device=device)
    step = train_step(model, optimizer, criterion, scaler, device, spec["precision"])
    result = {"world": world, "rates": timed_windows(lambda: step(images, labels), spec, device, b * world)}
    if world > 1:
        def local_step() -> None:
            with model.no_sync():
                step(images, labels)

        result["no_sync_rates"] = timed_windows(local_step, spec, device, b * world)
        flat = torch.zeros(sum(p.numel() for p in model.parameters()), device=device)
        times = []
        for _ in range(spec["window"] + 3):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(flat)
            sync(device)
            times.append(time.perf_counter() - start)
        result["allreduce_ms"] = statistics.median(times[3:]) * 1000
        result["gradient_mib"] = flat.numel() * 4 / 2**20
    accelerator.wait_for_everyone()
    return result if accelerator.is_main_process else {}


RUNNERS = {"model": part_model, "plain": part_plain, "flowerdist": part_flowerdist, "pipeline": part_pipeline, "ddp": part_ddp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=RUNNERS, required=True)
    parser.add_argument("--spec", required=True, help="JSON file written by `flowerdist bench`")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    spec = json.loads(Path(args.spec).read_text())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    result = RUNNERS[args.part](spec, device)
    if result:
        result["threads"] = torch.get_num_threads()
        Path(args.out).write_text(json.dumps(result))
    gc.freeze()  # a faster exit, as in cli.run


if __name__ == "__main__":
    main()
