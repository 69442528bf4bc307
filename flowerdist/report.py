"""`flowerdist report RUN_DIR [RUN_DIR ...] [--out DIR] [--baseline TEXT]`: a table and figures from run
directories alone.

It reads what a run writes (config.yaml, metrics.jsonl, run.json, result.json, split.json and the best
checkpoint); no W&B and no network. `--save-records DIR` copies each run's record (the files the table and the
curves need, without weights: a few hundred KB) to DIR, to keep or commit: a run directory stays on its machine,
its record travels, and `report` reads a record like a run. Runs that differ only in `train.seed` form one row of mean ± std.
A run still in progress, or cut short, is reported with what it has, and marked so: in a row of its own, never
pooled with finished seeds, and left out of the intervals and the budget plot (its numbers are not its budget's).

With several seeds per row, each row also gets the difference of its final validation accuracy to a baseline
row (the first, or the one whose run names contain --baseline) with a 95% confidence interval, paired over the
seeds both rows ran (the same seed draws the same split and initial weights): a paired t interval. Rows that
differ only in the budget (train.epochs) make a plot of accuracy against the training steps (budget.png).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from flowerdist.config import Config, config_from_dict
from flowerdist.errors import FlowerdistError

#: Keys that do not make another experiment: runs differing only in these are seeds of one row.
NOT_THE_EXPERIMENT = ("train.seed", "train.output_dir", "train.resume", "train.overwrite", "train.resume_override", "name", "log.", "data.num_workers",
                      "data.prefetch_factor", "data.cache", "train.record_samples", "train.checkpoint_every", "train.keep_last")
#: ...and rows differing only in these are one network at several budgets (budget.png).
BUDGET = ("train.epochs", "train.max_steps")

#: `flowerdist eval` results on a run's own checkpoints (one JSON object a line, written by inference.record_eval).
EVALS = "evals.jsonl"
#: A run's record: what the table, the curves and the budget plot read (not the weights, not the split's file list).
RECORD_FILES = ("config.yaml", "metrics.jsonl", "run.json", "result.json", "class_indices.json", EVALS)

#: Two-sided 95% quantiles of Student's t by degrees of freedom (beyond 30: the normal's 1.96).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228, 11: 2.201,
        12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042}


def t975(df: int) -> float:
    """The quantile for `df` degrees of freedom; between tabled values the next smaller df's (a wider interval)."""
    if df > 30:
        return 1.96
    return T975[max(k for k in T975 if k <= df)]


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t interval (0 for one value)."""
    n = len(values)
    return statistics.mean(values), (t975(n - 1) * statistics.stdev(values) / n**0.5 if n > 1 else 0.0)


def mean_ci_of_known(values: Sequence[float | None]) -> tuple[float, float]:
    """mean_ci of the values that are known; (nan, 0) when none is (a log without them)."""
    known = [v for v in values if v is not None]
    return mean_ci(known) if known else (math.nan, 0.0)


@dataclass
class Run:
    path: Path
    config: Config
    events: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)  # run.json: the world it trained on
    result: dict[str, Any] | None = None  # result.json: present when the run ended normally

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def epochs(self) -> list[dict[str, Any]]:
        return [e for e in self.events if "val/accuracy" in e]

    @property
    def best_key(self) -> str:
        return "val_ema/accuracy" if self.config.train.best_of == "ema" else "val/accuracy"

    @property
    def best(self) -> dict[str, Any] | None:
        return max(self.epochs, key=lambda e: e.get(self.best_key, e["val/accuracy"]), default=None)

    @property
    def final(self) -> dict[str, Any] | None:
        return self.epochs[-1] if self.epochs else None

    @property
    def final_accuracy(self) -> float | None:
        """The last epoch's validation accuracy of the weights `train.best_of` follows (not selected on anything)."""
        return self.final.get(self.best_key, self.final["val/accuracy"]) if self.final else None

    @property
    def final_train_loss(self) -> float | None:
        """The last epoch's mean training loss (what flattens, or not, as the budget grows)."""
        losses = [e["train/epoch_loss"] for e in self.events if "train/epoch_loss" in e]
        return losses[-1] if losses else None

    @property
    def steps(self) -> int:
        return max((e["step"] for e in self.events), default=0)

    @property
    def test(self) -> dict[str, Any]:
        """The held-out test set's results (data.test_root), when the run had one."""
        return next((e for e in self.events if "test/best/accuracy" in e), {})

    @cached_property
    def evals(self) -> dict[str, float]:
        """`flowerdist eval` accuracies on this run's checkpoints, by what was evaluated ("last data.eval_image_size=64"):
        the latest of each, leaving out one that a later epoch made stale (`best` or `last` has moved on since)."""
        path, out = self.path / EVALS, {}
        current = {"best": (self.best or {}).get("step", 0), "last": (self.final or {}).get("step", 0)}
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                e = json.loads(line)
                label = " ".join([e["checkpoint"], *e["overrides"]])
                if (e["step"] or 0) >= current.get(e["checkpoint"], 0):
                    out[label] = e["accuracy"]
            except (ValueError, KeyError, TypeError):  # a line being written, or not an evaluation: not one to show
                pass
        return out

    @cached_property
    def classes(self) -> list[str]:
        """The class names, from split.json, or class_indices.json in a record (which keeps no split)."""
        if (self.path / "split.json").is_file():
            return json.loads((self.path / "split.json").read_text())["classes"]
        if (self.path / "class_indices.json").is_file():
            indices = json.loads((self.path / "class_indices.json").read_text())
            return [indices[k] for k in sorted(indices, key=int)]
        return []

    @property
    def global_batch(self) -> int:
        world = self.info.get("world_size", 1)
        return self.info.get("global_batch") or self.config.data.batch_size * world * self.config.train.grad_accum_steps

    @property
    def finished(self) -> bool:
        """It ended normally (result.json): its numbers are its budget's."""
        return self.result is not None

    @property
    def status(self) -> str:
        if self.finished:
            return "finished"
        last = max((e["step"] for e in self.events), default=0)
        return f"in progress or cut short (step {last}, epoch {len(self.epochs)} of {self.config.train.epochs})"

    def minutes(self) -> dict[int, float]:
        """Training minutes at every logged step, from each log window's steps, global batch and images/s."""
        out, total, previous = {0: 0.0}, 0.0, 0
        for e in self.events:
            if e.get("train/images_per_s") and e["step"] > previous:
                total += (e["step"] - previous) * self.global_batch / e["train/images_per_s"] / 60
                previous = e["step"]
            out[e["step"]] = total
        return out


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not (path / "config.yaml").is_file() or not (path / "metrics.jsonl").is_file():
        raise FlowerdistError(f"{path} is not a flowerdist run directory (it needs config.yaml and metrics.jsonl); pass RUN_DIR of a run")
    data = yaml.safe_load((path / "config.yaml").read_text()) or {}
    data.pop("resumed_changes", None)
    events = []
    for line in (path / "metrics.jsonl").read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:  # a line being written by a live run
            pass
    info = json.loads((path / "run.json").read_text()) if (path / "run.json").is_file() else {}
    result = json.loads((path / "result.json").read_text()) if (path / "result.json").is_file() else None
    return Run(path, config_from_dict(data, where=str(path / "config.yaml")), events, info, result)


