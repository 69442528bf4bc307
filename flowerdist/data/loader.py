"""The one DataLoader builder, for training, evaluation, prediction and the benchmarks."""

from __future__ import annotations

import torch


def make_loader(dataset, sampler, batch_size: int, workers: int, device: torch.device, prefetch_factor: int = 4, **kwargs) -> torch.utils.data.DataLoader:
    """Workers stay alive across epochs and prefetch; pinned host memory makes the uint8 copies to a GPU asynchronous.

    `sampler` is a Sampler or a list of indices (kept in that order); `kwargs` pass on (e.g. the
    benchmarks' `shuffle=True, drop_last=True`).
    """
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=prefetch_factor if workers > 0 else None,
        **kwargs,
    )
