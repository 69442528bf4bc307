"""Optimizers, the lr-vs-global-batch rule, and the warm-up + cosine schedule in optimizer steps."""

from __future__ import annotations

import math

import torch

from flowerdist.config import OptimConfig


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """Peak lr for the actual global batch; `cfg.lr` is defined for `cfg.reference_batch` images."""
    ratio = global_batch / cfg.reference_batch
    factor = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[cfg.lr_scale]
    return cfg.lr * factor


def warmup_steps(cfg: OptimConfig, steps_per_epoch: int) -> int:
    """The warm-up in optimizer steps: `warmup_steps` as given, or `warmup_epochs` of this run's epochs (an epoch
    has fewer steps the more GPUs share it, so a warm-up in epochs means the same on any layout)."""
    return cfg.warmup_steps or round(cfg.warmup_epochs * steps_per_epoch)


def lr_factor(step: int, total_steps: int, warmup: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr used for optimizer step `step` (0-based), after `warmup` warm-up steps."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, lr: float, fused: bool = False) -> torch.optim.Optimizer:
    """timm's weight-decay groups: none on biases, norm weights (1-D) and what `model.no_weight_decay()` names.
    `fused`: torch's fused kernel (`flowerdist.distributed.use_fused_optimizer` decides: CUDA, not under fp16)."""
    from timm.optim import param_groups_weight_decay  # timm is slow to import; only training needs it

    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
    fused = fused or None  # None: torch's default kernel (foreach)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, fused=fused)
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step by the loop, never once per process (see `step_scheduler_with_optimizer` in distributed.py)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup, cfg))
