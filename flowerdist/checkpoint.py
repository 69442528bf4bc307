"""Checkpoints on disk: atomic, safe to load, enough to resume exactly or to predict.

Layout of a run directory's `checkpoints/`:

    step-00000120/            a training checkpoint
      model.safetensors       weights (safetensors: loading never unpickles code)
      meta.json               classes, resolved config, epoch, step, validation accuracy
      train_state.pt          optimizer, scheduler, scaler, counters, every rank's local state
                              (torch.load weights_only=True)
      rng-rank<R>.pt          every rank's RNG states
    best-step-00000090/       weights + meta.json of the best validation accuracy so far
    last -> step-00000120     symlinks, replaced atomically
    best -> best-step-00000090

Every checkpoint is written under a `.tmp-*` name and renamed only when complete, so a kill
during a save leaves the previous checkpoint (and the symlinks) intact.

`Checkpointer` owns all of it: when to save (`should_save`), what goes in (the objects with
`state_dict()`/`load_state_dict()` it was given), the write, pruning, the links and the restore.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file

from flowerdist.distributed import bare_model
from flowerdist.errors import FlowerdistError
from flowerdist.files import atomic_dir, atomic_symlink

WEIGHTS = "model.safetensors"
META = "meta.json"
TRAIN_STATE = "train_state.pt"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def unwrapped_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Plain, contiguous CPU tensors (channels_last weights are not contiguous; safetensors needs them so)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in bare_model(model).state_dict().items()}


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the state dict's names and bytes (equal digests mean bit-identical weights)."""
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
        # A run resumed where fewer GPUs are visible (CUDA_VISIBLE_DEVICES, a smaller node) restores the generators
        # that exist; torch's set_rng_state_all would raise IndexError. Nothing is lost: flowerdist draws its
        # randomness from the CPU generator (augmentation) and (seed, step) (MixUp/CutMix).
        visible = torch.cuda.device_count()
        for device, generator in enumerate(state["cuda"][:visible]):
            torch.cuda.set_rng_state(generator, device)


def write_checkpoint(
    root: Path,
    name: str,
    state_dict: dict[str, torch.Tensor],
    meta: dict[str, Any],
    train_state: dict[str, Any] | None = None,
    rng_by_rank: dict[int, dict[str, Any]] | None = None,
    link: str | None = None,
) -> Path:
    """Write `root/name` atomically and point `root/link` at it (a previous `best-*` it pointed at is removed)."""
    final = root / name
    with atomic_dir(final, replace=True) as tmp:
        save_file(state_dict, str(tmp / WEIGHTS))
        (tmp / META).write_text(json.dumps(meta, indent=1))
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
        for rank, state in (rng_by_rank or {}).items():
            torch.save(state, tmp / f"rng-rank{rank}.pt")
    if link:
        previous = (root / link).resolve() if (root / link).is_symlink() else None
        atomic_symlink(root / link, name)
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
    """meta.json, its types checked: 'classes' a list of at least two names, 'config' a mapping."""
    try:
        meta = json.loads((ckpt / META).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FlowerdistError(f"checkpoint metadata {ckpt / META} is unreadable ({err}); the checkpoint is corrupt") from None
    classes = meta.get("classes") if isinstance(meta, dict) else None
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes) and isinstance(meta.get("config"), dict)):
        raise FlowerdistError(
            f"checkpoint metadata {ckpt / META} needs 'classes' (a list of at least two names) and 'config' (a mapping); "
            f"the checkpoint is corrupt"
        )
    return meta


def read_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(ckpt / WEIGHTS))
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise FlowerdistError(f"checkpoint weights {ckpt / WEIGHTS} are unreadable ({err}); the file is corrupt") from None


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


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if torch.is_tensor(t) and t.is_floating_point())


def _optimizer_tensors(optimizer: torch.optim.Optimizer):
    for state in optimizer.state.values():
        yield from state.values()


