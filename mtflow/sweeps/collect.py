"""Reading the run folders of an expanded sweep into one table (``summary.csv``, ``summary.md``) and plots; collect
refuses, naming each run, when any run is missing, failed or still running."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtflow.sweeps.grid import DEFAULT_GROUP_KEY, DEFAULT_STEPS_KEY, config_value, load_yaml
from mtflow.sweeps.plan import SweepPlan, load_plan
from mtflow.sweeps.plots import (
    make_heatmap_figure,
    make_metric_vs_group_figure,
    make_reward_curves_figure,
    sort_key,
)
from mtflow.sweeps.status import RunStatus, SweepError


class SweepIncompleteError(SweepError):
    """``collect`` found runs that are missing, failed or unfinished; ``problems`` maps run name -> reason."""

    def __init__(self, sweep_dir: Path, problems: Mapping[str, str]):
        self.problems = dict(problems)
        listed = "\n".join(f"  {name}: {reason}" for name, reason in self.problems.items())
        super().__init__(
            f"cannot collect sweep {sweep_dir}: {len(self.problems)} run(s) not usable:\n{listed}"
        )


@dataclass
class RunResult:
    """One collected run.

    Attributes:
        name: run folder name.
        axes: the run's axis values.
        group_size: G read from its resolved config.
        num_steps: T read from its resolved config.
        final_overall: the primary condition's O at the last turn (held-out evaluation), [0, 100].
        final_reward: last logged value of the reward metric.
        wall_clock_s, samples_seen: from status.json.
        reward_curve: (step, value) pairs of the reward metric.
        derived: values computed for this run (e.g. the cost-matched batch size).
    """

    name: str
    axes: dict[str, Any]
    group_size: Any
    num_steps: Any
    final_overall: float
    final_reward: float
    wall_clock_s: float
    samples_seen: int
    reward_curve: list[tuple[float, float]]
    derived: dict[str, Any] = field(default_factory=dict)


@dataclass
class CellSummary:
    """Mean and sample std (ddof 1; 0 for one run) over the runs sharing one (G, T) cell, e.g. seeds."""

    group_size: Any
    num_steps: Any
    num_runs: int
    overall_mean: float
    overall_std: float
    reward_mean: float
    reward_std: float
    wall_clock_mean_s: float
    samples_seen_mean: float


@dataclass
class SweepSummary:
    """What ``collect`` produced (``files``: name -> written path)."""

    runs: list[RunResult]
    cells: list[CellSummary]
    files: dict[str, Path]


def read_metrics_csv(path: Path, key: str) -> list[tuple[float, float]]:
    """(step, value) of every row of a CSVLogger ``metrics.csv`` where ``key`` is logged (empty cells skipped)."""
    with path.open("r", encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        if "step" not in columns or key not in columns:
            missing = [c for c in ("step", key) if c not in columns]
            raise SweepError(f"{path}: column(s) {missing} missing (columns: {columns})")
        points = []
        for row in reader:
            if row.get(key) not in (None, ""):
                points.append((float(row["step"]), float(row[key])))
    return points


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarise_cells(runs: Sequence[RunResult]) -> list[CellSummary]:
    """Group runs by (G, T) and average everything else away (seeds, other axes)."""
    cells: dict[tuple[Any, Any], list[RunResult]] = {}
    for run in runs:
        cells.setdefault((run.group_size, run.num_steps), []).append(run)
    summaries = []
    for (group, steps), members in sorted(
        cells.items(), key=lambda item: (sort_key(item[0][1]), sort_key(item[0][0]))
    ):
        overall = _mean_std([m.final_overall for m in members])
        reward = _mean_std([m.final_reward for m in members])
        summaries.append(
            CellSummary(
                group_size=group,
                num_steps=steps,
                num_runs=len(members),
                overall_mean=overall[0],
                overall_std=overall[1],
                reward_mean=reward[0],
                reward_std=reward[1],
                wall_clock_mean_s=sum(m.wall_clock_s for m in members) / len(members),
                samples_seen_mean=sum(m.samples_seen for m in members) / len(members),
            )
        )
    return summaries


def _format(value: Any, digits: int = 2) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def render_summary_markdown(plan: SweepPlan, runs: Sequence[RunResult], cells: Sequence[CellSummary]) -> str:
    """Per-run table and per-(G, T) table (mean +- std over the runs in the cell)."""
    axis_keys = list(plan.axes)
    derived_keys = sorted({k for r in runs for k in r.derived})
    header = ["run", *axis_keys, *derived_keys, "final O_K", "final reward", "wall-clock s", "samples seen"]
    lines = [f"# Sweep {plan.name}", "", f"{len(runs)} runs.", "", "| " + " | ".join(header) + " |"]
    lines.append("| " + " | ".join("---" for _ in header) + " |")
    for run in runs:
        cells_text = [
            run.name,
            *(_format(run.axes[k]) for k in axis_keys),
            *(_format(run.derived.get(k, "")) for k in derived_keys),
            _format(run.final_overall),
            _format(run.final_reward, 4),
            _format(run.wall_clock_s, 1),
            str(run.samples_seen),
        ]
        lines.append("| " + " | ".join(cells_text) + " |")
    lines += [
        "",
        "## Per (G, T), mean +- std over the runs in each cell",
        "",
        "| G | T | runs | final O_K | final reward | wall-clock s | samples seen |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cell in cells:
        lines.append(
            f"| {cell.group_size} | {cell.num_steps} | {cell.num_runs} | "
            f"{_format(cell.overall_mean)} +- {_format(cell.overall_std)} | "
            f"{_format(cell.reward_mean, 4)} +- {_format(cell.reward_std, 4)} | "
            f"{_format(cell.wall_clock_mean_s, 1)} | {_format(cell.samples_seen_mean, 0)} |"
        )
    return "\n".join(lines) + "\n"


def collect(
    sweep_dir: str | Path,
    *,
    out_dir: str | Path | None = None,
    group_key: str = DEFAULT_GROUP_KEY,
    steps_key: str = DEFAULT_STEPS_KEY,
    reward_key: str = "reward/mean",
) -> SweepSummary:
    """Read every run of an expanded sweep into one table and plots.

    Args:
        sweep_dir: the sweep folder (with ``sweep.json``).
        out_dir: where to write ``summary.csv``, ``summary.md``, ``metric_vs_G.png``, ``heatmap_G_T.png``,
            ``reward_curves.png`` (default: the sweep folder).
        group_key: dotted config key of G (read from each run's resolved config).
        steps_key: dotted config key of T.
        reward_key: metrics.csv column of the training reward.

    Raises:
        SweepIncompleteError naming every run that is missing, failed, still running or lacks its metrics or
        evaluation report.
    """
    from mtflow.eval.report import read_report

    plan = load_plan(sweep_dir)
    problems: dict[str, str] = {}
    results: list[RunResult] = []
    for run in plan.runs:
        if not run.directory.is_dir():
            problems[run.name] = f"run folder missing ({run.directory})"
            continue
        try:
            status = RunStatus.read(run.directory)
        except SweepError as error:
            problems[run.name] = str(error)
            continue
        if status is None:
            problems[run.name] = f"never ran: no {run.status_path}"
            continue
        if status.status != "completed":
            detail = f": {status.error}" if status.error else ""
            problems[run.name] = f"status {status.status!r}{detail}"
            continue
        try:
            config = load_yaml(run.config_path)
            group, steps = config_value(config, group_key), config_value(config, steps_key)
        except KeyError as error:
            problems[run.name] = f"{run.config_path} has no {error.args[0]!r}"
            continue
        except SweepError as error:
            problems[run.name] = str(error)
            continue
        if not run.metrics_path.is_file():
            problems[run.name] = f"completed but {run.metrics_path} is missing"
            continue
        try:
            curve = read_metrics_csv(run.metrics_path, reward_key)
        except (SweepError, ValueError) as error:
            problems[run.name] = str(error)
            continue
        if not curve:
            problems[run.name] = f"{run.metrics_path} has no {reward_key!r} value"
            continue
        if not run.report_path.is_file():
            problems[run.name] = f"completed but the held-out evaluation {run.report_path} is missing"
            continue
        try:
            report = read_report(run.report_path)
        except (OSError, ValueError) as error:
            problems[run.name] = str(error)
            continue
        results.append(
            RunResult(
                name=run.name,
                axes=run.axes,
                group_size=group,
                num_steps=steps,
                final_overall=report.final_overall,
                final_reward=curve[-1][1],
                wall_clock_s=status.wall_clock_s,
                samples_seen=status.samples_seen,
                reward_curve=curve,
                derived=run.derived,
            )
        )
    if problems:
        raise SweepIncompleteError(plan.sweep_dir, problems)

    out_dir = Path(out_dir) if out_dir is not None else plan.sweep_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = summarise_cells(results)
    files = {
        "csv": out_dir / "summary.csv",
        "markdown": out_dir / "summary.md",
        "metric_vs_G": out_dir / "metric_vs_G.png",
        "heatmap": out_dir / "heatmap_G_T.png",
        "reward_curves": out_dir / "reward_curves.png",
    }
    axis_keys = list(plan.axes)
    derived_keys = sorted({k for r in results for k in r.derived})
    with files["csv"].open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["run", *axis_keys, *derived_keys, "group_size", "num_steps", "final_overall", "final_reward",
             "wall_clock_s", "samples_seen"]
        )  # fmt: skip
        for r in results:
            writer.writerow(
                [r.name, *(r.axes[k] for k in axis_keys), *(r.derived.get(k, "") for k in derived_keys),
                 r.group_size, r.num_steps, r.final_overall, r.final_reward, r.wall_clock_s, r.samples_seen]
            )  # fmt: skip
    files["markdown"].write_text(render_summary_markdown(plan, results, cells), encoding="utf-8")
    make_metric_vs_group_figure(cells).savefig(files["metric_vs_G"], dpi=100)
    make_heatmap_figure(cells).savefig(files["heatmap"], dpi=100)
    other_keys = [k for k in axis_keys if k not in (group_key, steps_key)]
    make_reward_curves_figure(results, reward_key, other_keys).savefig(files["reward_curves"], dpi=100)
    return SweepSummary(runs=results, cells=cells, files=files)
