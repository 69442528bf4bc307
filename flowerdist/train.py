"""The training loop, one order top to bottom: build, (resume), for each step: forward, backward,
clip, step, schedule, log; at each epoch end: evaluate, checkpoint, summarise.

The same code runs as one CPU process (`flowerdist train`) and under `accelerate launch`,
torchrun or Slurm on many GPUs and nodes:

    flowerdist train -c configs/quickstart.yaml
    accelerate launch --config_file launch/multi_gpu.yaml -m flowerdist train -c configs/resnet50.yaml
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no -m flowerdist train -c configs/quickstart.yaml
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from tqdm.auto import tqdm

from flowerdist.checkpoint import (
    find_resume_checkpoint,
    load_train_state,
    prune,
    read_weights,
    rng_state,
    set_rng_state,
    unwrapped_state_dict,
    weights_digest,
    write_checkpoint,
)
from flowerdist.config import Config, save_config
from flowerdist.data.cache import cache_root, open_cache
from flowerdist.data.dataset import (
    FlowerDataset,
    eval_resize,
    eval_transform,
    load_split,
    save_split,
    scan_folder,
    stratified_split,
    to_model_input,
    train_transform,
)
from flowerdist.data.check import check_folder, usable_index
from flowerdist.data.sampler import ShardedSampler, eval_shard
from flowerdist.distributed import build_accelerator, check_world, convert_sync_batchnorm, describe_world, num_machines, say
from flowerdist.errors import FlowerdistError, Preempted
from flowerdist.evaluate import evaluate
from flowerdist.models import create_model
from flowerdist.optim import build_optimizer, build_scheduler, scaled_lr
from flowerdist.tracking import RunLogger, confusion_table, resolve_wandb_mode


@dataclass
class TrainResult:
    run_dir: Path
    best_accuracy: float
    last_metrics: dict[str, Any]
    global_step: int


def resolve_run_dir(cfg: Config, accelerator: Accelerator) -> Path:
    """`train.output_dir`, or runs/<name>-<timestamp> chosen once by the main process."""
    if cfg.train.output_dir:
        return Path(cfg.train.output_dir)
    stamp = [datetime.now().strftime("%Y%m%d-%H%M%S")]
    if accelerator.num_processes > 1:
        broadcast_object_list(stamp)
    return Path("runs") / f"{cfg.name}-{stamp[0]}"


def ensure_data(cfg: Config, accelerator: Accelerator) -> None:
    """Generate the synthetic set on first use (main process; the others wait for it)."""
    root = Path(cfg.data.root)
    if not cfg.data.synthetic or root.exists():
        return
    with accelerator.main_process_first():
        if accelerator.is_main_process and not root.exists():
            from flowerdist.data.synth import generate

            say(accelerator, f"flowerdist: generating synthetic flowers in {root} (first use)")
            generate(root, per_class=cfg.data.synthetic_per_class, size=cfg.data.synthetic_size, seed=cfg.train.seed)


def checked_index(root: str, accelerator: Accelerator):
    """Scan the folder; the main process decodes every image once, all ranks drop the same bad files."""
    index = scan_folder(root)
    skipped: list[dict[str, str]] = [{}]
    if accelerator.is_main_process:
        report = check_folder(index)
        lines = report.lines()
        say(accelerator, "flowerdist: " + "\n".join(lines if report.skipped or report.converted else lines[:1]))
        skipped = [report.skipped]
    if accelerator.num_processes > 1:
        broadcast_object_list(skipped)
    return usable_index(index, skipped[0])


def open_decoded_cache(cfg: Config, index, accelerator: Accelerator):
    """`data.cache=true`: the local main process of each node builds the cache once, the other ranks then map it."""
    if not cfg.data.cache:
        return None
    with accelerator.local_main_process_first():
        return open_cache(
            index,
            eval_resize(cfg.data.image_size),
            cache_root(cfg.data.root, cfg.data.cache_dir),
            build=accelerator.is_local_main_process,
            workers=cfg.data.num_workers,
            log=lambda m: say(accelerator, m),
        )


def make_loader(dataset, sampler, cfg: Config, device: torch.device) -> torch.utils.data.DataLoader:
    """Workers stay alive across epochs and prefetch; pinned host memory makes the uint8 copies to a GPU asynchronous."""
    workers = cfg.data.num_workers
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.data.batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=cfg.data.prefetch_factor if workers > 0 else None,
    )


class StepLog:
    """Keeps the running loss on the device and syncs it only every `every` optimizer steps.

    Windows are back to back: each ends where the next begins, so logging, checkpoint and metric
    costs inside an epoch count against images/s. Only the epoch-end evaluation between epochs is
    left out (`new_epoch`). `data_wait` is the share of the window the loop spent waiting for the
    DataLoader: near 0 when the model is the bottleneck, near 1 when the data path is.
    """

    def __init__(self, every: int, device: torch.device, images_per_step: int):
        self.every = every
        self.images_per_step = images_per_step
        self.loss_sum = torch.zeros((), device=device)
        self.micro_steps = 0
        self.new_epoch()

    def new_epoch(self) -> None:
        self.window_start = time.perf_counter()
        self.window_steps = 0
        self.data_wait = 0.0

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss.detach().float()
        self.micro_steps += 1

    def should_log(self, step: int, last: bool) -> bool:
        self.window_steps += 1
        return step % self.every == 0 or last

    def snapshot(self) -> tuple[float, int]:
        """The un-logged window (for a checkpoint): a host sync, done only when saving."""
        return float(self.loss_sum), self.micro_steps

    def restore(self, loss_sum: float, micro_steps: int) -> None:
        self.loss_sum.fill_(loss_sum)
        self.micro_steps = micro_steps

    def flush(self, accelerator: Accelerator) -> tuple[float, float, float]:
        """Mean loss over the window and all ranks, global images/s and the data-wait share (one host sync)."""
        loss = accelerator.reduce(self.loss_sum / max(1, self.micro_steps), "mean").item()
        now = time.perf_counter()
        elapsed = max(now - self.window_start, 1e-9)
        rate = self.window_steps * self.images_per_step / elapsed
        wait = self.data_wait / elapsed
        self.loss_sum.zero_()
        self.micro_steps = 0
        self.window_steps = 0
        self.data_wait = 0.0
        self.window_start = now
        return loss, rate, wait


class StopSignal:
    """SIGTERM / SIGUSR1 (Slurm's warning before a time limit or preemption) ask for a clean stop.

    The handler only sets a flag; ranks agree on it at the next log step (a collective the loop
    already pays for), finish that step, checkpoint and exit with EXIT_PREEMPTED.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self, accelerator: Accelerator) -> bool:
        flag = torch.tensor(float(self.received is not None), device=accelerator.device)
        return accelerator.reduce(flag, "sum").item() > 0

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def train(cfg: Config) -> TrainResult:
    wandb_mode = resolve_wandb_mode(cfg.log.wandb)
    accelerator = build_accelerator(cfg, "wandb" if wandb_mode else None)
    try:
        return _train(cfg, accelerator, wandb_mode)
    finally:
        accelerator.end_training()