def experiment_key(run: Run, ignore: tuple[str, ...] = ()) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in run.config.flat().items() if not k.startswith(NOT_THE_EXPERIMENT + ignore)))


def by_seed(runs: list[Run], value) -> dict[int, float]:
    """train.seed -> `value` of its run; a seed run more than once (on two machines) is one seed: its runs' mean."""
    values: dict[int, list[float]] = {}
    for r in runs:
        if (v := value(r)) is not None:
            values.setdefault(r.config.train.seed, []).append(v)
    return {seed: statistics.mean(v) for seed, v in values.items()}


def paired_diffs(group: list[Run], baseline: list[Run], value=lambda r: r.final_accuracy) -> list[float]:
    """`value` (the final accuracy, or another number of a run) minus the baseline's, for each train.seed both ran."""
    base, mine = by_seed(baseline, value), by_seed(group, value)
    return [v - base[seed] for seed, v in mine.items() if seed in base]


def interval(diffs: Sequence[float]) -> str:
    """`mean [low, high] (n)`: the 95% t interval of paired differences."""
    mean, half = mean_ci(diffs)
    return f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}] (n={len(diffs)})"


def paired_difference(group: list[Run], baseline: list[Run], value=lambda r: r.final_accuracy) -> str:
    """The interval of paired_diffs over the seeds both rows ran ("" for fewer than two)."""
    diffs = paired_diffs(group, baseline, value)
    return interval(diffs) if len(diffs) >= 2 else ""


