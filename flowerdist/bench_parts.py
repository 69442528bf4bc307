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
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from flowerdist.distributed import peak_memory


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
    start = time.perf_counter()
    step(images, labels)  # the first step: torch.compile compiles here, cuDNN autotunes
    sync(device)
    first = time.perf_counter() - start
    return {"rates": timed_windows(lambda: step(images, labels), spec, device, b), "first_step_s": first, **peak_memory(device)}


def recipe(spec: dict):
    """The augmentation and crop scale of `spec["config"]` (a recipe file), or plain crop + flip without one."""
    from flowerdist.config import load_config

    cfg = load_config(spec.get("config"), [f"model.name={spec['model']}", f"data.image_size={spec['image_size']}", "data.eval_image_size=0"])
    return cfg.data.min_scale, (cfg.augment if spec.get("config") else None)


def train_loader(spec: dict, device: torch.device, workers: int):
    """What the plain loop and the pipeline part read: flowerdist's dataset and transforms, a plain DataLoader.

    One long epoch of random draws: its workers never restart, so no window includes an epoch's refill (flowerdist's
    own loop skips the windows that do, see part_flowerdist)."""
    from flowerdist.data.cache import cache_root, open_cache
    from flowerdist.data.dataset import FlowerDataset
    from flowerdist.data.folder import scan_folder
    from flowerdist.data.loader import make_loader
    from flowerdist.data.transforms import train_transform

    index = scan_folder(spec["data"])
    cache = open_cache(index, None, cache_root(spec["data"], ""), build=True, workers=workers) if spec["cache"] is True else None
    min_scale, augment = recipe(spec)
    dataset = FlowerDataset(index, train_transform(spec["image_size"], min_scale, augment), seed=0, cache=cache)
    draws = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**8, generator=torch.Generator().manual_seed(0))
    return make_loader(dataset, draws, spec["batch"], workers, device, drop_last=True)


def part_plain(spec: dict, device: torch.device) -> dict:
    from flowerdist.data.transforms import to_model_input

    model, optimizer, criterion, scaler, memory_format = build(spec, device)
    step = train_step(model, optimizer, criterion, scaler, device, spec["precision"])
    batches = iter(train_loader({**spec, "cache": spec["cache"] is True}, device, spec["plain_workers"]))  # a plain loop reads the folder
    waited = [0.0]

    def loop_step() -> None:
        start = time.perf_counter()
        images, labels, _ = next(batches)
        waited[0] += time.perf_counter() - start
        step(to_model_input(images, device, memory_format), labels.to(device, non_blocking=True))

    rates = timed_windows(loop_step, spec, device, spec["batch"], on_start=lambda: waited.__setitem__(0, 0.0))
    timed = sum(spec["window"] * spec["batch"] / r for r in rates)
    return {"rates": rates, "data_wait": waited[0] / timed, **peak_memory(device)}


def part_flowerdist(spec: dict, device: torch.device) -> dict:
    from flowerdist.config import load_config
    from flowerdist.data.folder import scan_folder
    from flowerdist.errors import FlowerdistError
    from flowerdist.train import train

    run_dir = Path(spec["run_dir"])
    n_train = len(scan_folder(spec["data"])) * 0.95
    per_epoch = max(1, int(n_train // spec["batch"]))
    if per_epoch < 2 * spec["window"]:
        raise FlowerdistError(f"{spec['data']} gives {per_epoch} steps per epoch at batch {spec['batch']}: windows of {spec['window']} "
                              f"steps cannot avoid the epochs' refills; use more images (--synthetic-per-class) or a smaller --window")
    # Windows that hold an epoch's first step wait for the workers to refill (a cost of small epochs, measured apart
    # by the loop's data wait); they are run and skipped, so `windows` clean windows are measured.
    steps = spec["window"] * (1 + spec["windows"] + math.ceil((spec["windows"] + 1) * spec["window"] / per_epoch) + 1)
    epochs = max(1, math.ceil(steps / per_epoch))
    overrides = [
        f"model.name={spec['model']}", f"model.channels_last={spec['channels_last']}", f"model.compile={spec['compile']}",
        f"data.root={spec['data']}", "data.synthetic=false", f"data.image_size={spec['image_size']}", "data.eval_image_size=0",
        f"data.batch_size={spec['batch']}", f"data.num_workers={spec['workers']}", f"data.cache={spec['cache']}",
        "data.val_fraction=0.05", f"train.mixed_precision={spec['precision']}", f"train.cpu={device.type == 'cpu'}",
        f"train.epochs={epochs}", f"train.max_steps={steps}", f"train.log_every={spec['window']}",
        f"train.output_dir={run_dir}", "train.overwrite=true", f"log.wandb={spec['wandb']}", "log.progress=true",
    ]
    train(load_config(spec.get("config"), overrides))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_epoch = len(json.loads((run_dir / "split.json").read_text())["train"]) // spec["batch"]  # steps of an epoch
    logged = [r for r in rows if "train/images_per_s" in r and r["step"] % spec["window"] == 0 and r["step"] > spec["window"]]  # first: warm-up
    clean = clean_windows(logged, spec["window"], per_epoch)
    windows = clean[: spec["windows"]]
    return {"rates": [r["train/images_per_s"] for r in windows], "data_wait": statistics.mean(r["train/data_wait"] for r in windows),
            "skipped_refill_windows": len(logged) - len(clean), **peak_memory(device)}


def clean_windows(logged: list[dict], window: int, per_epoch: int) -> list[dict]:
    """The log windows (each ends at its "step" and covers the `window` steps before) that hold no epoch's first step:
    there the workers refill from scratch, a cost of short epochs that the steady-state rate must leave out."""
    return [r for r in logged if all((step - 1) % per_epoch for step in range(r["step"] - window + 1, r["step"] + 1))]


def part_pipeline(spec: dict, device: torch.device) -> dict:
    """The DataLoader alone at each worker count, and each stage's cost per image on one core (from this data path)."""
    from flowerdist.data.cache import cache_root, open_cache
    from flowerdist.data.costs import stage_costs
    from flowerdist.data.folder import scan_folder
    from flowerdist.data.transforms import train_transform

    out = {}
    for workers in spec["workers_list"]:
        batches = iter(train_loader(spec, torch.device("cpu"), workers))
        # 4x longer windows than the loops: the prefetch buffer filled during warm-up must not dominate one
        long = {**spec, "window": 4 * spec["window"]}
        out[str(workers)] = timed_windows(batches.__next__, long, torch.device("cpu"), spec["batch"])
        del batches  # stops this worker count's processes before the next is measured
    index = scan_folder(spec["data"])
    min_scale, augment = recipe(spec)
    transform = train_transform(spec["image_size"], min_scale, augment)
    cache = open_cache(index, None, cache_root(spec["data"], ""), build=True) if spec["cache"] is True else None
    torch.set_num_threads(1)  # one core, as one worker has
    stages = stage_costs(index, transform, cache=cache, count=96)
    return {"rates_by_workers": out, "stages_ms": stages}


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
    b, s = spec["batch"] // world, spec["image_size"]  # the 1-process run's batch, split: the same global batch
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
