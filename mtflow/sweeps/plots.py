"""Matplotlib figures of a collected sweep: final O_K and reward against G (one line per T), the G x T heat map,
and every run's reward curve. matplotlib is imported when a figure is made."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from mtflow.sweeps.collect import CellSummary, RunResult


def sort_key(value: Any) -> tuple[int, Any]:
    """Numbers first in numeric order, then anything else by its text (axis values may mix types)."""
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))


def make_metric_vs_group_figure(cells: Sequence[CellSummary]) -> Figure:
    """Two panels, final O_K and final reward against G, one line per T (mean over seeds, error bar = std).
    Each line's label is ``T=<value>``."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    axes = figure.subplots(1, 2)
    steps_values = sorted({c.num_steps for c in cells}, key=sort_key)
    groups = sorted({c.group_size for c in cells}, key=sort_key)
    for ax, (mean_attr, std_attr, title) in zip(
        axes,
        (
            ("overall_mean", "overall_std", "final held-out O_K"),
            ("reward_mean", "reward_std", "final training reward"),
        ),
    ):
        for steps in steps_values:
            members = sorted((c for c in cells if c.num_steps == steps), key=lambda c: sort_key(c.group_size))
            ax.errorbar(
                [c.group_size for c in members],
                [getattr(c, mean_attr) for c in members],
                yerr=[getattr(c, std_attr) for c in members],
                marker="o",
                capsize=3,
                label=f"T={steps}",
            )
        if all(isinstance(g, (int, float)) and g > 0 for g in groups):
            ax.set_xscale("log", base=2)
            ax.set_xticks(groups, [str(g) for g in groups])
        ax.set_xlabel("group size G")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return figure


def heatmap_matrix(cells: Sequence[CellSummary]) -> tuple[list[Any], list[Any], list[list[float]]]:
    """(T values, G values, matrix[T index][G index] of mean final O_K; NaN where no run)."""
    steps_values = sorted({c.num_steps for c in cells}, key=sort_key)
    groups = sorted({c.group_size for c in cells}, key=sort_key)
    matrix = [[math.nan] * len(groups) for _ in steps_values]
    for cell in cells:
        matrix[steps_values.index(cell.num_steps)][groups.index(cell.group_size)] = cell.overall_mean
    return steps_values, groups, matrix


def make_heatmap_figure(cells: Sequence[CellSummary]) -> Figure:
    """Heat map of mean final O_K over G (columns) x T (rows), each cell annotated with its value."""
    from matplotlib.figure import Figure

    steps_values, groups, matrix = heatmap_matrix(cells)
    figure = Figure(figsize=(1.6 + 1.2 * len(groups), 1.4 + 0.9 * len(steps_values)), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(matrix, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(groups)), [str(g) for g in groups])
    ax.set_yticks(range(len(steps_values)), [str(t) for t in steps_values])
    ax.set_xlabel("group size G")
    ax.set_ylabel("sampler steps T")
    ax.set_title("final held-out O_K")
    for row, values in enumerate(matrix):
        for column, value in enumerate(values):
            if not math.isnan(value):
                ax.text(column, row, f"{value:.1f}", ha="center", va="center", color="white", fontsize=9)
    figure.colorbar(image, ax=ax)
    return figure


def make_reward_curves_figure(
    runs: Sequence[RunResult], reward_key: str, label_keys: Sequence[str] = ()
) -> Figure:
    """The reward metric against step for every run: one panel per T, colour by G, one line per run.

    Args:
        runs: collected runs.
        reward_key: the metric's name (axis label).
        label_keys: axis keys shown in each line's label besides G (e.g. the seed); the label reads
            ``G=4 seed_everything=1``.
    """
    from matplotlib.figure import Figure

    steps_values = sorted({run.num_steps for run in runs}, key=sort_key)
    groups = sorted({run.group_size for run in runs}, key=sort_key)
    figure = Figure(figsize=(5 * len(steps_values), 4), layout="constrained")
    axes = figure.subplots(1, len(steps_values), squeeze=False)[0]
    palette = [f"C{i % 10}" for i in range(len(groups))]
    for ax, steps in zip(axes, steps_values):
        for run in (r for r in runs if r.num_steps == steps):
            label = " ".join(
                [f"G={run.group_size}"] + [f"{k.rsplit('.', 1)[-1]}={run.axes[k]}" for k in label_keys]
            )
            ax.plot(
                [step for step, _ in run.reward_curve],
                [value for _, value in run.reward_curve],
                color=palette[groups.index(run.group_size)],
                linewidth=1.2,
                label=label,
            )
        ax.set_title(f"T={steps}")
        ax.set_xlabel("step")
        ax.set_ylabel(reward_key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    return figure
