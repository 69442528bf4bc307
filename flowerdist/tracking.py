"""Where metrics go: metrics.jsonl, the console, and W&B through Accelerate's tracker.

All three share one call, `RunLogger.log(metrics, step)`, made on every rank; only the main
process writes. W&B is imported only when it is used.
"""

from __future__ import annotations

import json
import netrc
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from flowerdist.config import Config
from flowerdist.distributed import say

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
    return setting


class RunLogger:
    """Appends every event to metrics.jsonl and mirrors it to W&B (main process only)."""

    def __init__(self, accelerator: Accelerator, run_dir: Path, wandb_mode: str | None):
        self.accelerator = accelerator
        self.path = run_dir / "metrics.jsonl"
        self.wandb_mode = wandb_mode

    def start(self, cfg: Config, run_name: str, extra_config: dict[str, Any], run_id: str | None = None) -> None:
        if self.wandb_mode is None:
            return
        if self.wandb_mode == "offline" and cfg.log.wandb == "auto":
            say(self.accelerator, "flowerdist: no W&B API key configured: logging W&B offline (upload later with `wandb sync`)")
        init = {
            "mode": self.wandb_mode,
            "dir": str(self.path.parent),
            "name": run_name,
            "id": run_id,
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

    def replay(self, up_to_step: int) -> None:
        """After a resume, re-send to W&B the logged events up to the checkpoint's step.

        A killed process can lose W&B's unflushed buffer; metrics.jsonl is the record. Steps
        W&B already has (`run.step` on a resumed online run) are not sent again.
        """
        if self.wandb_mode is None or not self.accelerator.is_main_process or not self.path.is_file():
            return
        first = getattr(self.accelerator.get_tracker("wandb", unwrap=True), "step", 0) or 0
        for line in self.path.read_text().splitlines():
            event = json.loads(line)
            if first <= event["step"] <= up_to_step:
                self.accelerator.log(_scalars(event), step=event["step"])

    @property
    def wandb_run_id(self) -> str | None:
        if self.wandb_mode is None or not self.accelerator.is_main_process:
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

    def close(self) -> None:
        if self.wandb_mode is not None:
            self.accelerator.end_training()


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}


def confusion_table(matrix: list[list[int]], classes: tuple[str, ...]):
    """A W&B table of (actual, predicted, count) rows."""
    import wandb

    rows = [[classes[a], classes[p], matrix[a][p]] for a in range(len(classes)) for p in range(len(classes))]
    return wandb.Table(columns=["actual", "predicted", "count"], data=rows)
