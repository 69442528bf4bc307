"""Run directories: each holds one run, and a resume continues that run, not a changed one.

Everything here happens before the run writes anything:

- a fresh run refuses a directory that already holds a run (`train.overwrite=true` moves the old
  run aside first, it is never deleted);
- `train.resume` is resolved and its checkpoint read (a missing path or an unreadable file is one
  line, not a traceback);
- the new config is compared with the checkpoint's. What would make another model or other data
  is refused, naming the key; what changes the optimisation needs `train.resume_override=true`;
  the rest (epochs, logging, workers, ...) may change. Every change is returned to be recorded.
- on another number of processes the global batch is kept: `train.grad_accum_steps` is derived
  from it, or the layout is refused with the per-device batch sizes that would work.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list

from flowerdist.checkpoint import META, TRAIN_STATE, find_resume_checkpoint, read_meta
from flowerdist.config import Config, apply_overrides, config_from_dict
from flowerdist.distributed import precision_here
from flowerdist.errors import FlowerdistError

#: Files that mark a directory as holding a run.
RUN_FILES = ("config.yaml", "metrics.jsonl", "split.json", "checkpoints")

#: Keys that may change on resume (recorded when they do); `train.resume` and friends are not recorded.
FREE = {
    "name", "train.epochs", "train.max_steps", "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_last",
    "train.dist_timeout_s", "train.record_samples", "train.cpu", "data.root", "data.num_workers",
    "data.prefetch_factor", "data.cache", "data.cache_dir", "data.synthetic",
    "data.synthetic_per_class", "data.synthetic_size", "data.eval_image_size", "model.compile", "model.channels_last",
    "eval.flip", "eval.precision",
}
UNRECORDED = {"train.resume", "train.output_dir", "train.overwrite", "train.resume_override"}
#: Keys (or sections, ending in ".") that change the optimisation: refused unless train.resume_override=true.
OPTIMISATION = (
    "optim.", "augment.", "data.batch_size", "data.min_scale", "data.progressive_from", "data.progressive_until", "data.cache_size",
    "train.grad_accum_steps", "train.label_smoothing",
    "train.mixed_precision", "train.ema_decay", "train.ema_warmup", "train.best_of", "train.sync_bn",
)


@dataclass
class Resume:
    """The checkpoint a run continues from, read before anything is written."""

    checkpoint: Path
    meta: dict[str, Any]
    train_state: dict[str, Any]
    rng: dict[str, Any] | None
    saved_world: int
    changes: dict[str, list] = field(default_factory=dict)  # key -> [old, new]

    @property
    def step(self) -> int:
        return int(self.train_state["state"]["global_step"])


def holds_run(run_dir: Path) -> list[str]:
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def claim_run_dir(cfg: Config, run_dir: Path, accelerator) -> Resume | None:
    """Check that `run_dir` may take this run; read the checkpoint to resume from (None: a fresh run).

    The main process alone looks at the directory, decides, moves an old run aside when it must, and tells
    the other ranks (a rank that looked after the move would see an empty directory and take another path)."""
    decision: list = [None]
    if accelerator.is_main_process:
        try:
            decision = [("resume", _claim(cfg, run_dir))]
        except FlowerdistError as err:
            decision = [("error", str(err))]
    if accelerator.num_processes > 1:
        broadcast_object_list(decision)
    kind, value = decision[0]
    if kind == "error":
        raise FlowerdistError(value)
    return None if value is None else read_resume(Path(value), accelerator.process_index)


def _claim(cfg: Config, run_dir: Path) -> str | None:
    """The main process's decision: the checkpoint to resume (as a string), or None for a fresh run."""
    ckpt = find_resume_checkpoint(cfg.train.resume, run_dir)  # a train.resume path that is not there fails here
    found = holds_run(run_dir)
    ensure_writable(run_dir)
    if ckpt is None:
        if found and cfg.train.resume != "auto" and not cfg.train.overwrite:
            raise FlowerdistError(
                f"{run_dir} already holds a run ({', '.join(found)}); continue it with train.resume=auto, "
                f"or train into a new train.output_dir (train.overwrite=true moves the old run aside)"
            )
        if found:  # overwrite, or resume=auto on a run that died before its first checkpoint: keep it, aside
            aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            run_dir.rename(aside)
            ensure_writable(run_dir)
            print(f"flowerdist: moved the previous run in {run_dir} ({', '.join(found)}, no checkpoint to resume) to {aside}", flush=True)
        return None
    if found and not ckpt.resolve().is_relative_to(run_dir.resolve()):
        raise FlowerdistError(
            f"train.resume={cfg.train.resume} continues another run, but {run_dir} already holds a run ({', '.join(found)}); "
            f"set train.output_dir to a new directory"
        )
    return str(ckpt)


