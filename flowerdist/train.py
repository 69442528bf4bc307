"""The training loop, one order top to bottom: build, resume, then for each step: forward,
backward, clip, step, schedule, log; at each epoch end: evaluate, checkpoint, summarise.

The same code runs as one CPU process (`flowerdist train`) and under `accelerate launch`,
torchrun or Slurm on many GPUs and nodes:

    flowerdist train -c configs/quickstart.yaml
    accelerate launch --config_file launch/multi_gpu.yaml -m flowerdist train -c configs/flowers/resnet50_gpu.yaml
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no -m flowerdist train -c configs/quickstart.yaml

Components decide their own timing (`StepLog.tick`, `Checkpointer.should_save`) and own their
state (`state_dict`/`load_state_dict`); what is switched off is an object that does nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

from flowerdist.checkpoint import Checkpointer, weights_digest
from flowerdist.config import Config, save_config
from flowerdist.data.cache import cache_fits, cache_root, open_cache
from flowerdist.data.check import check_folder, usable_index
from flowerdist.data.dataset import FlowerDataset
from flowerdist.data.folder import ImageFolderIndex, load_split, save_split, scan_folder, stratified_split, without
from flowerdist.data.costs import choose_data_path, folder_and_cache_costs
from flowerdist.data.loader import make_loader
from flowerdist.data.sampler import ShardedSampler, eval_shard
from flowerdist.data.transforms import eval_transform, progressive_sides, to_model_input, train_transform
from flowerdist.ema import build_ema
from flowerdist.mix import build_mix
from flowerdist.distributed import (
    bare_model, broadcast_buffers, build_accelerator, peak_memory, check_world, convert_sync_batchnorm, describe_machine, describe_world,
    end_accelerator, local_processes, num_machines, say, set_device_fast_paths, use_fused_optimizer,
)
from flowerdist.errors import FlowerdistError, Preempted
from flowerdist.files import atomic_write_text
from flowerdist.evaluate import autocast_for, evaluate, for_evaluation, memory_format
from flowerdist.models import create_model
from flowerdist.optim import build_optimizer, build_scheduler, scaled_lr, warmup_steps
from flowerdist.preemption import StopSignal
from flowerdist.runs import Resume, claim_run_dir, reconcile, record_changes, resolve_precision
from flowerdist.state import TrainState
from flowerdist.tracking import RunLogger, SampleRecorder, StepLog, confusion_table, resolve_wandb_mode


@dataclass
class TrainResult:
    """How a finished run ended; `result.json` in the run directory marks it finished (sweeps skip it)."""

    run_dir: Path
    best_accuracy: float
    last_metrics: dict[str, Any]
    global_step: int

    def write(self) -> None:
        atomic_write_text(self.run_dir / "result.json", json.dumps(
            {"best_accuracy": self.best_accuracy, "global_step": self.global_step, "last_metrics": self.last_metrics}, indent=1))


@dataclass(frozen=True)
class Plan:
    """The run's arithmetic, derived once, printed at start and used by the loop."""

    global_batch: int  # images per optimizer step, all ranks
    steps_per_epoch: int
    total_steps: int
    peak_lr: float
    warmup_steps: int

    @classmethod
    def of(cls, cfg: Config, world: int, sampler: ShardedSampler) -> Plan:
        global_batch = cfg.data.batch_size * world * cfg.train.grad_accum_steps
        total = sampler.steps_per_epoch * cfg.train.epochs
        total = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
        return cls(global_batch, sampler.steps_per_epoch, total, scaled_lr(cfg.optim, global_batch),
                   warmup_steps(cfg.optim, sampler.steps_per_epoch))

    def describe(self, cfg: Config, world: int, data: Data) -> str:
        return (
            f"flowerdist: global batch {self.global_batch} = {cfg.data.batch_size} per device x {world} processes x "
            f"{cfg.train.grad_accum_steps} accumulation; {self.steps_per_epoch} steps/epoch, {self.total_steps} steps; "
            f"peak lr {self.peak_lr:.3g}, warm-up {self.warmup_steps} steps; {len(data.train_idx)} train / {len(data.val_idx)} val images, classes {list(data.classes)}"
        )