def _train(cfg: Config, accelerator: Accelerator, wandb_mode: str | None) -> TrainResult:
    device = accelerator.device
    world = accelerator.num_processes
    check_world(accelerator)
    say(accelerator, f"flowerdist: {describe_world(accelerator)}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    # A bad model.name, shortcut or image size fails here, before any data work (meta: no memory).
    with torch.device("meta"):
        create_model(cfg.model.name, num_classes=2, shortcut=cfg.model.shortcut, image_size=cfg.data.image_size, init_weights=False)

    # ---- run directory and data -------------------------------------------------------------
    run_dir = resolve_run_dir(cfg, accelerator)
    ensure_data(cfg, accelerator)
    index = checked_index(cfg.data.root, accelerator)
    saved_split = run_dir / "split.json"
    if cfg.train.resume and saved_split.is_file():  # a resumed run keeps its split, whatever changed on disk
        train_idx, val_idx = load_split(saved_split, index)
    else:
        train_idx, val_idx = stratified_split(index.labels, cfg.data.val_fraction, cfg.train.seed)
    sampler = ShardedSampler(
        train_idx, cfg.data.batch_size, accelerator.process_index, world, cfg.train.grad_accum_steps, cfg.train.seed
    )
    cache = open_decoded_cache(cfg, index, accelerator)
    train_set = FlowerDataset(index, train_transform(cfg.data.image_size, cfg.data.min_scale), cfg.train.seed, cache=cache)
    train_loader = make_loader(train_set, sampler, cfg, device)
    val_set = FlowerDataset(index, eval_transform(cfg.data.image_size), cache=cache)
    val_loader = make_loader(val_set, eval_shard(val_idx, accelerator.process_index, world), cfg, device)

    global_batch = cfg.data.batch_size * world * cfg.train.grad_accum_steps
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    peak_lr = scaled_lr(cfg.optim, global_batch)
    say(
        accelerator,
        f"flowerdist: global batch {global_batch} = {cfg.data.batch_size} per device x {world} processes x "
        f"{cfg.train.grad_accum_steps} accumulation; {steps_per_epoch} steps/epoch, {total_steps} steps; peak lr {peak_lr:.3g}; "
        f"{len(train_idx)} train / {len(val_idx)} val images, classes {list(index.classes)}"
    )

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "class_indices.json").write_text(json.dumps({str(i): c for i, c in enumerate(index.classes)}, indent=1))
        save_split(saved_split, index, train_idx, val_idx)
    accelerator.wait_for_everyone()

    # ---- model, optimizer, schedule ----------------------------------------------------------
    set_seed(cfg.train.seed)  # identical initial weights on every rank
    model = create_model(
        cfg.model.name,
        num_classes=len(index.classes),
        shortcut=cfg.model.shortcut,
        pretrained=cfg.model.pretrained,
        pretrained_file=cfg.model.pretrained_file,
        image_size=cfg.data.image_size,
        init_weights=cfg.model.init_weights,
    )
    if cfg.train.sync_bn and world > 1:
        model = convert_sync_batchnorm(model, device)
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = build_optimizer(model, cfg.optim, peak_lr, device)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if cfg.model.compile:
        model = torch.compile(model)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)

    # ---- resume -----------------------------------------------------------------------------
    state = Counters()
    resume_from = find_resume_checkpoint(cfg.train.resume, run_dir)
    wandb_run_id = None
    if resume_from is not None:
        wandb_run_id = _restore(resume_from, accelerator, model, optimizer, scheduler, state)
        say(accelerator, f"flowerdist: resuming from {resume_from} (epoch {state.epoch}, step {state.global_step})")
        if accelerator.is_main_process:
            _truncate_metrics(run_dir / "metrics.jsonl", state.global_step)
    accelerator.wait_for_everyone()

    logger = RunLogger(accelerator, run_dir, wandb_mode)
    logger.start(
        cfg,
        run_dir.name,
        {
            "world_size": world,
            "num_machines": num_machines(accelerator),
            "global_batch": global_batch,
            "peak_lr": peak_lr,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "run_dir": str(run_dir),
        },
        run_id=wandb_run_id,
    )
    if resume_from is not None:
        logger.replay(state.global_step)

    # ---- loop --------------------------------------------------------------------------------
    metrics: dict[str, Any] = {}
    meta_base = {"classes": list(index.classes), "config": cfg.to_dict()}
    steplog = StepLog(cfg.train.log_every, device, global_batch)
    steplog.restore(state.window_loss, state.window_micro_steps)
    samples_file = None
    if cfg.train.record_samples:
        (run_dir / "samples").mkdir(exist_ok=True)
        samples_file = open(run_dir / "samples" / f"rank{accelerator.process_index}.jsonl", "a")
    k = cfg.train.grad_accum_steps

    def save(improved: bool = False, acc: float | None = None) -> None:
        state.window_loss, state.window_micro_steps = steplog.snapshot()
        # never write weights that a NaN/inf loss has already spoiled (one collective, at save time only)
        stop_if_diverged(accelerator.reduce(torch.tensor(state.window_loss, device=device), "sum").item(), state.global_step, run_dir)
        _save(run_dir, model, optimizer, scheduler, accelerator, meta_base, state, logger, cfg.train.keep_last, improved, acc)

    stop = StopSignal()
    bar = tqdm(total=total_steps, initial=state.global_step, disable=not (accelerator.is_main_process and cfg.log.progress), unit="step", dynamic_ncols=True)
    for epoch in range(state.epoch, cfg.train.epochs):
        if state.global_step >= total_steps:
            break
        epoch_start = time.perf_counter()
        sampler.set_epoch(epoch, start_micro_step=state.micro_step)
        epoch_steps = state.micro_step // k
        train_loss_sum = torch.tensor(state.epoch_loss_sum, device=device)
        model.train()
        steplog.new_epoch()
        batches = iter(train_loader)
        while True:
            wait_start = time.perf_counter()
            batch = next(batches, None)
            steplog.data_wait += time.perf_counter() - wait_start
            if batch is None:
                break
            images, labels, indices = batch
            if samples_file is not None:
                samples_file.write(json.dumps({"epoch": epoch, "step": state.global_step + 1, "indices": indices.tolist()}) + "\n")
            images = to_model_input(images, device, memory_format)
            labels = labels.to(device, non_blocking=True)
            with accelerator.accumulate(model):
                loss = criterion(model(images), labels)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.clip_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients and not optimizer.step_was_skipped:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            steplog.add(loss)
            train_loss_sum += loss.detach().float()
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            epoch_steps += 1
            bar.update()
            last = state.global_step >= total_steps or epoch_steps == steps_per_epoch
            if steplog.should_log(state.global_step, last):
                loss_value, rate, wait = steplog.flush(accelerator)
                stop_if_diverged(loss_value, state.global_step, run_dir)
                lr = scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}", data=f"{wait:.0%}", refresh=False)
                logger.log(
                    {
                        "train/loss": loss_value,
                        "train/lr": lr,
                        "train/images_per_s": rate,
                        "train/data_wait": wait,
                        "epoch": epoch + epoch_steps / steps_per_epoch,
                    },
                    state.global_step,
                )
                if stop.agreed(accelerator) and not last:
                    state.epoch, state.micro_step, state.epoch_loss_sum = epoch, epoch_steps * k, float(train_loss_sum)
                    save()
                    say(accelerator, f"flowerdist: stopped by a signal at step {state.global_step}; checkpoint saved; rerun with train.resume=auto to continue")
                    raise Preempted()
            if last:
                break
            if cfg.train.checkpoint_every and state.global_step % cfg.train.checkpoint_every == 0:
                state.epoch, state.micro_step, state.epoch_loss_sum = epoch, epoch_steps * k, float(train_loss_sum)
                save()

        # ---- epoch end: evaluate, checkpoint, summarise ---------------------------------------
        elapsed = time.perf_counter() - epoch_start
        done_steps = epoch_steps - state.micro_step // k
        train_loss = accelerator.reduce(train_loss_sum / max(1, epoch_steps * k), "mean").item()
        stop_if_diverged(train_loss, state.global_step, run_dir)
        val = evaluate(
            accelerator.unwrap_model(model),
            val_loader,
            len(index.classes),
            device,
            channels_last=cfg.model.channels_last,
            autocast=accelerator.autocast,
            reduce=lambda t: accelerator.reduce(t, "sum"),
        )
        rate = done_steps * global_batch / elapsed
        metrics = {
            "epoch": epoch + 1,
            "train/epoch_loss": train_loss,
            "val/loss": val["loss"],
            "val/accuracy": val["accuracy"],
            "val/count": val["count"],
            **{f"val/accuracy/{c}": a for c, a in zip(index.classes, val["per_class_accuracy"])},
            "val/confusion": val["confusion"],
            "epoch/images_per_s": rate,
            "epoch/seconds": elapsed,
        }
        tables = {"val/confusion_table": confusion_table(val["confusion"], index.classes)} if (wandb_mode and accelerator.is_main_process) else None
        logger.log(metrics, state.global_step, tables)
        improved = val["accuracy"] > state.best_accuracy
        state.best_accuracy = max(state.best_accuracy, val["accuracy"])
        state.epoch, state.micro_step, state.epoch_loss_sum = epoch + 1, 0, 0.0
        save(improved=improved, acc=val["accuracy"])
        summary = (
            f"epoch {epoch + 1}/{cfg.train.epochs}  train_loss {train_loss:.4f}  val_loss {val['loss']:.4f}  "
            f"val_acc {val['accuracy']:.4f}  {rate:.1f} img/s  {elapsed:.1f} s"
        )
        if accelerator.is_main_process:
            bar.write(summary) if cfg.log.progress else print(summary, flush=True)
    stop.restore()
    bar.close()
    logger.close()
    if samples_file is not None:
        samples_file.close()
    # Every rank states a digest of its weights: DDP replicas must agree bit for bit.
    print(f"flowerdist: rank {accelerator.process_index} weights sha256 {weights_digest(accelerator.unwrap_model(model))}", flush=True)
    say(accelerator, f"flowerdist: done; best val_acc {state.best_accuracy:.4f}; run directory {run_dir}")
    return TrainResult(run_dir, state.best_accuracy, metrics, state.global_step)


