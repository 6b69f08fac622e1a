"""The expanded sweep: ``<sweep>/sweep.json`` (the plan) and the folder of each run.

Sweep folder layout and the run-folder contract the trainer honours::

    <sweep>/sweep.json               the plan: runs, their axis values, derived values
    <sweep>/runs/<run>/config.yaml   resolved config (what ``mtflow fit --config <run>/config.yaml`` runs)
    <sweep>/runs/<run>/status.json   ``mtflow.sweeps.status.RunStatus``
    <sweep>/runs/<run>/metrics.csv   Lightning CSVLogger format: a ``step`` column and metric columns
    <sweep>/runs/<run>/eval/report.json  ``mtflow.eval.report`` format (final held-out O_K)
    <sweep>/runs/<run>/log.txt       stdout + stderr of the run (local runner)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtflow.sweeps.status import STATUS_FILE, SweepError

PLAN_FORMAT = "mtflow.sweep/1"
PLAN_FILE = "sweep.json"
RUNS_DIR = "runs"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
REPORT_FILE = Path("eval") / "report.json"
LOG_FILE = "log.txt"


@dataclass
class SweepRun:
    """One run of a sweep.

    Attributes:
        index: position in the plan (the Slurm array index).
        name: folder name under ``<sweep>/runs``.
        directory: absolute run folder.
        axes: dotted key -> this run's value on each axis.
        derived: values computed for this run (cost-matched key), dotted key -> value.
    """

    index: int
    name: str
    directory: Path
    axes: dict[str, Any]
    derived: dict[str, Any] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        return self.directory / CONFIG_FILE

    @property
    def status_path(self) -> Path:
        return self.directory / STATUS_FILE

    @property
    def metrics_path(self) -> Path:
        return self.directory / METRICS_FILE

    @property
    def report_path(self) -> Path:
        return self.directory / REPORT_FILE


@dataclass
class SweepPlan:
    """The expanded sweep (``<sweep>/sweep.json``)."""

    name: str
    sweep_dir: Path
    axes: dict[str, list[Any]]
    runs: list[SweepRun]
    grid_source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "name": self.name,
            "grid": self.grid_source,
            "axes": self.axes,
            "runs": [
                {
                    "index": run.index,
                    "name": run.name,
                    "dir": run.directory.relative_to(self.sweep_dir).as_posix(),
                    "axes": run.axes,
                    "derived": run.derived,
                }
                for run in self.runs
            ],
        }


def load_plan(sweep_dir: str | Path) -> SweepPlan:
    """Read ``<sweep_dir>/sweep.json``."""
    sweep_dir = Path(sweep_dir).resolve()
    path = sweep_dir / PLAN_FILE
    if not path.is_file():
        raise SweepError(f"{sweep_dir} is not an expanded sweep: {path} not found (run expand first)")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != PLAN_FORMAT:
        raise SweepError(f"{path}: format {data.get('format')!r}, expected {PLAN_FORMAT!r}")
    runs = [
        SweepRun(
            index=int(r["index"]),
            name=r["name"],
            directory=sweep_dir / r["dir"],
            axes=dict(r["axes"]),
            derived=dict(r.get("derived", {})),
        )
        for r in data["runs"]
    ]
    return SweepPlan(
        name=data["name"], sweep_dir=sweep_dir, axes=data["axes"], runs=runs, grid_source=data.get("grid")
    )
