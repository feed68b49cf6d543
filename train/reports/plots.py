"""The report's figures, drawn with matplotlib's Agg backend (no display, no network) at fixed sizes.

Each function takes one or more :class:`~train.reports.rundata.RunData` and writes one PNG of
``FIGSIZE`` inches at ``DPI`` (so every file is ``PIXELS`` wide and high); several runs share the axes,
one colour per run. Panels without data say so instead of being left blank.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from train.reports.rundata import RunData, eval_table, mixture_table, protocol_label, series

FIGSIZE = (12.0, 7.0)
DPI = 100
PIXELS = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))  # (width, height) of every PNG
SMOOTHING = 10  # the smoothed loss is a centred mean over 1/SMOOTHING of the logged points (at least 1)

TRAINING_PANELS = (  # (metric key, title, y label)
    ("train/loss", "training loss (raw and smoothed, log)", "loss"),
    ("lr", "learning rate", "lr"),
    ("grad_norm", "gradient norm (before clipping, log)", "norm"),
    ("tokens_per_second", "real tokens / s (no padding)", "tokens/s"),
    ("packing/efficiency", "packing efficiency (real / slots)", "fraction"),
    ("examples_seen", "examples trained on", "examples"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int) -> list:
    plt = _pyplot()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[i % len(cycle)] for i in range(n)]


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#777777", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def smooth(values: Sequence[float], fraction: int = SMOOTHING) -> list[float]:
    """Centred moving mean over ``len(values) // fraction`` points (odd, shrinking at the ends).

    Centred, unlike an exponential average, so it does not lag behind the raw curve on a short run.
    """
    half = max(1, len(values) // fraction) // 2
    out = []
    for i in range(len(values)):
        window = values[max(0, i - half):i + half + 1]
        out.append(sum(window) / len(window))
    return out


def _save_with_legend(fig, first_ax, legend: bool, path: Path) -> Path:
    """One legend of the runs under the panels (taken from the first panel), then save."""
    if legend:
        handles, labels = first_ax.get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=9)
    fig.tight_layout(rect=(0, 0.06 if legend else 0, 1, 1))
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")  # no bbox_inches="tight": the size stays PIXELS
    _pyplot().close(fig)
    return path


def plot_training(runs: Sequence[RunData], path: Path) -> Path:
    """Loss (raw + smoothed), lr, grad norm, tokens/s, packing efficiency and examples over steps."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=FIGSIZE, dpi=DPI)
    colors = _colors(len(runs))
    for ax, (key, title, ylabel) in zip(axes.flat, TRAINING_PANELS):
        drawn = False
        for run, color in zip(runs, colors):
            steps, values = series(run, key)
            if not steps:
                continue
            drawn = True
            if key == "train/loss":
                ax.plot(steps, values, color=color, alpha=0.3, linewidth=1)
                ax.plot(steps, smooth(values), color=color, linewidth=2, label=run.name)
            else:
                ax.plot(steps, values, color=color, linewidth=1.5, label=run.name)
        ax.set_title(title, fontsize=10)
        if drawn:
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if key in ("train/loss", "grad_norm"):
                ax.set_yscale("log")  # the first steps' values would flatten the rest of the curve
        else:
            _empty(ax, f"no `{key}` logged")
    return _save_with_legend(fig, axes.flat[0], len(runs) > 1, path)


def plot_eval(runs: Sequence[RunData], path: Path) -> Path:
    """Per dataset: the median over templates at each eval step, with the min–max band over templates."""
    plt = _pyplot()
    tables = [eval_table(run) for run in runs]
    label = protocol_label(runs)
    datasets = sorted({d for table in tables for d in table})
    n = max(1, len(datasets))
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=FIGSIZE, dpi=DPI, squeeze=False)
    colors = _colors(len(runs))
    for ax, dataset in zip(axes.flat, datasets):
        for run, table, color in zip(runs, tables, colors):
            entry = table.get(dataset)
            if not entry:
                continue
            ax.fill_between(entry["steps"], entry["min"], entry["max"], color=color, alpha=0.15, linewidth=0)
            ax.plot(entry["steps"], entry["median"], color=color, marker="o", markersize=3, linewidth=1.8, label=run.name)
        chance = [table[dataset]["chance"] for table in tables if table.get(dataset, {}).get("chance") is not None]
        if chance:
            ax.axhline(chance[0], color="#888888", linestyle="--", linewidth=1, label="chance")
        ax.set_title(f"{dataset}: {label} (band: min–max)", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
    if not datasets:
        _empty(axes.flat[0], "no evaluation results (eval/step-N.json) in " + ", ".join(r.name for r in runs))
    for ax in list(axes.flat)[len(datasets) or 1:]:
        ax.set_visible(False)
    return _save_with_legend(fig, axes.flat[0], len(runs) > 1 and bool(datasets), path)


def plot_mixture(runs: Sequence[RunData], path: Path) -> Path:
    """Planned vs realised share per task, of examples (left) and of tokens (right); one bar group per run."""
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=FIGSIZE, dpi=DPI)
    tables = [mixture_table(run) for run in runs]
    tasks = sorted({row["task"] for table in tables for row in table})
    colors = _colors(len(runs))
    for ax, what in zip(axes, ("examples", "tokens")):
        known = any(row.get(f"{kind}_{what}") for table in tables for row in table for kind in ("planned", "realised"))
        if not tasks or not known:
            _empty(ax, f"no share of {what} recorded (run.json's mixture, or the tasks/* and task_tokens/* metrics)")
            ax.set_title(f"mixture: share of {what} per task", fontsize=10)
            continue
        y = np.arange(len(tasks))
        height = 0.8 / (2 * len(runs))
        for i, (run, table, color) in enumerate(zip(runs, tables, colors)):
            by_task = {row["task"]: row for row in table}
            planned = [by_task.get(t, {}).get(f"planned_{what}") or 0.0 for t in tasks]
            realised = [by_task.get(t, {}).get(f"realised_{what}") or 0.0 for t in tasks]
            base = y - 0.4 + 2 * i * height
            suffix = f" ({run.name})" if len(runs) > 1 else ""
            ax.barh(base + height / 2, planned, height, color=color, alpha=0.35, label=f"planned{suffix}")
            ax.barh(base + 1.5 * height, realised, height, color=color, label=f"realised{suffix}")
        ax.set_yticks(y)
        ax.set_yticklabels(tasks, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"share of {what}")
        ax.set_title(f"mixture: share of {what} per task", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


PLOTS = {"training.png": plot_training, "eval.png": plot_eval, "mixture.png": plot_mixture}
