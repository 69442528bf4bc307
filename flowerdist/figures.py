"""Figures a user looks at: curves, confusion matrices, per-class bars, validation mistakes, throughput,
predictions. matplotlib with the Agg backend (no display); every function returns a Figure, which the
report saves as PNG and the training loop sends to W&B."""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def save(fig: Figure, path, dpi: int = 110) -> None:
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def _colors(n: int) -> list:
    """One colour per run that no other run shares: the default cycle up to 10 runs (it repeats after that, and a
    52-run report drew five runs in each colour), tab20 up to 20, then evenly spaced along turbo."""
    if n <= len(COLORS):
        return COLORS[:n]
    if n <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(n)]
    return [plt.get_cmap("turbo")(i / (n - 1)) for i in range(n)]


def _legend_columns(names: Sequence[str], inches: float) -> int:
    """As many legend columns as the names fit across `inches` (8-pt text about 0.065 in a character, 0.6 in for
    the line sample and gap): a legend wider than the figure makes the layout give up."""
    fits = int(inches / (0.065 * max(map(len, names), default=1) + 0.6))
    return max(1, min(4, len(names), fits))


def _legend_below(fig: Figure, ax) -> None:
    """The axes' legend under the whole figure, in as many columns as fit, and the figure taller by the legend's
    height (one 8-pt row about 0.19 in) so that the axes keep their size however many runs a report has: inside
    the axes, a sweep's dozens of long run names covered the plots and collapsed the layout (matplotlib:
    "constrained_layout not applied")."""
    handles, labels = ax.get_legend_handles_labels()
    width, height = fig.get_size_inches()
    columns = _legend_columns(labels, width)
    fig.legend(handles, labels, loc="outside lower center", ncol=columns, fontsize=8, frameon=False)
    fig.set_size_inches(width, height + 0.3 + 0.19 * math.ceil(len(labels) / columns))


def _picture(ax) -> None:
    """An axes that only shows an image. Without ticks: an axis that is merely off still lays out its ticks at
    every layout pass (measured: 0.83 -> 0.52 s to save the 18-image mistakes grid, the same pixels)."""
    ax.set(xticks=[], yticks=[])
    ax.axis("off")


