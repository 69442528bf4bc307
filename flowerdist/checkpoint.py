"""Checkpoints on disk: atomic, safe to load, and enough to resume or to predict.

Layout of a run directory's `checkpoints/`:

    step-00000120/            a training checkpoint: weights + optimizer, scheduler, counters, RNG
      model.safetensors       weights (safetensors: loading never unpickles code)
      meta.json               classes, resolved config, epoch, step, validation accuracy
      train_state.pt          optimizer / scheduler / scaler / counters (torch.load weights_only=True)
      rng-rank<R>.pt          every rank's RNG states
    best-step-00000090/       weights + meta.json of the best validation accuracy so far
    last -> step-00000120     symlinks, replaced atomically
    best -> best-step-00000090

Every checkpoint is written under a `.tmp-*` name and renamed only when complete, so a kill
during a save leaves the previous checkpoint (and the symlinks) intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from flowerdist.errors import FlowerdistError

WEIGHTS = "model.safetensors"
META = "meta.json"
TRAIN_STATE = "train_state.pt"


def unwrapped_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Plain, contiguous CPU tensors (channels_last weights are not contiguous; safetensors needs them so)."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the state dict's names and bytes (equal digests mean bit-identical weights)."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in unwrapped_state_dict(model).items():
        h.update(name.encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_symlink(link: Path, target_name: str) -> None:
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target_name)
    os.replace(tmp, link)


def write_checkpoint(
    root: Path,
    name: str,
    state_dict: dict[str, torch.Tensor],
    meta: dict[str, Any],
    train_state: dict[str, Any] | None = None,
    rng_by_rank: dict[int, dict[str, Any]] | None = None,
    link: str | None = None,
) -> Path:
    """Write `root/name` atomically and point `root/link` at it. Single-process helper."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(state_dict, str(tmp / WEIGHTS))
    (tmp / META).write_text(json.dumps(meta, indent=1))
    if train_state is not None:
        torch.save(train_state, tmp / TRAIN_STATE)
    for rank, state in (rng_by_rank or {}).items():
        torch.save(state, tmp / f"rng-rank{rank}.pt")
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if link:
        previous = (root / link).resolve() if (root / link).is_symlink() else None
        _atomic_symlink(root / link, name)
        if previous is not None and previous != final.resolve() and previous.name.startswith("best-"):
            shutil.rmtree(previous, ignore_errors=True)
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (its best checkpoint), a checkpoint directory, or its model.safetensors."""
    path = Path(path)
    if path.is_file() and path.name == WEIGHTS:
        path = path.parent
    if (path / "checkpoints").is_dir():
        for link in ("best", "last"):
            if (path / "checkpoints" / link / WEIGHTS).is_file():
                return (path / "checkpoints" / link).resolve()
        raise FlowerdistError(f"run directory {path} has no finished checkpoint yet (checkpoints/best or checkpoints/last)")
    if (path / WEIGHTS).is_file() and (path / META).is_file():
        return path
    if not path.exists():
        raise FlowerdistError(f"checkpoint {path} does not exist; pass --checkpoint RUN_DIR or RUN_DIR/checkpoints/<name>")
    raise FlowerdistError(
        f"{path} is not a flowerdist checkpoint (expected {WEIGHTS} and {META}); pass --checkpoint RUN_DIR"
    )


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / META).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FlowerdistError(f"checkpoint metadata {ckpt / META} is unreadable ({err}); the checkpoint is corrupt") from None


def read_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(ckpt / WEIGHTS))
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise FlowerdistError(f"checkpoint weights {ckpt / WEIGHTS} are unreadable ({err}); the file is corrupt") from None


def load_train_state(ckpt: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Optimizer/scheduler/counters and this rank's RNG, loaded without unpickling code."""
    state = torch.load(ckpt / TRAIN_STATE, map_location="cpu", weights_only=True)
    rng_file = ckpt / f"rng-rank{rank}.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.exists() else None
    return state, rng


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished training checkpoints, oldest first (a `.tmp-*` left by a kill is never listed)."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / TRAIN_STATE).is_file() and (p / WEIGHTS).is_file() and (p / META).is_file()]
    return sorted(done, key=lambda p: p.name)


def find_resume_checkpoint(setting: str, run_dir: Path) -> Path | None:
    """`train.resume`: "" (start fresh), "auto" (newest complete checkpoint of the run, if any) or a path."""
    if not setting:
        return None
    if setting == "auto":
        found = complete_checkpoints(run_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(setting)
    if (path / "checkpoints").is_dir():
        found = complete_checkpoints(path / "checkpoints")
        if not found:
            raise FlowerdistError(f"train.resume={setting}: the run has no complete training checkpoint")
        return found[-1]
    if not (path / TRAIN_STATE).is_file():
        raise FlowerdistError(f"train.resume={setting} is not a training checkpoint (no {TRAIN_STATE}); pass a run directory or checkpoints/step-*")
    return path


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` training checkpoints (the one `last` points at is always newest)."""
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
