"""Everything about processes, devices and precision lives here: the Accelerator and the world it got.

The training loop only uses `accumulate`, `sync_gradients`, `backward`, `reduce` and `print`;
models never know they are distributed.
"""

from __future__ import annotations

import os
import socket

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from flowerdist.config import Config
from flowerdist.errors import FlowerdistError


def build_accelerator(cfg: Config, log_with: str | None) -> Accelerator:
    if cfg.train.mixed_precision == "fp16" and (cfg.train.cpu or not torch.cuda.is_available()):
        raise FlowerdistError(
            "train.mixed_precision=fp16 needs a GPU (its gradient scaler is a CUDA path); "
            "use train.mixed_precision=no (fastest on CPU) or bf16"
        )
    return Accelerator(
        cpu=cfg.train.cpu,
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        log_with=log_with,
        # We step the scheduler once per optimizer step ourselves; Accelerate's default steps a
        # prepared scheduler num_processes times per step (accelerate #2926).
        step_scheduler_with_optimizer=False,
    )


def num_machines(accelerator: Accelerator) -> int:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    return max(1, accelerator.num_processes // max(1, local))


def describe_world(accelerator: Accelerator) -> str:
    """One line, built from what the processes report (all ranks must call it)."""
    me = f"{accelerator.process_index}@{socket.gethostname()}:{accelerator.local_process_index}"
    layout = gather_object([me]) if accelerator.num_processes > 1 else [me]
    state = accelerator.state
    backend = state.backend or "none"
    return (
        f"world_size={accelerator.num_processes} backend={backend} device={accelerator.device.type} "
        f"num_machines={num_machines(accelerator)} mixed_precision={accelerator.mixed_precision} "
        f"threads={torch.get_num_threads()} ranks=[{', '.join(layout)}]"
    )