@dataclass
class Data:
    """The folder index, the split, and the loaders built on them."""

    index: ImageFolderIndex
    train_idx: list[int]
    val_idx: list[int]
    sampler: ShardedSampler
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    test_loader: torch.utils.data.DataLoader | None = None  # data.test_root, at its own resolution

    @property
    def classes(self) -> tuple[str, ...]:
        return self.index.classes


def train(cfg: Config) -> TrainResult:
    """Build the Accelerator, train, and always end it: trackers and process group, on error too."""
    wandb_mode = resolve_wandb_mode(cfg.log.wandb)
    cfg, precision_note = resolve_precision(cfg)  # before the Accelerator, which takes the precision
    accelerator = build_accelerator(cfg, "wandb" if wandb_mode else None)
    if precision_note:
        say(accelerator, precision_note)
    try:
        with contextlib.ExitStack() as closing:
            return _train(cfg, accelerator, wandb_mode, closing)
    finally:
        end_accelerator(accelerator)


def _train(cfg: Config, accelerator: Accelerator, wandb_mode: str | None, closing: contextlib.ExitStack) -> TrainResult:
    device = accelerator.device
    start_world(cfg, accelerator)
    run_dir = resolve_run_dir(cfg, accelerator)
    resume = claim_run_dir(cfg, run_dir, accelerator)  # before anything is written: one run per directory
    if resume is not None:
        cfg = reconcile(cfg, resume, accelerator.num_processes, say=lambda m: say(accelerator, m))
        accelerator.gradient_accumulation_steps = cfg.train.grad_accum_steps  # derived on another layout
    data = build_data(cfg, accelerator, resume)
    plan = Plan.of(cfg, accelerator.num_processes, data.sampler)
    say(accelerator, plan.describe(cfg, accelerator.num_processes, data))
    info = run_info(accelerator, plan, run_dir)  # reads /proc/cpuinfo: once, for run.json and W&B
    write_run_files(cfg, accelerator, run_dir, data, resume, info)
    model, optimizer, scheduler = build_model(cfg, accelerator, len(data.classes), plan)
    ema = build_ema(bare_model(model), cfg.train.ema_decay, cfg.train.ema_warmup)
    mix = build_mix(cfg.augment, len(data.classes), cfg.train.seed, accelerator)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    input_format = memory_format(cfg.model.channels_last)

    state, steplog = TrainState(), StepLog(cfg.train.log_every, device, plan.global_batch)
    logger = RunLogger(accelerator, run_dir, wandb_mode)
    scaler = {"scaler": accelerator.scaler} if accelerator.scaler is not None else {}
    ckpt = Checkpointer(
        run_dir, accelerator, model, optimizer, every=cfg.train.checkpoint_every, keep_last=cfg.train.keep_last,
        meta={"classes": list(data.classes), "config": cfg.to_dict()},
        states={"scheduler": scheduler, "state": state, "logger": logger, "ema": ema, **scaler}, local={"steplog": steplog},
        layout={"world_size": accelerator.num_processes, "batch_size": cfg.data.batch_size,
                "grad_accum_steps": cfg.train.grad_accum_steps, "global_batch": plan.global_batch},
    )
    if resume is not None:
        continue_run(accelerator, ckpt, resume, cfg.train.seed, state)
    accelerator.wait_for_everyone()

    closing.enter_context(logger.start(cfg, info, replay_to=state.global_step if resume else None))
    stop = closing.enter_context(StopSignal())
    samples = closing.enter_context(SampleRecorder(run_dir, accelerator.process_index, cfg.train.record_samples))
    show = accelerator.is_main_process and cfg.log.progress
    bar = closing.enter_context(tqdm(total=plan.total_steps, initial=state.global_step, disable=not show, unit="step", dynamic_ncols=True))
    metrics: dict[str, Any] = {}
    for epoch in range(state.epoch, cfg.train.epochs):
        if state.global_step >= plan.total_steps:
            break
        data.sampler.set_epoch(epoch, start_sample=state.samples_in_epoch)
        epoch_start, start_samples = time.perf_counter(), state.samples_in_epoch
        model.train()
        steplog.new_epoch()
        for images, labels, indices in steplog.timed(data.train_loader):
            samples.write(epoch, state.global_step + 1, indices)
            images, labels = to_model_input(images, device, input_format), labels.to(device, non_blocking=True)
            images, targets = mix(images, labels, state.global_step)
            loss = train_step(accelerator, model, optimizer, scheduler, criterion, images, targets, cfg.optim.clip_grad_norm)
            steplog.add(loss)
            if not accelerator.sync_gradients:
                continue
            state.advance(plan.global_batch)
            ema.update(bare_model(model), step=state.global_step)
            bar.update()
            last = state.global_step >= plan.total_steps or state.samples_in_epoch == plan.steps_per_epoch * plan.global_batch
            if steplog.tick(state.global_step, last):
                log_step(accelerator, steplog, scheduler, logger, bar, state, plan, run_dir, epoch)
                if stop.agreed(accelerator) and not last:
                    ckpt.save(state.global_step, epoch)
                    preempted(accelerator, state)
            if last:
                break
            if ckpt.should_save(state.global_step):
                ckpt.save(state.global_step, epoch)
        seconds = time.perf_counter() - epoch_start
        metrics = end_epoch(cfg, accelerator, model, ema, data, plan, state, steplog, logger, ckpt, (state.samples_in_epoch - start_samples, seconds))
        if state.global_step < plan.total_steps and stop.agreed(accelerator):  # an epoch shorter than a log window
            preempted(accelerator, state)  # end_epoch saved the checkpoint
    metrics.update(evaluate_test_set(cfg, accelerator, model, ema, ckpt, data, logger, state.global_step))
    state_digest(accelerator, model)
    result = TrainResult(run_dir, state.best_accuracy, metrics, state.global_step)
    if accelerator.is_main_process:
        result.write()
    say(accelerator, f"flowerdist: done; best val_acc {state.best_accuracy:.4f}; run directory {run_dir}")
    return result


