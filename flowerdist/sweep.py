"""`flowerdist sweep FILE`: every cell of a grid of configs, each an ordinary run directory.

A sweep file names a base config, overrides for every cell, the grid, and where the cells go:

    config: configs/flowers/resnet18_cpu.yaml
    overrides: [train.epochs=30]
    grid:
      model.name: [resnet18, resnet34, resnet50]
      train.seed: [0, 1, 2]
    output_dir: runs/experiments/depth
    variants:                    # optional: `--variant cpu` adds these overrides
      cpu: [data.image_size=96, train.epochs=12]
      quick:                     # or overrides and grid entries that replace the sweep's
        overrides: [train.epochs=3]
        grid: {train.seed: [0]}

Cell `name=resnet34,seed=1` trains in `<output_dir>/name=resnet34,seed=1` with `train.resume=auto`.
A finished cell (it has `result.json`) is skipped and a half-finished one resumes, so an
interrupted sweep, rerun, continues where it stopped. A cell whose config is identical to a finished run
anywhere under `runs/` (another sweep's cell, say) reuses it: the cell becomes a link to that run (a cell with
train.mixed_precision=auto matches runs in the precision auto picks here, and under `--slurm` none). Here the
cells run one after another in this process; `--slurm` submits one Slurm job array, a task per cell,
through slurm/launch.sh.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flowerdist.config import apply_overrides, load_config
from flowerdist.errors import FlowerdistError

RESULT = "result.json"  # written by flowerdist.train when a run ends normally

#: Keys that change where a run lives or what it logs, not what it trains: ignored when matching finished runs.
NOT_THE_RESULT = ("name", "log.", "train.output_dir", "train.resume", "train.overwrite", "train.resume_override", "train.log_every",
                  "train.checkpoint_every", "train.keep_last", "train.dist_timeout_s", "train.record_samples", "data.num_workers",
                  "data.prefetch_factor", "data.cache", "data.cache_dir")


def result_key(config: dict[str, Any]) -> str:
    """What a run's result depends on, as text: its config without NOT_THE_RESULT, data folders resolved."""
    from flowerdist.config import _flatten

    flat = {k: v for k, v in _flatten(config).items() if not k.startswith(NOT_THE_RESULT)}
    for key in ("data.root", "data.test_root"):
        if flat.get(key):
            flat[key] = str(Path(flat[key]).resolve())
    return json.dumps(flat, sort_keys=True, default=str)


def twin_key(cfg, slurm: bool) -> str | None:
    """The result_key a cell's finished twin has: with train.mixed_precision=auto, that of the precision auto gives
    on this machine, where the cell would train; None (never reused) for an auto cell that a Slurm node will train.
    A Slurm task trains with FLOWERDIST_MIXED_PRECISION's value where it is set (slurm/launch.sh), and so is matched."""
    if slurm and os.environ.get("FLOWERDIST_MIXED_PRECISION"):
        cfg = apply_overrides(cfg, [f"train.mixed_precision={os.environ['FLOWERDIST_MIXED_PRECISION']}"])
    if cfg.train.mixed_precision == "auto":
        if slurm:
            return None
        from flowerdist.runs import resolve_precision  # imports torch (the device decides): only for an auto cell

        cfg, _ = resolve_precision(cfg)
    return result_key(cfg.to_dict())


def finished_runs(roots: Sequence[Path]) -> dict[str, Path]:
    """result_key -> run directory of every finished run under `roots` that trained with one config throughout."""
    found: dict[str, Path] = {}
    for root in roots:
        for result in sorted(root.rglob(RESULT)) if root.is_dir() else []:
            run = result.parent
            config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else None
            if run.is_symlink() or not isinstance(config, dict) or config.get("resumed_changes"):
                continue  # a link made by reuse, or a run whose config changed on resume
            found.setdefault(result_key(config), run)
    return found


@dataclass(frozen=True)
class Cell:
    name: str
    config: str
    overrides: tuple[str, ...]
    run_dir: Path

    @property
    def done(self) -> bool:
        return (self.run_dir / RESULT).is_file()

    def args(self) -> list[str]:
        """What `flowerdist train -c` takes for this cell."""
        return [self.config, *self.overrides]