def stop_if_diverged(loss: float, step: int, run_dir: Path) -> None:
    """A NaN or infinite loss ends the run before it can overwrite a good checkpoint."""
    if not math.isfinite(loss):
        raise FlowerdistError(
            f"training loss became {loss} by step {step}; lower optim.lr or set optim.clip_grad_norm "
            f"(the last good checkpoint is kept in {run_dir / 'checkpoints'})"
        )


@dataclass
class Counters:
    """Where the run stands; saved in every checkpoint so a resume continues mid-epoch exactly."""

    epoch: int = 0  # the epoch to run (or to continue)
    micro_step: int = 0  # micro-batches of `epoch` already done
    global_step: int = 0  # optimizer steps done
    best_accuracy: float = -1.0
    epoch_loss_sum: float = 0.0  # this rank's summed micro-batch losses in `epoch` so far
    window_loss: float = 0.0  # this rank's loss sum since the last log line
    window_micro_steps: int = 0


def _save(run_dir, model, optimizer, scheduler, accelerator, meta_base, state: Counters, logger, keep_last, improved, acc) -> None:
    """All ranks call this: each contributes its RNG and counters; the main process writes."""
    mine = [{"rng": rng_state(), "counters": asdict(state)}]
    per_rank = gather_object(mine) if accelerator.num_processes > 1 else mine
    if accelerator.is_main_process:
        root = run_dir / "checkpoints"
        weights = unwrapped_state_dict(accelerator.unwrap_model(model))
        meta = {**meta_base, "epoch": state.epoch, "step": state.global_step, "val_accuracy": acc}
        train_state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "counters": [r["counters"] for r in per_rank],
            "wandb_run_id": logger.wandb_run_id,
        }
        rngs = {rank: r["rng"] for rank, r in enumerate(per_rank)}
        write_checkpoint(root, f"step-{state.global_step:08d}", weights, meta, train_state, rngs, link="last")
        prune(root, keep_last)
        if improved:
            write_checkpoint(root, f"best-step-{state.global_step:08d}", weights, meta, link="best")
    accelerator.wait_for_everyone()


def _restore(ckpt: Path, accelerator: Accelerator, model, optimizer, scheduler, state: Counters) -> str | None:
    train_state, rng = load_train_state(ckpt, accelerator.process_index)
    accelerator.unwrap_model(model).load_state_dict(read_weights(ckpt))
    optimizer.load_state_dict(train_state["optimizer"])
    scheduler.load_state_dict(train_state["scheduler"])
    if train_state.get("scaler") is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(train_state["scaler"])
    counters = train_state["counters"]
    mine = counters[accelerator.process_index] if accelerator.process_index < len(counters) else counters[0]
    for key, value in mine.items():
        setattr(state, key, value)
    if rng is not None:
        set_rng_state(rng)
    return train_state.get("wandb_run_id")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop events logged after the checkpoint we resume from: they will be logged again."""
    if path.is_file():
        lines = [l for l in path.read_text().splitlines() if json.loads(l)["step"] <= step]
        path.write_text("".join(l + "\n" for l in lines))
