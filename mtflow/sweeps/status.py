"""``<run>/status.json``, the one definition of the file: written by the trainer (``RunStatusWriter`` callback in
``mtflow.training.callbacks``) while it runs, by the sweep runners when a run could not write it, and read by
``collect``::

    {"status": "completed" | "failed" | "running", "wall_clock_s": 12.5, "samples_seen": 256,
     "iteration": 8,            # RL iterations done (written by the trainer; absent when a runner wrote the file)
     "error": "..."}            # why a failed run failed (absent otherwise)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATUS_FILE = "status.json"
STATUS_VALUES = ("completed", "failed", "running")


class SweepError(ValueError):
    """A grid, plan or run folder is not usable; the message names the file, key or run."""


@dataclass
class RunStatus:
    """``<run>/status.json``: what the trainer (or the runner, when the trainer could not) recorded.

    Attributes:
        status: ``completed``, ``failed`` or ``running``.
        wall_clock_s: seconds the run took (so far).
        samples_seen: training samples (trajectories) consumed.
        error: why a failed run failed.
        iteration: RL iterations done (None: not known, e.g. a runner recorded a run that never started).
    """

    status: str
    wall_clock_s: float = 0.0
    samples_seen: int = 0
    error: str | None = None
    iteration: int | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUS_VALUES:
            raise SweepError(f"status must be one of {STATUS_VALUES}, got {self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "status": self.status,
            "wall_clock_s": self.wall_clock_s,
            "samples_seen": self.samples_seen,
        }
        if self.iteration is not None:
            data["iteration"] = self.iteration
        if self.error is not None:
            data["error"] = self.error
        return data

    def write(self, run_dir: str | Path) -> Path:
        """Write ``<run_dir>/status.json`` atomically (a reader never sees half a file); returns its path."""
        path = Path(run_dir) / STATUS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, path)
        return path

    @classmethod
    def read(cls, run_dir: str | Path) -> RunStatus | None:
        """The run's status, or None when it has no status.json; SweepError when the file is malformed."""
        path = Path(run_dir) / STATUS_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            iteration = data.get("iteration")
            return cls(
                status=data["status"],
                wall_clock_s=float(data.get("wall_clock_s", 0.0)),
                samples_seen=int(data.get("samples_seen", 0)),
                error=data.get("error"),
                iteration=None if iteration is None else int(iteration),
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
            raise SweepError(f"{path}: malformed status file ({type(error).__name__}: {error})") from error


def mark_failed(run_dir: str | Path, error: str, wall_clock_s: float | None = None) -> RunStatus:
    """Record a failure unless the trainer already did (its own error message is kept); samples seen and the
    iteration the trainer recorded are kept."""
    try:
        previous = RunStatus.read(run_dir)
    except SweepError:
        previous = None
    if previous is not None and previous.status == "failed":
        return previous
    if wall_clock_s is None:
        wall_clock_s = previous.wall_clock_s if previous else 0.0
    status = RunStatus(
        status="failed",
        wall_clock_s=wall_clock_s,
        samples_seen=previous.samples_seen if previous else 0,
        error=error,
        iteration=previous.iteration if previous else None,
    )
    status.write(run_dir)
    return status