class Checkpointer:
    """Saves and restores a run: weights, the replicated state of `states`, every rank's `local` state and RNG.

    All ranks call `save` and `resume` (they gather and wait); only the main process writes.
    `states` hold the same values on every rank (optimizer, scheduler, counters); `local` hold
    each rank's own (its share of the running loss), saved per rank.
    """

    def __init__(
        self,
        run_dir: Path,
        accelerator,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        every: int,
        keep_last: int,
        meta: dict[str, Any],
        states: dict[str, Stateful],
        local: dict[str, Stateful],
        layout: dict[str, int] | None = None,
    ):
        self.root = run_dir / "checkpoints"
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.every = every
        self.keep_last = keep_last
        self.meta = meta
        self.states = {"optimizer": optimizer, **states}
        self.local = local
        self.layout = layout or {}

    def should_save(self, step: int) -> bool:
        """Mid-epoch checkpoints every `train.checkpoint_every` optimizer steps (epoch ends always save)."""
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, epoch: int, *, best: bool = False, accuracy: float | None = None, best_model: torch.nn.Module | None = None) -> None:
        """Checkpoint `step-<step>`, and `best-step-<step>` with the weights of `best_model` (default: the model)
        when `best`; refuses non-finite weights or optimizer state."""
        accelerator = self.accelerator
        model = bare_model(self.model)
        # every rank checks its own (replicated) weights, so every rank stops together
        if not (_all_finite(model.parameters()) and _all_finite(_optimizer_tensors(self.optimizer))):
            raise FlowerdistError(
                f"training diverged: the weights became non-finite by step {step}; lower optim.lr or set "
                f"optim.clip_grad_norm (the last good checkpoint is kept in {self.root})"
            )
        mine = [{"rng": rng_state(), **{name: obj.state_dict() for name, obj in self.local.items()}}]
        per_rank = gather_object(mine) if accelerator.num_processes > 1 else mine
        if accelerator.is_main_process:
            weights = unwrapped_state_dict(model)
            meta = {**self.meta, "epoch": epoch, "step": step, "val_accuracy": accuracy}
            train_state = {name: obj.state_dict() for name, obj in self.states.items()}
            train_state["layout"] = self.layout  # the position is global samples (TrainState): any layout can resume it
            train_state["ranks"] = [{k: v for k, v in r.items() if k != "rng"} for r in per_rank]
            rngs = {rank: r["rng"] for rank, r in enumerate(per_rank)}
            write_checkpoint(self.root, f"step-{step:08d}", weights, meta, train_state, rngs, link="last")
            prune(self.root, self.keep_last)
            if best:
                best_weights = weights if best_model is None else unwrapped_state_dict(best_model)
                write_checkpoint(self.root, f"best-step-{step:08d}", best_weights, meta, link="best")
        accelerator.wait_for_everyone()

    def clear_partial(self) -> None:
        """Remove half-written checkpoints (`.tmp-*`) that a kill left behind (main process; the directory is this run's)."""
        if self.accelerator.is_main_process:
            for partial in self.root.glob(".tmp-*"):
                shutil.rmtree(partial, ignore_errors=True)

    def restore(self, resume, seed: int) -> None:
        """Load a `flowerdist.runs.Resume` into the model and the state objects, on any number of processes.

        Replicated states load as saved. Each rank's local state loads as saved on the same layout;
        on another one rank 0 takes the sum of all ranks' and the others start from zero (`fold`).
        RNG: the same layout restores each rank's streams; another one reseeds them from
        (seed, step, rank), since there is no old rank to take them from.
        """
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        self.clear_partial()
        bare_model(self.model).load_state_dict(read_weights(resume.checkpoint))
        for name, obj in self.states.items():
            if name in resume.train_state:
                obj.load_state_dict(resume.train_state[name])
            elif self.accelerator.is_main_process:  # e.g. the gradient scaler of a bf16 run resumed as fp16
                print(f"flowerdist: note: {resume.checkpoint} has no {name} state (the run trained without one); "
                      f"starting a fresh {name}", flush=True)
        ranks = resume.train_state["ranks"]
        for name, obj in self.local.items():
            saved = [r[name] for r in ranks]
            obj.load_state_dict(saved[rank] if len(ranks) == world else obj.fold(saved if rank == 0 else []))
        if len(ranks) == world and resume.rng is not None:
            set_rng_state(resume.rng)
        else:
            step = resume.train_state["state"]["global_step"]
            random.seed(f"{seed}-{step}-{rank}")
            np.random.seed([seed, step, rank])
            torch.manual_seed((seed * 1_000_003 + step) * 1_009 + rank)