def budget_families(runs: Sequence[Run]) -> dict[str, dict[int, list[Run]]]:
    """Network -> steps -> its runs (seeds) at that budget, for networks run at two budgets or more."""
    families: dict[tuple, dict[int, list[Run]]] = {}
    for run in runs:
        if run.finished and run.final_accuracy is not None:  # an unfinished run's steps are not its budget
            families.setdefault(experiment_key(run, BUDGET), {}).setdefault(run.steps, []).append(run)
    out = {}
    for budgets in families.values():
        if len(budgets) >= 2:
            first = next(iter(budgets.values()))[0].config
            name = f"{first.model.name}" + (f" ({'plain' if first.model.shortcut == 'none' else 'shortcut ' + first.model.shortcut})"
                                            if first.model.name.startswith("resnet") else "")
            out[name] = dict(sorted(budgets.items()))
    return out


def budget_curves(runs: Sequence[Run]) -> dict[str, list[tuple[int, float, float, float, float, int]]]:
    """Network -> (steps, final accuracy: mean, 95% half-width, final training loss: mean, 95% half-width, seeds) per
    budget, for networks run at two budgets or more."""
    def point(steps, group):  # over seeds: a seed trained on two machines is one seed, its runs' mean
        accuracy = by_seed(group, lambda r: r.final_accuracy)
        return (steps, *mean_ci(list(accuracy.values())), *mean_ci_of_known(list(by_seed(group, lambda r: r.final_train_loss).values())), len(accuracy))
    return {name: [point(steps, group) for steps, group in budgets.items()] for name, budgets in budget_families(runs).items()}


def target_entropy(run: Run) -> float | None:
    """The lowest mean training loss the run's targets allow: the entropy of its label-smoothed one-hot target (MixUp
    and CutMix mix such targets, which only raises it); None where the number of classes is unknown."""
    eps, k = run.config.train.label_smoothing, len(run.classes)
    if eps == 0:
        return 0.0
    if k < 2:
        return None
    top, rest = 1 - eps + eps / k, eps / k
    return -(top * math.log(top) + (k - 1) * rest * math.log(rest))


FLAT_MARGIN = 0.02  # a doubling that lowers the loss by less than this has flattened it (falls here were 0.10-0.15)
FLAT_MIN_SEEDS = 3  # for a verdict: plain-34's first two seeds (+0.034, +0.032) gave [+0.021, +0.046], its third -0.086