def confusion_figure(matrix: Sequence[Sequence[int]], classes: Sequence[str], title: str = "") -> Figure:
    """Counts and row-normalised (recall per true class) side by side."""
    counts = np.asarray(matrix, dtype=float)
    rows = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    n = len(classes)
    fig, axes = plt.subplots(1, 2, figsize=(4.2 + 1.6 * n, 0.9 * n + 1.6), constrained_layout=True)
    for ax, values, label, fmt in ((axes[0], counts, "count", "{:.0f}"), (axes[1], rows, "share of the true class", "{:.2f}")):
        ax.imshow(values, cmap="Blues", vmin=0, vmax=values.max() or 1)
        ax.set_xticks(range(n), classes, rotation=35, ha="right")
        ax.set_yticks(range(n), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(label, fontsize=10)
        for i in range(n):
            for j in range(n):
                dark = values[i, j] > 0.6 * (values.max() or 1)
                ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize=9, color="white" if dark else "black")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def mistakes_figure(images: Sequence[np.ndarray], true: Sequence[int], pred: Sequence[int], prob: Sequence[float],
                    classes: Sequence[str], columns: int = 6, title: str = "") -> Figure:
    """Validation images with true and predicted class and the predicted probability: the most confident mistakes
    first (red), then the least confident correct predictions (green)."""
    order = sorted(range(len(images)), key=lambda i: (true[i] == pred[i], prob[i] if true[i] == pred[i] else -prob[i]))
    rows = max(1, math.ceil(len(order) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.1 * columns, 2.45 * rows), squeeze=False, constrained_layout=True)
    for ax in axes.flat:
        _picture(ax)
    for ax, i in zip(axes.flat, order):
        ax.imshow(images[i])
        wrong = true[i] != pred[i]
        ax.set_title(f"true {classes[true[i]]}\npred {classes[pred[i]]} {prob[i]:.2f}", fontsize=8.5,
                     color="#c0392b" if wrong else "#1e7d32")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def curves_figure(runs: dict[str, list[dict]], minutes: dict[str, dict[int, float]]) -> Figure:
    """Training loss and validation accuracy against steps and against training minutes, one colour per run.

    `minutes[run][step]`: training time up to each logged step (evaluation excluded)."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for color, (name, events) in zip(_colors(len(runs)), runs.items()):
        at = minutes[name]
        losses = [e for e in events if "train/loss" in e]
        vals = [e for e in events if "val/accuracy" in e]
        axes[0, 0].plot([e["step"] for e in losses], [e["train/loss"] for e in losses], color=color, lw=1.2, label=name)
        axes[0, 1].plot([e["step"] for e in vals], [e["val/accuracy"] for e in vals], "o-", color=color, ms=3, label=name)
        axes[1, 0].plot([at[e["step"]] for e in losses], [e["train/loss"] for e in losses], color=color, lw=1.2, label=name)
        axes[1, 1].plot([at[e["step"]] for e in vals], [e["val/accuracy"] for e in vals], "o-", color=color, ms=3, label=name)
        emas = [e for e in vals if "val_ema/accuracy" in e]
        if emas:  # the EMA's accuracy beside the raw weights', dashed
            axes[0, 1].plot([e["step"] for e in emas], [e["val_ema/accuracy"] for e in emas], "--", color=color, lw=1.2, label=f"{name} (EMA)")
            axes[1, 1].plot([at[e["step"]] for e in emas], [e["val_ema/accuracy"] for e in emas], "--", color=color, lw=1.2)
    for ax, (x, y) in zip(axes.flat, [("optimizer step", "training loss"), ("optimizer step", "validation accuracy"),
                                     ("training minutes", "training loss"), ("training minutes", "validation accuracy")]):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    _legend_below(fig, axes[0, 1])
    return fig


def budget_figure(curves: dict[str, list[tuple[int, float, float, float, float, int]]]) -> Figure:
    """Final validation accuracy and final training loss against the training budget (optimizer steps), mean and
    95% interval over seeds: where accuracy stops rising and the loss stops falling is the budget that has flattened.
    The title says how many seeds each point has (one seed: no interval to draw)."""
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for color, (name, points) in zip(_colors(len(curves)), curves.items()):
        steps, means, halves, losses, loss_halves, _ = zip(*points)
        acc_ax.errorbar(steps, means, yerr=halves, marker="o", capsize=3, color=color, label=name)
        loss_ax.errorbar(steps, losses, yerr=loss_halves, marker="o", capsize=3, color=color, label=name)
    seeds = sorted({n for points in curves.values() for *_, n in points})
    span = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
    over = "one seed, no interval" if seeds == [1] else f"mean, 95% CI over {span} seeds"
    acc_ax.set(xscale="log", xlabel="training budget (optimizer steps, log scale)", ylabel="final validation accuracy",
               title=f"accuracy against budget ({over})")
    loss_ax.set(xscale="log", xlabel="training budget (optimizer steps, log scale)", ylabel="last epoch's training loss",
                title="training loss against budget")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
    acc_ax.legend()
    return fig


def per_class_figure(names: Sequence[str], classes: Sequence[str], accuracies: Sequence[Sequence[float]]) -> Figure:
    """Per-class validation accuracy, one bar group per class, one bar per run."""
    width = 0.8 / max(1, len(names))
    inches = max(6, 1.4 * len(classes) + 0.6 * len(names))
    fig, ax = plt.subplots(figsize=(inches, 3.8), constrained_layout=True)
    x = np.arange(len(classes))
    for k, (name, acc, color) in enumerate(zip(names, accuracies, _colors(len(names)))):
        ax.bar(x + (k - (len(names) - 1) / 2) * width, acc, width, label=name, color=color)
    ax.set_xticks(x, classes)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("validation accuracy")
    ax.grid(axis="y", alpha=0.3)
    _legend_below(fig, ax)  # inside or beside the axes, a wide legend squeezed the bars to a third of the width
    return fig


def throughput_figure(runs: dict[str, list[dict]]) -> Figure:
    """Images/s and the share of time spent waiting for data, per log window: a stalled data path shows at once."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True, constrained_layout=True)
    for color, (name, events) in zip(_colors(len(runs)), runs.items()):
        windows = [e for e in events if "train/images_per_s" in e]
        top.plot([e["step"] for e in windows], [e["train/images_per_s"] for e in windows], color=color, lw=1.2, label=name)
        bottom.plot([e["step"] for e in windows], [100 * e.get("train/data_wait", 0) for e in windows], color=color, lw=1.2)
    top.set_ylabel("images / s")
    bottom.set_ylabel("waiting for data (%)")
    bottom.set_xlabel("optimizer step")
    bottom.set_ylim(bottom=0)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    _legend_below(fig, top)
    return fig


def prediction_figure(images: Sequence[np.ndarray], names: Sequence[str], predictions: Sequence[Sequence[dict]], columns: int = 3) -> Figure:
    """The tutorial's picture: each image titled with its top class and probability, with a bar of the top-k."""
    n = len(images)
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    fig = plt.figure(figsize=(4.4 * columns, 3.2 * rows), constrained_layout=True)
    grid = fig.add_gridspec(rows, 2 * columns, width_ratios=[1.25, 1] * columns)
    for i, (image, name, preds) in enumerate(zip(images, names, predictions)):
        r, c = divmod(i, columns)
        ax = fig.add_subplot(grid[r, 2 * c])
        ax.imshow(image)
        _picture(ax)
        ax.set_title(f"{preds[0]['class']} {preds[0]['probability']:.2f}\n{_short(name)}", fontsize=9)
        bars = fig.add_subplot(grid[r, 2 * c + 1])
        labels = [p["class"] for p in preds][::-1]
        values = [p["probability"] for p in preds][::-1]
        bars.barh(labels, values, color=[COLORS[0]] * (len(values) - 1) + [COLORS[1]])
        bars.set_xlim(0, 1)
        bars.tick_params(labelsize=8)
        bars.set_xlabel("probability", fontsize=8)
    return fig


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]