def evaluate_test_set(cfg, accelerator, model, ema, ckpt: Checkpointer, data: Data, logger: RunLogger, step: int) -> dict[str, Any]:
    """The held-out test set (data.test_root), never used to select: the best checkpoint's weights (chosen on the
    validation split) and the last ones (the raw model's or, with train.best_of=ema, the EMA's). {} without one."""
    if data.test_loader is None:
        return {}
    import copy

    from flowerdist.checkpoint import read_weights

    last = ema.module if cfg.train.best_of == "ema" else bare_model(model)
    best = copy.deepcopy(bare_model(model))
    best.load_state_dict(read_weights((ckpt.root / "best").resolve()))
    broadcast_buffers(last)
    out = {}
    for name, weights in (("best", best), ("last", last)):
        result = validate(cfg, accelerator, weights, data.test_loader, len(data.classes))
        out.update({f"test/{name}/accuracy": result["accuracy"], f"test/{name}/loss": result["loss"], f"test/{name}/confusion": result["confusion"]})
    out["test/count"] = result["count"]
    logger.log(out, step)
    say(accelerator, f"flowerdist: test set ({out['test/count']} photos of {cfg.data.test_root}, never used to select): "
                     f"best checkpoint {out['test/best/accuracy']:.4f}, last weights {out['test/last/accuracy']:.4f}")
    return out