def _value_text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def load_sweep(path: str | Path, variant: str | None = None, extra: Sequence[str] = ()) -> list[Cell]:
    """The cells of sweep file `path` (`extra` KEY=VALUE overrides apply to every cell), each config validated
    before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise FlowerdistError(f"sweep file {path} not found; see configs/experiments/ for examples")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise FlowerdistError(f"sweep file {path} is not valid YAML{at}: {getattr(err, 'problem', None) or err}") from None
    unknown = set(spec) - {"config", "overrides", "grid", "output_dir", "variants"} if isinstance(spec, dict) else set()
    if not isinstance(spec, dict) or unknown or "grid" not in spec or "config" not in spec:
        raise FlowerdistError(f"sweep file {path} needs `config:` and `grid:` (optional: overrides, output_dir, variants); got {sorted(spec) if isinstance(spec, dict) else type(spec).__name__}")
    variants = spec.get("variants") or {}
    if variant is not None and variant not in variants:
        raise FlowerdistError(f"sweep file {path} has no variant '{variant}'; choose one of {sorted(variants) or 'none (drop --variant)'}")
    chosen = variants.get(variant) or []
    if isinstance(chosen, dict):  # {overrides: [...], grid: {key: [...]}}: the grid entries replace the sweep's
        if set(chosen) - {"overrides", "grid"} or not isinstance(chosen.get("grid", {}), dict):
            raise FlowerdistError(f"variant '{variant}' in {path} is a list of overrides or a mapping with `overrides:` and `grid:`")
        unknown_keys = set(chosen.get("grid", {})) - set(spec["grid"] or {})
        if unknown_keys:
            raise FlowerdistError(f"variant '{variant}' in {path} replaces grid keys the sweep does not have: {sorted(unknown_keys)}")
        grid = {**spec["grid"], **chosen.get("grid", {})}
        chosen = chosen.get("overrides") or []
    else:
        grid = spec["grid"]
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise FlowerdistError(f"`grid:` in {path} must map config keys to non-empty lists of values")
    base = [*map(str, spec.get("overrides") or []), *map(str, chosen), *extra]
    out = Path(spec.get("output_dir") or f"runs/sweeps/{path.stem}") / (variant or "")
    cells = []
    for values in itertools.product(*grid.values()):
        pairs = [(key, _value_text(v)) for key, v in zip(grid, values)]
        name = ",".join(f"{key.rsplit('.', 1)[-1]}={text}" for key, text in pairs).replace("/", "_")
        overrides = (*base, *(f"{key}={text}" for key, text in pairs))
        run_dir = out / name
        load_config(spec["config"], [*overrides, f"train.output_dir={run_dir}", "train.resume=auto"])  # fail before any cell runs
        cells.append(Cell(name, str(spec["config"]), (*overrides, f"train.output_dir={run_dir}", "train.resume=auto"), run_dir))
    return cells


def run_sweep(path: str, variant: str | None = None, extra: Sequence[str] = (), *, dry_run: bool = False, slurm: bool = False,
              cell: int | None = None, reuse_from: Sequence[str] = ()) -> list[Cell]:
    cells = load_sweep(path, variant, extra)
    missing = [d for d in reuse_from if not Path(d).is_dir()]
    if missing:
        raise FlowerdistError(f"--reuse-from {missing[0]}: no such folder; give a folder that holds finished run directories")
    if cell is not None:
        if not 0 <= cell < len(cells):
            raise FlowerdistError(f"--cell {cell} is out of range: {path} has cells 0-{len(cells) - 1}")
        print(" ".join(cells[cell].args()))  # what slurm/launch.sh trains for array task `cell`
        return cells
    elsewhere = finished_runs([Path("runs"), cells[0].run_dir.parent, *map(Path, reuse_from)])
    twins = {i: elsewhere.get(twin_key(load_config(c.config, list(c.overrides)), slurm)) for i, c in enumerate(cells)
             if elsewhere and not c.done and not c.run_dir.exists()}  # no finished run: no key to compute (auto's needs torch)
    for i, c in enumerate(cells):
        state = "done" if c.done else ("partial" if (c.run_dir / "checkpoints").is_dir() else "to run")
        state = f"the same config finished in {twins[i]}, reused" if twins.get(i) else state
        print(f"sweep: cell {i} {c.name}: {state} ({c.run_dir})", flush=True)
    if dry_run:
        return cells
    for i, twin in twins.items():  # a link to the finished run: the cell is done, `report` reads it like any run
        if twin is not None:
            cells[i].run_dir.parent.mkdir(parents=True, exist_ok=True)
            cells[i].run_dir.symlink_to(twin.resolve(), target_is_directory=True)
    if slurm:
        return submit_array(path, variant, extra, cells)
    from flowerdist.train import train

    for i, c in enumerate(cells):
        if c.done:
            continue
        print(f"sweep: training cell {i} {c.name}", flush=True)
        train(load_config(c.config, list(c.overrides)))
    print(f"sweep: all {len(cells)} cells done; compare them with `flowerdist report {cells[0].run_dir.parent}/*`", flush=True)
    return cells


def submit_array(path: str, variant: str | None, extra: Sequence[str], cells: list[Cell]) -> list[Cell]:
    """One Slurm job array, task i = cell i; slurm/launch.sh turns the task id into the cell's config."""
    todo = [str(i) for i, c in enumerate(cells) if not c.done]
    if not todo:
        print("sweep: nothing to submit, every cell is done", flush=True)
        return cells
    logs = cells[0].run_dir.parent / "slurm-logs"  # beside the cells (sbatch does not create the folder)
    logs.mkdir(parents=True, exist_ok=True)
    sweep = ["--sweep", str(path), *(["--variant", variant] if variant else []), *extra]
    # GPU cells take the GPUs slurm/train.sbatch asks for (SBATCH_GPUS_PER_NODE replaces the count); cells pinned to
    # the CPU (train.cpu=true, as the cpu variants are) ask for none, so they also run on clusters without GPUs.
    cpu = all(load_config(c.config, list(c.overrides)).train.cpu for c in cells)
    cmd = ["sbatch", "--parsable", f"--array={','.join(todo)}", f"--output={logs}/%x-%A_%a.out",
           *(["--gpus-per-node=0"] if cpu else []), "slurm/train.sbatch", *sweep]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise FlowerdistError(f"sbatch failed ({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}); submit from the repo root on a Slurm login node")
    print(f"sweep: submitted job array {done.stdout.strip()} ({len(todo)} cells; logs in {logs})", flush=True)
    print(json.dumps({"job": done.stdout.strip(), "cells": todo}), flush=True)
    return cells