def ensure_writable(run_dir: Path) -> None:
    """Create the run directory now, so a bad `train.output_dir` fails in one line before any work."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{id(run_dir)}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise FlowerdistError(
            f"train.output_dir={run_dir} cannot be written ({err.strerror or err}); choose a directory you can write to"
        ) from None


def read_resume(ckpt: Path, rank: int) -> Resume:
    """Meta, training state and this rank's RNG of `ckpt`, each failure one line that never suggests unsafe loading."""
    meta = read_meta(ckpt)
    loaded = {}
    for name in (TRAIN_STATE, f"rng-rank{rank}.pt"):
        path = ckpt / name
        if name != TRAIN_STATE and not path.exists():
            continue
        try:
            loaded[name] = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated, empty, or objects weights_only refuses: the file is not ours
            kind = "refused: it holds objects other than tensors" if "Weights only load failed" in str(err) else type(err).__name__
            raise FlowerdistError(  # torch's own message advises unsafe loading; never pass that on
                f"{path} cannot be read safely ({kind}); the checkpoint is damaged: resume from an older one "
                f"(train.resume={ckpt.parent}/step-...) or start a new run"
            ) from None
    state = loaded[TRAIN_STATE]
    if not isinstance(state, dict) or "state" not in state or "ranks" not in state:
        raise FlowerdistError(f"{ckpt / TRAIN_STATE} is not a training state of this flowerdist version; start a new run")
    return Resume(ckpt, meta, state, loaded.get(f"rng-rank{rank}.pt"), saved_world=len(state["ranks"]))


def resolve_precision(cfg: Config) -> tuple[Config, str | None]:
    """`cfg` with train.mixed_precision=auto replaced by the precision this run trains in, which config.yaml and the
    checkpoints then record: a resumed run's own (a resume continues the run as it was, on any machine), else the
    fastest this device computes natively (`flowerdist.distributed.auto_precision`); and a note to print when a
    resume keeps a precision that auto would not pick here. Read before the process group exists: files only."""
    if cfg.train.mixed_precision != "auto":
        return cfg, None
    here = precision_here(cfg)
    resumes = cfg.train.resume not in ("", "auto") or (cfg.train.resume == "auto" and cfg.train.output_dir)  # else a fresh run
    ckpt = find_resume_checkpoint(cfg.train.resume, Path(cfg.train.output_dir or ".")) if resumes else None
    saved = read_meta(ckpt)["config"].get("train", {}).get("mixed_precision") if ckpt is not None else None
    if saved not in ("no", "fp16", "bf16") or saved == here:
        return apply_overrides(cfg, [f"train.mixed_precision={here}"]), None
    return apply_overrides(cfg, [f"train.mixed_precision={saved}"]), (
        f"flowerdist: note: resuming in {saved}, the run's precision; train.mixed_precision=auto would pick {here} on this "
        f"device (train.mixed_precision={here} train.resume_override=true switches to it, recorded as a change)")


def reconcile(cfg: Config, resume: Resume, world: int, say=print) -> Config:
    """The config to resume with: refuse changes that make another run, derive the accumulation on another
    layout, and note every change in `resume.changes`."""
    saved = config_from_dict(resume.meta["config"], where=str(resume.checkpoint / META))
    global_batch = saved.data.batch_size * resume.saved_world * saved.train.grad_accum_steps
    cfg = keep_global_batch(cfg, global_batch, resume, world, say)
    same_global_batch = cfg.data.batch_size * world * cfg.train.grad_accum_steps == global_batch
    layout = {"data.batch_size", "train.grad_accum_steps"} if same_global_batch else set()
    old, new = saved.flat(), cfg.flat()
    for key in new:
        if key in UNRECORDED or old.get(key) == new[key]:
            continue
        optimisation = key.startswith(OPTIMISATION) and key not in layout
        if not optimisation and key not in FREE | layout:
            raise FlowerdistError(
                f"cannot resume {resume.checkpoint} with {key}={new[key]!r}: it was trained with {key}={old.get(key)!r}, "
                f"which makes another model or other data; put {key} back, or start a new run in a new train.output_dir"
            )
        if optimisation and not cfg.train.resume_override:
            raise FlowerdistError(
                f"resuming {resume.checkpoint} with {key}={new[key]!r} (was {old.get(key)!r}) changes the optimisation "
                f"mid-run; put it back, or pass train.resume_override=true to change it (the change is recorded)"
            )
        resume.changes[key] = [old.get(key), new[key]]
    return cfg


def keep_global_batch(cfg: Config, global_batch: int, resume: Resume, world: int, say=print) -> Config:
    """On another number of processes keep the checkpoint's global batch by deriving the accumulation."""
    if world == resume.saved_world or cfg.train.resume_override:
        return cfg
    per_step = cfg.data.batch_size * world
    if global_batch % per_step:
        fits = [b for b in range(1, global_batch // world + 1) if global_batch % (b * world) == 0]
        raise FlowerdistError(
            f"cannot keep the global batch {global_batch} of {resume.checkpoint} on {world} processes with data.batch_size="
            f"{cfg.data.batch_size}: set data.batch_size to one of {fits} (or train.resume_override=true to change the global batch)"
        )
    accum = global_batch // per_step
    say(
        f"flowerdist: resuming on {world} processes (was {resume.saved_world}): train.grad_accum_steps={accum} keeps "
        f"the global batch {global_batch} = {cfg.data.batch_size} per device x {world} processes x {accum}"
    )
    return apply_overrides(cfg, [f"train.grad_accum_steps={accum}"])


def record_changes(run_dir: Path, resume: Resume) -> None:
    """Append the resume's config changes to metrics.jsonl at the step they take effect (main process)."""
    if resume.changes:
        with (run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": resume.step, "config_change": resume.changes}) + "\n")