def loss_flattening(runs: Sequence[Run], margin: float = FLAT_MARGIN) -> list[dict[str, str]]:
    """A row per network: the change of its final training loss from each budget to the next, paired by seed, with a
    95% t interval, and the first budget from which the loss is shown to have flattened: the next budget's change
    has an interval wholly above -margin (it falls by less than `margin`, or rises), and so has every later one.
    That is the budget a comparison of networks needs: below it, one network may only be ahead because it trains
    faster. An interval that merely reaches 0 is not enough: two or three seeds give wide intervals, which would
    call a falling loss flat for want of seeds. Nor can two seeds give a verdict: their interval's half-width is
    6.4 times their one difference, narrow whenever the two happen to agree. Fewer than FLAT_MIN_SEEDS seeds at both
    budgets give the change and no verdict, but they can contradict one: a later step whose interval reaches below
    -margin (one seed: whose change does) undoes an earlier flat verdict (a probe of the next budget that still
    lowers the loss says it has not flattened; one that does not lower it leaves the verdict to the steps that can
    give one). Where the last step, over FLAT_MIN_SEEDS seeds or more, has an interval wholly below -margin, the
    verdict is the opposite one, "still falling": the budget is shown too small, and more seeds would not change
    that (the other "not shown" wants more seeds or a larger budget). The loss
    cannot fall below its targets' entropy (the floor), so a loss still falling can only repeat its last fall
    (loss - floor) / fall more times: its curve bends within that many more budget steps."""
    rows = []
    for name, budgets in budget_families(runs).items():
        r, flat, diffs = {"network": name}, None, []  # each step sets mean, half; `falling` and the ratio read the last step's
        steps = list(budgets)
        for before, after in zip(steps, steps[1:]):
            diffs = paired_diffs(budgets[after], budgets[before], lambda x: x.final_train_loss)
            r[f"{before} -> {after} steps"] = interval(diffs) if len(diffs) > 1 else f"{diffs[0]:+.3f} (one seed)" if diffs else "no seed at both"
            mean, half = mean_ci(diffs) if diffs else (0.0, 0.0)  # one seed: its change, half-width 0
            if mean - half < -margin:
                flat = None  # a later fall undoes a flat step, whatever its seeds
            elif flat is None and len(diffs) >= FLAT_MIN_SEEDS:
                flat = before
        falling = len(diffs) >= FLAT_MIN_SEEDS and mean + half < -margin  # the last step: shown to fall by more
        r["flat from"] = f"{flat} steps" if flat is not None else f"still falling at {steps[-1]} steps" if falling else f"not shown by {steps[-1]} steps"
        floor = next((f for f in map(target_entropy, budgets[steps[-1]]) if f is not None), None)
        r["floor"] = f"{floor:.3f}" if floor is not None else "unknown (no class list)"
        r["(loss - floor) / last fall"] = ""  # without a floor, or without a seed at the last two budgets: no ratio
        if floor is not None and diffs:
            loss = statistics.mean(by_seed(budgets[steps[-1]], lambda x: x.final_train_loss).values())
            r["(loss - floor) / last fall"] = f"{(loss - floor) / -mean:.1f}" if mean < 0 else "not falling"
        rows.append(r)
    return rows


def group_by_seed(runs: Sequence[Run]) -> list[list[Run]]:
    """Rows: runs differing only in their seed; the finished and the unfinished ones of a config apart."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault((experiment_key(run), run.finished), []).append(run)
    return list(groups.values())


def parameters(run: Run) -> int | None:
    """Parameter count of the run's model, built on the meta device (no memory, no download)."""
    import torch

    from flowerdist.models import create_model

    try:
        with torch.device("meta"):
            model = create_model(run.config.model.name, max(2, len(run.classes)), shortcut=run.config.model.shortcut,
                                 image_size=run.config.data.image_size, init_weights=False)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # an architecture this flowerdist cannot build: leave the cell empty
        return None