def state_digest(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Every rank states a digest of its weights (and rank 0's buffers): DDP replicas must agree bit for bit."""
    broadcast_buffers(bare_model(model))
    print(f"flowerdist: rank {accelerator.process_index} weights sha256 {weights_digest(bare_model(model))}", flush=True)


def preempted(accelerator: Accelerator, state: TrainState) -> None:
    say(accelerator, f"flowerdist: stopped by a signal at step {state.global_step}; checkpoint saved; rerun with train.resume=auto to continue")
    raise Preempted()


def continue_run(accelerator: Accelerator, ckpt: Checkpointer, resume: Resume, seed: int, state: TrainState) -> None:
    """Load the checkpoint into every stateful part, and cut the logs back to its step (what came after is redone)."""
    ckpt.restore(resume, seed)
    say(accelerator, f"flowerdist: resuming from {resume.checkpoint} (epoch {state.epoch}, step {state.global_step})")
    if accelerator.is_main_process:
        run_dir = ckpt.root.parent
        for log in [run_dir / "metrics.jsonl", *(run_dir / "samples").glob("rank*.jsonl")]:
            truncate_jsonl(log, state.global_step)
        record_changes(run_dir, resume)


def train_step(accelerator, model, optimizer, scheduler, criterion, images, labels, clip_grad_norm: float) -> torch.Tensor:
    """One micro-step; the optimizer steps (and the schedule advances) when Accelerate syncs gradients."""
    with accelerator.accumulate(model):
        loss = criterion(model(images), labels)
        accelerator.backward(loss)
        if accelerator.sync_gradients and clip_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
        if accelerator.sync_gradients and not optimizer.step_was_skipped:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss


def log_step(accelerator, steplog, scheduler, logger, bar, state: TrainState, plan: Plan, run_dir: Path, epoch: int) -> None:
    """The one host sync of a log window: loss over all ranks, images/s, data-wait share, lr."""
    loss, rate, wait = steplog.flush(accelerator)
    stop_if_diverged(loss, state.global_step, run_dir)
    lr = scheduler.get_last_lr()[0]
    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}", data=f"{wait:.0%}", refresh=False)
    progress = epoch + state.samples_in_epoch / (plan.steps_per_epoch * plan.global_batch)
    logger.log({"train/loss": loss, "train/lr": lr, "train/images_per_s": rate, "train/data_wait": wait, "epoch": progress}, state.global_step)


def end_epoch(cfg, accelerator, model, ema, data: Data, plan: Plan, state: TrainState, steplog: StepLog, logger: RunLogger,
              ckpt: Checkpointer, timing: tuple[int, float]) -> dict[str, Any]:
    """Evaluate (the EMA too, when there is one; every `train.eval_every` epochs and at the end), log the epoch,
    checkpoint (best when `train.best_of` improved), summarise.

    An epoch cut short by `train.max_steps` keeps its position, so a resume with more steps finishes it.
    """
    epoch, (images, seconds) = state.epoch, timing
    images_per_s = images / seconds
    complete = state.samples_in_epoch == plan.steps_per_epoch * plan.global_batch
    train_loss = steplog.epoch_loss(accelerator)
    stop_if_diverged(train_loss, state.global_step, ckpt.root.parent)
    evaluated = {"val": bare_model(model), "val_ema": ema.module}
    broadcast_buffers(*evaluated.values())  # every rank evaluates (and rank 0 saves) the same running statistics
    pictures = logger.wandb_mode is not None and accelerator.is_main_process
    final = state.global_step >= plan.total_steps or epoch + 1 == cfg.train.epochs
    if (epoch + 1) % cfg.train.eval_every and not final:  # no validation this epoch: save, log the training side
        return skip_validation(cfg, accelerator, state, plan, logger, ckpt, complete, train_loss, images_per_s, seconds)
    results = {prefix: validate(cfg, accelerator, m, data.val_loader, len(data.classes), pictures) for prefix, m in evaluated.items() if m is not None}
    metrics = {"epoch": epoch + state.samples_in_epoch / (plan.steps_per_epoch * plan.global_batch), "train/epoch_loss": train_loss}
    for prefix, val in results.items():
        metrics.update({f"{prefix}/loss": val["loss"], f"{prefix}/accuracy": val["accuracy"], f"{prefix}/count": val["count"],
                        **{f"{prefix}/accuracy/{c}": a for c, a in zip(data.classes, val["per_class_accuracy"])},
                        f"{prefix}/confusion": val["confusion"]})
    metrics.update({"epoch/images_per_s": images_per_s, "epoch/seconds": seconds, "epoch/peak_memory_mib": peak_memory(accelerator.device)["peak_memory_mib"]})
    best_of = "val" if cfg.train.best_of == "model" else "val_ema"
    val = results[best_of]
    tables = {"val/confusion_table": confusion_table(val["confusion"], data.classes)} if (logger.wandb_mode and accelerator.is_main_process) else None
    logger.log(metrics, state.global_step, tables)
    improved = val["accuracy"] > state.best_accuracy
    if pictures and (improved or final):
        logger.log_figures(result_figures(val, data, f"epoch {epoch + 1}, step {state.global_step}"), state.global_step)
    state.best_accuracy = max(state.best_accuracy, val["accuracy"])
    if complete:
        state.next_epoch()
    ckpt.save(state.global_step, state.epoch, best=improved, accuracy=val["accuracy"], best_model=evaluated[best_of])
    ema_note = f"  ema_acc {results['val_ema']['accuracy']:.4f}" if "val_ema" in results else ""
    summary = (
        f"epoch {epoch + 1}/{cfg.train.epochs}  train_loss {train_loss:.4f}  val_loss {results['val']['loss']:.4f}  "
        f"val_acc {results['val']['accuracy']:.4f}{ema_note}  {images_per_s:.1f} img/s  {seconds:.1f} s"
    )
    if accelerator.is_main_process:
        tqdm.write(summary)  # above the progress bar when there is one
    return metrics


def skip_validation(cfg, accelerator, state: TrainState, plan: Plan, logger: RunLogger, ckpt: Checkpointer, complete: bool, train_loss: float,
                    images_per_s: float, seconds: float) -> dict[str, Any]:
    """The end of an epoch that `train.eval_every` does not validate: the training metrics, a checkpoint, a line."""
    metrics = {"epoch": state.epoch + state.samples_in_epoch / (plan.steps_per_epoch * plan.global_batch), "train/epoch_loss": train_loss,
               "epoch/images_per_s": images_per_s, "epoch/seconds": seconds}
    logger.log(metrics, state.global_step)
    epoch = state.epoch
    if complete:
        state.next_epoch()
    ckpt.save(state.global_step, state.epoch)
    if accelerator.is_main_process:
        tqdm.write(f"epoch {epoch + 1}/{cfg.train.epochs}  train_loss {train_loss:.4f}  (validated every {cfg.train.eval_every})  "
                   f"{images_per_s:.1f} img/s  {seconds:.1f} s")
    return metrics


def validate(cfg: Config, accelerator: Accelerator, model: torch.nn.Module, loader, num_classes: int, keep_predictions: bool = False) -> dict[str, Any]:
    """Loss, accuracy, per-class accuracy and confusion matrix over every rank's shard of `loader`, with the
    evaluation settings `eval` and `predict` use too (eval.flip, eval.precision)."""
    return evaluate(
        for_evaluation(model, cfg.eval.flip), loader, num_classes, accelerator.device, channels_last=cfg.model.channels_last,
        autocast=autocast_for(accelerator.device, cfg.eval_precision), reduce=lambda t: accelerator.reduce(t, "sum"),
        keep_predictions=keep_predictions,
    )


def result_figures(val: dict[str, Any], data: Data, title: str, count: int = 18) -> dict[str, Any]:
    """The confusion matrix and the mistakes grid (of this rank's validation shard) that W&B shows as images."""
    from flowerdist import figures

    # (index, label, pred, prob): confident mistakes first, then the least confident correct predictions
    shown = sorted(val["predictions"], key=lambda p: (p[1] == p[2], p[3] if p[1] == p[2] else -p[3]))[:count]
    images = [data.val_loader.dataset[i][0].permute(1, 2, 0).numpy() for i, *_ in shown]
    return {
        "val/confusion_matrix": figures.confusion_figure(val["confusion"], data.classes, title),
        "val/mistakes": figures.mistakes_figure(images, [p[1] for p in shown], [p[2] for p in shown], [p[3] for p in shown], data.classes, title=title),
    }


def start_world(cfg: Config, accelerator: Accelerator) -> None:
    """Refuse launch traps, say what world we got, set the GPU fast paths, and fail a bad model before any data work."""
    check_world(accelerator)
    say(accelerator, f"flowerdist: {describe_world(accelerator)}")
    set_device_fast_paths(accelerator.device)
    with torch.device("meta"):  # a bad model.name, shortcut or image size fails here (meta: no memory, no init)
        create_model(cfg.model.name, num_classes=2, shortcut=cfg.model.shortcut, image_size=cfg.data.image_size, init_weights=False)


def resolve_run_dir(cfg: Config, accelerator: Accelerator) -> Path:
    """`train.output_dir`, or runs/<name>-<timestamp> chosen once by the main process."""
    if cfg.train.output_dir:
        return Path(cfg.train.output_dir)
    stamp = [datetime.now().strftime("%Y%m%d-%H%M%S")]
    if accelerator.num_processes > 1:
        broadcast_object_list(stamp)
    return Path("runs") / f"{cfg.name}-{stamp[0]}"


def build_data(cfg: Config, accelerator: Accelerator, resume: Resume | None) -> Data:
    """Generate (synthetic), check every image, split (or keep a resumed run's split), and build the loaders."""
    ensure_synthetic_data(cfg, accelerator)
    index = checked_index(cfg.data.root, accelerator)
    test = held_out_index(cfg.data.test_root, index, accelerator) if cfg.data.test_root else None
    if test is not None:
        index, held = without(index, test)
        say(accelerator, f"flowerdist: test set {cfg.data.test_root}: {len(test)} photos, evaluated at the end only; "
                         f"{held} of their copies held out of {cfg.data.root}")
    if resume is not None:  # a resumed run keeps its classes and its split, whatever changed on disk
        if list(index.classes) != resume.meta["classes"]:
            raise FlowerdistError(
                f"cannot resume {resume.checkpoint}: data.root={cfg.data.root} has classes {list(index.classes)} but the run "
                f"was trained on {resume.meta['classes']}; point data.root at its images or start a new run"
            )
        train_idx, val_idx = load_split(resume.checkpoint.parent.parent / "split.json", index)
    else:
        train_idx, val_idx = stratified_split(index.labels, cfg.data.val_fraction, cfg.train.seed)
    rank, world = accelerator.process_index, accelerator.num_processes
    sampler = ShardedSampler(train_idx, cfg.data.batch_size, rank, world, cfg.train.grad_accum_steps, cfg.train.seed)
    sides = progressive_sides(cfg.data.image_size, cfg.data.progressive_from, cfg.data.progressive_until, cfg.train.epochs)
    transform = train_transform(cfg.data.image_size, cfg.data.min_scale, cfg.augment, sides)
    path = data_path(cfg, index, transform, accelerator)
    cache = open_decoded_cache(cfg, index, accelerator) if path.cache else None
    short = cfg.data.cache_size or None
    train_set = FlowerDataset(index, transform, cfg.train.seed, cache=cache, short_side=short)
    val_set = FlowerDataset(index, eval_transform(cfg.eval_image_size), cache=cache, short_side=short)
    loader = dict(batch_size=cfg.data.batch_size, workers=path.workers, device=accelerator.device, prefetch_factor=cfg.data.prefetch_factor)
    test_loader = None
    if test is not None:  # the photos as they are (no cache): evaluated like `flowerdist eval data.root=TEST`
        test_set = FlowerDataset(test, eval_transform(cfg.eval_image_size))
        test_loader = make_loader(test_set, eval_shard(list(range(len(test))), rank, world), **loader)
    return Data(index, train_idx, val_idx, sampler, make_loader(train_set, sampler, **loader),
                make_loader(val_set, eval_shard(val_idx, rank, world), **loader), test_loader)


def ensure_synthetic_data(cfg: Config, accelerator: Accelerator) -> None:
    """Generate the synthetic set on first use (main process; the others wait for it)."""
    root = Path(cfg.data.root)
    if not cfg.data.synthetic or root.exists():
        return
    if not root.name.startswith("synthetic"):  # a mistyped path to real photos must not become a set of drawings
        raise FlowerdistError(
            f"data folder {root} does not exist, and data.synthetic=true generates flowers only into a folder named "
            f"synthetic* (e.g. data/synthetic_flowers): fix data.root, or set data.synthetic=false for your own images"
        )
    with accelerator.main_process_first():
        if accelerator.is_main_process and not root.exists():
            from flowerdist.data.synth import generate

            say(accelerator, f"flowerdist: generating SYNTHETIC flowers (procedural drawings, not photos) in {root} (first use)")
            generate(root, per_class=cfg.data.synthetic_per_class, size=cfg.data.synthetic_size, seed=cfg.train.seed)


def checked_index(root: str, accelerator: Accelerator, classes: tuple[str, ...] | None = None) -> ImageFolderIndex:
    """Scan the folder; the main process decodes every image once, all ranks drop the same bad files."""
    index = scan_folder(root, classes=classes)
    skipped: list[dict[str, str]] = [{}]
    if accelerator.is_main_process:
        report = check_folder(index)
        lines = report.lines()
        say(accelerator, "flowerdist: " + "\n".join(lines if report.skipped or report.converted else lines[:1]))
        skipped = [report.skipped]
    if accelerator.num_processes > 1:
        broadcast_object_list(skipped)
    return usable_index(index, skipped[0])


def held_out_index(root: str, index: ImageFolderIndex, accelerator: Accelerator) -> ImageFolderIndex:
    """data.test_root, checked like data.root; it must hold data.root's classes."""
    path = Path(root)
    if not path.is_dir():
        raise FlowerdistError(f"data.test_root={root} does not exist; point it at a ROOT/<class>/<image> folder of held-out photos, or set data.test_root=\"\"")
    found = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if tuple(found) != index.classes:
        raise FlowerdistError(f"data.test_root={root} has classes {found} but data.root has {list(index.classes)}: a test folder needs the same classes")
    return checked_index(root, accelerator, classes=index.classes)


def data_path(cfg: Config, index: ImageFolderIndex, transform, accelerator: Accelerator):
    """Workers and cache for this run (`flowerdist.data.costs.choose_data_path`), decided by the main process, which
    times the pipeline when `auto` needs it, and told to every rank: the ranks of a node must agree on the cache."""
    decision = [None]
    if accelerator.is_main_process:
        short = cfg.data.cache_size or None
        auto_cache = accelerator.device.type == "cuda" and cfg.data.cache == "auto"
        fits = cache_fits(index, short, cache_root(cfg.data.root, cfg.data.cache_dir)) if auto_cache else True
        costs = lambda: folder_and_cache_costs(index, transform, short, cfg.train.seed)  # noqa: E731 (measured only if needed)
        decision = [choose_data_path(cfg.data.num_workers, cfg.data.cache, accelerator.device, local_processes(accelerator), costs, fits)]
        say(accelerator, f"flowerdist: data: {decision[0].why}")
    if accelerator.num_processes > 1:
        broadcast_object_list(decision)
    return decision[0]


def open_decoded_cache(cfg: Config, index: ImageFolderIndex, accelerator: Accelerator):
    """`data.cache`: the local main process of each node builds the cache once, the other ranks then map it.

    If an `auto` cache cannot be written, training reads the folder instead.
    """
    try:
        with accelerator.local_main_process_first():
            return open_cache(
                index, cfg.data.cache_size or None, cache_root(cfg.data.root, cfg.data.cache_dir),
                build=accelerator.is_local_main_process, workers=0, log=lambda m: say(accelerator, m),
            )
    except FlowerdistError as err:
        if cfg.data.cache != "auto":
            raise
        say(accelerator, f"flowerdist: note: reading images from the folder, no decoded cache ({err})")
        return None


def write_run_files(cfg: Config, accelerator: Accelerator, run_dir: Path, data: Data, resume: Resume | None, info: dict) -> None:
    """config.yaml, class_indices.json and split.json: what `eval`, `predict` and a resume read back; run.json:
    the world each segment of the run trained on (`flowerdist report` reads it).

    A resumed run's config.yaml also lists the changes made on resume, with the step they took effect."""
    if accelerator.is_main_process:
        segments = json.loads((run_dir / "run.json").read_text()).get("segments", []) if resume and (run_dir / "run.json").is_file() else []
        segment = {**info, "from_step": resume.step if resume else 0, "started": datetime.now().isoformat(timespec="seconds")}
        atomic_write_text(run_dir / "run.json", json.dumps({**segment, "segments": [*segments, segment]}, indent=1))
        save_config(cfg, run_dir / "config.yaml", resume.changes if resume else None, resume.step if resume else 0)
        (run_dir / "class_indices.json").write_text(json.dumps({str(i): c for i, c in enumerate(data.classes)}, indent=1))
        save_split(run_dir / "split.json", data.index, data.train_idx, data.val_idx)
    accelerator.wait_for_everyone()


def build_model(cfg: Config, accelerator: Accelerator, num_classes: int, plan: Plan):
    """Model (same initial weights on every rank), optimizer and schedule, prepared by Accelerate."""
    set_seed(cfg.train.seed)
    model = create_model(
        cfg.model.name, num_classes=num_classes, shortcut=cfg.model.shortcut, pretrained=cfg.model.pretrained,
        pretrained_file=cfg.model.pretrained_file, image_size=cfg.data.image_size, init_weights=cfg.model.init_weights,
    )
    if cfg.train.sync_bn and accelerator.num_processes > 1:
        model = convert_sync_batchnorm(model, accelerator.device)
    model = model.to(memory_format=memory_format(cfg.model.channels_last))
    optimizer = build_optimizer(model, cfg.optim, plan.peak_lr, fused=use_fused_optimizer(accelerator.device, accelerator.mixed_precision))
    scheduler = build_scheduler(optimizer, cfg.optim, plan.total_steps, plan.warmup_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if cfg.model.compile:  # around DDP, as Accelerate's dynamo plugin does; weights are read through bare_model
        model = torch.compile(model)
    return model, optimizer, scheduler


def run_info(accelerator: Accelerator, plan: Plan, run_dir: Path) -> dict[str, Any]:
    """The world this run got: in run.json and in W&B's config beside the flowerdist config."""
    return {
        "world_size": accelerator.num_processes,
        "num_machines": num_machines(accelerator),
        "global_batch": plan.global_batch,
        "peak_lr": plan.peak_lr,
        "mixed_precision": accelerator.mixed_precision,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "run_dir": str(run_dir),
        **describe_machine(accelerator.device.type),
    }


def stop_if_diverged(loss: float, step: int, run_dir: Path) -> None:
    """A NaN or infinite loss ends the run before it can overwrite a good checkpoint."""
    if not math.isfinite(loss):
        raise FlowerdistError(
            f"training loss became {loss} by step {step}; lower optim.lr or set optim.clip_grad_norm "
            f"(the last good checkpoint is kept in {run_dir / 'checkpoints'})"
        )


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop the events of a JSON-lines log (metrics, samples) after the checkpoint we resume from."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))
