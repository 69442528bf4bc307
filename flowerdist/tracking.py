"""Where metrics go: metrics.jsonl, the console, and W&B through Accelerate's tracker.

All three share one call, `RunLogger.log(metrics, step)`, made on every rank; only the main
process writes. W&B is imported only when it is used. `StepLog` times the steps and keeps the
running loss on the device; `SampleRecorder` writes which samples each rank trained on.
"""

from __future__ import annotations

import json
import netrc
import os
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from flowerdist.config import Config
from flowerdist.distributed import say
from flowerdist.errors import FlowerdistError

WANDB_HOST = "api.wandb.ai"


def wandb_api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(WANDB_HOST) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(setting: str) -> str | None:
    """Map `log.wandb` to a wandb mode; None means no tracker at all."""
    if setting == "disabled":
        return None
    if setting == "auto":
        return "online" if wandb_api_key_configured() else "offline"
    if setting == "online" and not wandb_api_key_configured():
        raise FlowerdistError(
            "log.wandb=online needs a W&B API key (set WANDB_API_KEY or run `wandb login`); "
            "or use log.wandb=offline (upload later with `wandb sync`) or log.wandb=auto"
        )
    return setting


class RunLogger:
    """Appends every event to metrics.jsonl and mirrors it to W&B (main process only).

    A context manager: leaving it finishes the W&B run (on error too) but leaves the process
    group alone; `flowerdist.train.train` ends the Accelerate state. Its state (the W&B run id)
    goes into checkpoints, so a resumed run continues the same W&B run.
    """

    def __init__(self, accelerator: Accelerator, run_dir: Path, wandb_mode: str | None):
        self.accelerator = accelerator
        self.path = run_dir / "metrics.jsonl"
        self.wandb_mode = wandb_mode
        self.resume_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"wandb_run_id": self.wandb_run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resume_id = state.get("wandb_run_id")

    def start(self, cfg: Config, extra_config: dict[str, Any], replay_to: int | None = None) -> RunLogger:
        """Open the W&B run (a new one, or the checkpoint's); after a resume, re-send history up to `replay_to`."""
        if self.wandb_mode is None:
            return self
        if self.wandb_mode == "offline" and cfg.log.wandb == "auto":
            say(self.accelerator, "flowerdist: no W&B API key configured: logging W&B offline (upload later with `wandb sync`)")
        init = {
            "mode": self.wandb_mode,
            "dir": str(self.path.parent),
            "name": self.path.parent.name,
            "id": self.resume_id,
            "resume": "allow",
            "settings": {"silent": True},  # our own lines say where the run is; W&B's banner is noise
        }
        group = os.environ.get("SLURM_JOB_ID")
        if group:
            init["group"] = f"slurm-{group}"
        self.accelerator.init_trackers(cfg.log.project, config={**cfg.flat(), **extra_config}, init_kwargs={"wandb": init})
        if self.accelerator.is_main_process:
            run = self.accelerator.get_tracker("wandb", unwrap=True)
            say(self.accelerator, f"flowerdist: W&B run {run.id} ({self.wandb_mode}) in {run.dir}")
        if replay_to is not None:
            self._replay(replay_to)
        return self

    def _replay(self, up_to_step: int) -> None:
        """Re-send to W&B the logged events up to the checkpoint's step.

        A killed process can lose W&B's unflushed buffer; metrics.jsonl is the record. Steps
        W&B already has (`run.step` on a resumed online run) are not sent again.
        """
        if not self.accelerator.is_main_process or not self.path.is_file():
            return
        first = getattr(self.accelerator.get_tracker("wandb", unwrap=True), "step", 0) or 0
        for line in self.path.read_text().splitlines():
            event = json.loads(line)
            if first <= event["step"] <= up_to_step:
                self.accelerator.log(_scalars(event), step=event["step"])

    @property
    def wandb_run_id(self) -> str | None:
        if self.wandb_mode is None or not self.accelerator.is_main_process or not self.accelerator.trackers:
            return None
        return self.accelerator.get_tracker("wandb", unwrap=True).id

    def log(self, metrics: dict[str, Any], step: int, tables: dict[str, Any] | None = None) -> None:
        """`metrics` must be JSON values; `tables` are W&B-only objects (built lazily)."""
        if not self.accelerator.is_main_process:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb_mode is not None:
            self.accelerator.log({**_scalars(metrics), **(tables or {})}, step=step)

    def log_figures(self, figures: dict[str, Any], step: int) -> None:
        """matplotlib figures as W&B images (offline runs too); main process, W&B only."""
        if self.wandb_mode is None or not self.accelerator.is_main_process:
            return
        import tempfile

        import wandb

        from flowerdist.figures import save

        # From PNG files: W&B copies a file into the run as it logs it; from a PIL image it would encode the
        # PNG once more (0.25 s for the mistakes grid).
        with tempfile.TemporaryDirectory(prefix="flowerdist-figures-") as tmp:
            images = {}
            for name, fig in figures.items():
                path = Path(tmp) / f"{name.replace('/', '-')}.png"
                save(fig, path, dpi=90)
                images[name] = wandb.Image(str(path))
            self.accelerator.log(images, step=step)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Finish the trackers (idempotent); the process group stays for `train()` to end."""
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers.clear()


class StepLog:
    """Keeps the running loss on the device and syncs it only every `every` optimizer steps.

    Windows are back to back: each ends where the next begins, so logging, checkpoint and metric
    costs inside an epoch count against images/s. Only the epoch-end evaluation between epochs is
    left out (`new_epoch`). `data_wait` is the share of the window the loop spent waiting for the
    DataLoader: near 0 when the model is the bottleneck, near 1 when the data path is.
    Its state (this rank's loss sums) goes into checkpoints, so resumed runs log the same numbers.
    """

    def __init__(self, every: int, device: torch.device, images_per_step: int):
        self.every = every
        self.images_per_step = images_per_step
        self.loss_sum = torch.zeros((), device=device)
        self.micro_steps = 0
        self.epoch_loss_sum = torch.zeros((), device=device)
        self.epoch_micro_steps = 0
        self.new_epoch()

    def new_epoch(self) -> None:
        """Start a timing window (after the evaluation between epochs)."""
        self.window_start = time.perf_counter()
        self.window_steps = 0
        self.data_wait = 0.0

    def timed(self, loader):
        """Iterate `loader`, counting the time spent waiting for each batch as data wait."""
        batches = iter(loader)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            self.data_wait += time.perf_counter() - start
            if batch is None:
                return
            yield batch

    def add(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self.loss_sum += loss
        self.epoch_loss_sum += loss
        self.micro_steps += 1
        self.epoch_micro_steps += 1

    def tick(self, step: int, last: bool) -> bool:
        """Count one optimizer step in the window; True when this step logs."""
        self.window_steps += 1
        return step % self.every == 0 or last

    @staticmethod
    def _mean(accelerator: Accelerator, loss_sum: torch.Tensor, count: int) -> float:
        """Sum over ranks of the sums, divided by the sum of the counts (ranks may hold different counts after a
        resume on another number of processes)."""
        total = accelerator.reduce(torch.stack([loss_sum, loss_sum.new_tensor(float(count))]), "sum")
        return (total[0] / total[1].clamp(min=1)).item()

    def flush(self, accelerator: Accelerator) -> tuple[float, float, float]:
        """Mean loss over the window and all ranks, global images/s and the data-wait share (one host sync)."""
        loss = self._mean(accelerator, self.loss_sum, self.micro_steps)
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

    def epoch_loss(self, accelerator: Accelerator) -> float:
        """Mean training loss of the epoch over all ranks; resets the epoch sums."""
        loss = self._mean(accelerator, self.epoch_loss_sum, self.epoch_micro_steps)
        self.epoch_loss_sum.zero_()
        self.epoch_micro_steps = 0
        return loss

    def state_dict(self) -> dict[str, Any]:
        """This rank's un-logged sums (a host sync, done only when saving)."""
        return {"window_loss": float(self.loss_sum), "window_micro_steps": self.micro_steps,
                "epoch_loss": float(self.epoch_loss_sum), "epoch_micro_steps": self.epoch_micro_steps}

    @staticmethod
    def fold(states: list[dict[str, Any]]) -> dict[str, Any]:
        """Several ranks' sums as one (resuming on another number of processes); [] gives zeros."""
        return {key: sum(s[key] for s in states) for key in ("window_loss", "window_micro_steps", "epoch_loss", "epoch_micro_steps")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sum.fill_(state["window_loss"])
        self.micro_steps = state["window_micro_steps"]
        self.epoch_loss_sum.fill_(state["epoch_loss"])
        self.epoch_micro_steps = state["epoch_micro_steps"]


class SampleRecorder:
    """`train.record_samples`: the dataset indices this rank trained on, per optimizer step, to
    samples/rank<R>.jsonl (audits sharding and resume). Off, it does nothing."""

    def __init__(self, run_dir: Path, rank: int, enabled: bool):
        self.file = None
        if enabled:
            (run_dir / "samples").mkdir(exist_ok=True)
            self.file = open(run_dir / "samples" / f"rank{rank}.jsonl", "a")

    def write(self, epoch: int, step: int, indices: torch.Tensor) -> None:
        if self.file is not None:  # flushed: a kill must not lose steps a checkpoint already covers
            self.file.write(json.dumps({"epoch": epoch, "step": step, "indices": indices.tolist()}) + "\n")
            self.file.flush()

    def __enter__(self) -> SampleRecorder:
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}


def confusion_table(matrix: list[list[int]], classes: tuple[str, ...]):
    """A W&B table of (actual, predicted, count) rows."""
    import wandb

    rows = [[classes[a], classes[p], matrix[a][p]] for a in range(len(classes)) for p in range(len(classes))]
    return wandb.Table(columns=["actual", "predicted", "count"], data=rows)