def _mean_std(values: Sequence[float], fmt: str = "{:.3f}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return ""
    if len(values) == 1 or len(set(values)) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def eval_cell(group: list[Run], label: str) -> str:
    """Mean ± std of an `eval` result over the seeds that ran it, naming those seeds when not all did."""
    have = [r for r in group if label in r.evals]
    cell = _mean_std([r.evals[label] for r in have])
    if len(have) < len(group):
        cell += f" (seed{'s' if len(have) > 1 else ''} {', '.join(str(r.config.train.seed) for r in have)} of {len(group)})"
    return cell


def machine(run: Run) -> str:
    """Where a run trained, as run.json gives it: the device, its name, and a CPU's vector ISA (bf16 kernels round
    differently from one CPU to another, so two machines' numbers are not the same experiment)."""
    info = run.info
    name = ", ".join(x for x in (info.get("device_name"), info.get("cpu_capability") if info.get("device") == "cpu" else None) if x)
    return f"{info.get('device', '')}: {name}" if name else info.get("device", "")


def machines_cell(group: list[Run]) -> str:
    """The group's machine; where its seeds trained on several, each with its seeds."""
    seeds: dict[str, list[str]] = {}
    for r in group:
        seeds.setdefault(machine(r), []).append(str(r.config.train.seed))
    if len(seeds) == 1:
        return next(iter(seeds))
    return "; ".join(f"{m} (seed{'s' if len(s) > 1 else ''} {', '.join(s)})" for m, s in seeds.items())


def row(group: list[Run]) -> dict[str, str]:
    """One table row: the group's shared settings and mean ± std of its measurements."""
    first = group[0]
    cfg, n = first.config, len(group)
    best = [r.best.get(r.best_key, r.best["val/accuracy"]) if r.best else None for r in group]
    final = [r.final.get(r.best_key, r.final["val/accuracy"]) if r.final else None for r in group]
    classes, prefix = first.classes, first.best_key.removesuffix("/accuracy")
    per_class = " / ".join(
        f"{c} {_mean_std([r.final.get(f'{prefix}/accuracy/{c}', r.final.get(f'val/accuracy/{c}')) for r in group if r.final], '{:.2f}')}"
        for c in classes
    )
    params = parameters(first)
    waits = [statistics.mean(w) for r in group if (w := [e["train/data_wait"] for e in r.events if "train/data_wait" in e])]
    rates = [statistics.mean(v) for r in group if (v := [e["epoch/images_per_s"] for e in r.epochs if "epoch/images_per_s" in e])]
    return {
        "run": ", ".join(r.name for r in group) + (f" (n={n}, seeds {', '.join(str(r.config.train.seed) for r in group)})" if n > 1 else ""),
        "model": cfg.model.name,
        "shortcut": cfg.model.shortcut if cfg.model.name.startswith("resnet") else "",
        "parameters": f"{params / 1e6:.2f} M" if params else "",
        "epochs": _mean_std([sum("train/epoch_loss" in e for e in r.events) for r in group], "{:.0f}") + f" of {cfg.train.epochs}",
        "global batch": str(first.global_batch),
        "world size": str(first.info.get("world_size", "")),
        "machine": machines_cell(group),
        "weights": "EMA" if prefix == "val_ema" else "model",  # what the accuracies below are of (train.best_of)
        "final training loss": _mean_std([r.final_train_loss for r in group]),
        "best val acc": _mean_std(best),
        "final val acc": _mean_std(final),
        **({"test acc, best / last checkpoint": f"{_mean_std([r.test['test/best/accuracy'] for r in group])} / "
                                                 f"{_mean_std([r.test['test/last/accuracy'] for r in group])}"} if all(r.test for r in group) else {}),
        **{f"eval {label}": eval_cell(group, label) for label in dict.fromkeys(e for r in group for e in r.evals)},
        "per-class acc (final)": per_class,
        "training minutes": _mean_std([max(r.minutes().values()) for r in group], "{:.3g}"),
        "images/s": _mean_std(rates, "{:.1f}"),
        "data wait": _mean_std([100 * w for w in waits], "{:.1f}") + ("%" if waits else ""),
        "status": "; ".join(sorted({r.status for r in group})),
    }


def markdown_table(rows: list[dict[str, str]]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))  # rows may add columns (test accuracy)
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join(" --- " for _ in keys) + "|"]
    lines += ["| " + " | ".join(r.get(k, "") for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def default_out(paths: Sequence[Path]) -> Path:
    return paths[0] / "report" if len(paths) == 1 else Path("reports") / datetime.now().strftime("%Y%m%d-%H%M%S")


def save_records(runs: Sequence[Run], dest: str | Path, log=print) -> None:
    """Copy each run's RECORD_FILES to DEST/<run folder name> (a record already there is updated)."""
    names = [r.path.name for r in runs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise FlowerdistError(f"--save-records: several runs are named {', '.join(twice)}; save their records in separate calls, to separate folders")
    dest = Path(dest)
    for run in runs:
        target = dest / run.path.name
        if target.resolve() == run.path.resolve():
            continue  # reporting the records themselves
        try:
            target.mkdir(parents=True, exist_ok=True)
            for name in RECORD_FILES:
                if (run.path / name).is_file():
                    shutil.copy2(run.path / name, target / name)
                else:  # the run is in progress (no result.json yet): its record must not keep an older run's result
                    (target / name).unlink(missing_ok=True)
        except OSError as err:
            raise FlowerdistError(f"--save-records {dest}: cannot write {target} ({err.strerror}); give a folder you can write to") from None
    log(f"report: the records of {len(runs)} run(s) in {dest} (no weights; `flowerdist report {dest}/*` reads them)")


def write_report(paths: Sequence[str | Path], out: str | Path | None = None, log=print, baseline: str | None = None,
                 per_run: bool | None = None, records: str | Path | None = None, flat_margin: float = FLAT_MARGIN) -> Path:
    """report.md and its PNG figures in `out`; returns the report's path. `per_run`: each run's confusion matrix and
    mistakes grid (default: when there are at most 6 runs). `records`: also save the runs' records there.
    `flat_margin`: the fall of the training loss per budget step below which a network has flattened."""
    from flowerdist import figures

    if not flat_margin >= 0:
        raise FlowerdistError(f"--flat-margin {flat_margin}: give the largest loss fall per budget step that counts as flat, 0 or more (default {FLAT_MARGIN})")
    runs = [load_run(p) for p in paths]
    if records:
        save_records(runs, records, log)
    out = Path(out) if out else default_out([r.path for r in runs])
    out.mkdir(parents=True, exist_ok=True)
    groups = group_by_seed(runs)
    lines = [f"# flowerdist report: {len(runs)} run(s), {len(groups)} row(s)", "", f"Written {datetime.now():%Y-%m-%d %H:%M} from the run directories alone.", ""]
    rows = [row(g) for g in groups]
    finished = [g for g in groups if g[0].finished]  # what intervals may pair with (a row is all finished or none)
    matching = [g for g in finished if all(baseline in str(r.path) for r in g)] if baseline else []
    if baseline and not matching:
        raise FlowerdistError(f"--baseline {baseline}: no finished row's runs all have it in their path; give part of the baseline runs' directory names")
    base = (matching or finished or groups)[0]
    if any(len(g) > 1 for g in groups):
        name = ",".join(p for p in base[0].name.split(",") if not p.startswith("seed=")) if len(base) > 1 else base[0].name  # a sweep cell's name less its seed
        for g, r in zip(groups, rows):
            def difference(value):  # an unfinished row's numbers are not its budget's: no interval (its status says why)
                return "baseline" if g is base else paired_difference(g, base, value) if g[0].finished else ""
            r[f"final acc - {name} (95% CI, paired by seed)"] = difference(lambda x: x.final_accuracy)
            r[f"final training loss - {name} (95% CI)"] = difference(lambda x: x.final_train_loss)
            if "test acc, best / last checkpoint" in r and base[0].test:  # the held-out photos, weights not selected on them
                r[f"test acc (last) - {name} (95% CI)"] = difference(lambda x: x.test.get("test/last/accuracy"))
            for label in (e for e in dict.fromkeys(e for b in base for e in b.evals) if f"eval {e}" in r):
                r[f"eval {label} - {name} (95% CI)"] = difference(lambda x, label=label: x.evals.get(label))
    lines += [markdown_table(rows), ""]
    curves = budget_curves(runs)
    if curves:
        figures.save(figures.budget_figure(curves), out / "budget.png")
        lines += ["## Accuracy against the training budget", "", "![final validation accuracy and training loss against steps](budget.png)", ""]
        lines += ["Final validation accuracy ± the 95% half-width over seeds, and the final epoch's training loss, at each budget:", ""]
        lines += [markdown_table([{"network": name, **{f"{steps} steps": f"{m:.3f} ± {h:.3f} (loss {loss:.3f}, n={n})" for steps, m, h, loss, _, n in points}}
                                  for name, points in curves.items()]), ""]
        lines += ["Change of the final training loss from one budget to the next, paired by seed (95% CI), and the budget from which it "
                  f"has flattened (every later change's interval lies above -{flat_margin:g}: each later budget step is shown to lower the loss by "
                  f"less than that, over {FLAT_MIN_SEEDS} seeds or more; a later step with fewer seeds whose change or interval reaches below -{flat_margin:g} undoes that; 'still falling' where the last step, over as many seeds, is shown to lower it by more): where a comparison of the networks needs to be made. The floor is the "
                  "lowest loss the targets allow (their entropy under label smoothing); a loss still falling can repeat its last fall "
                  "only (loss - floor) / fall more times, so its curve bends within that many more budget steps:", ""]
        lines += [markdown_table(loss_flattening(runs, flat_margin)), ""]
    names = {r.name for r in runs}  # two runs called `run` in different folders are labelled with their parent too
    label = {id(r): (r.name if len(names) == len(runs) else f"{r.path.parent.name}/{r.name}") for r in runs}
    with_data = [r for r in runs if r.events]
    figures.save(figures.curves_figure({label[id(r)]: r.events for r in with_data}, {label[id(r)]: r.minutes() for r in with_data}), out / "curves.png")
    figures.save(figures.throughput_figure({label[id(r)]: r.events for r in with_data}), out / "throughput.png")
    lines += ["## Curves", "", "![loss and accuracy](curves.png)", "", "## Throughput", "", "![images/s and data wait](throughput.png)", ""]
    finals = [r for r in runs if r.final]
    if finals:
        classes = finals[0].classes
        bars = [[r.final.get(f"val/accuracy/{c}", 0.0) for c in classes] for r in finals]
        figures.save(figures.per_class_figure([label[id(r)] for r in finals], classes, bars), out / "per_class.png")
        lines += ["## Per-class accuracy (final epoch)", "", "![per-class accuracy](per_class.png)", ""]
    for r in runs if (per_run if per_run is not None else len(runs) <= 6) else []:
        lines += run_figures(r, label[id(r)], out, log)
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    log(f"report: {report} ({len(runs)} run(s)); figures beside it")
    return report


def run_figures(run: Run, name: str, out: Path, log) -> list[str]:
    """The confusion matrix of the best epoch and the mistakes grid of one run (markdown lines)."""
    from flowerdist import figures

    lines = [f"## {name}: {run.status}", ""]
    best = run.best
    safe = name.replace("/", "_")
    if best is not None and run.classes:
        prefix = "val_ema" if run.best_key.startswith("val_ema") else "val"
        figures.save(figures.confusion_figure(best[f"{prefix}/confusion"], run.classes, f"{name}, best epoch (step {best['step']})"),
                     out / f"confusion-{safe}.png")
        lines += [f"![confusion matrix of {name}](confusion-{safe}.png)", ""]
    try:
        grid = mistakes_grid(run)
    except FlowerdistError as err:
        log(f"report: no mistakes grid for {name}: {err}")
        lines += [f"(no mistakes grid: {err})", ""]
    else:
        figures.save(grid, out / f"mistakes-{safe}.png")
        lines += [f"![validation images, mistakes first, of {name}](mistakes-{safe}.png)", ""]
    return lines


def mistakes_grid(run: Run, count: int = 24):
    """Validation images of the run's split through its best checkpoint: mistakes first (needs both)."""
    from flowerdist import figures
    from flowerdist.checkpoint import resolve_checkpoint
    from flowerdist.data.folder import load_split, scan_folder
    from flowerdist.inference import predict_indices

    if not (run.path / "checkpoints").is_dir():
        raise FlowerdistError("the run has no checkpoint (a record, or a run before its first save)")
    ckpt = resolve_checkpoint(run.path)
    root = Path(run.config.data.root)
    if not root.is_dir():
        raise FlowerdistError(f"its data folder {root} is not here")
    index = scan_folder(root)
    _, val = load_split(run.path / "split.json", index)
    images, true, pred, prob = predict_indices(ckpt, index, val[:300])
    order = sorted(range(len(true)), key=lambda i: (true[i] == pred[i], prob[i] if true[i] == pred[i] else -prob[i]))[:count]
    pick = lambda xs: [xs[i] for i in order]  # noqa: E731
    return figures.mistakes_figure(pick(images), pick(true), pick(pred), pick(prob), run.classes, title=f"{run.name}: {ckpt.name}")
