"""``<run>/status.json``, the file sweeps read (format: ``mtflow.sweeps.status.RunStatus``)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L

from mtflow.sweeps.status import RunStatus
from mtflow.training.callbacks.rundir import run_dir


class RunStatusWriter(L.Callback):
    """Keep ``<run>/status.json`` current: running / completed / failed, wall clock, samples seen, iteration, error.
    The file's format is ``mtflow.sweeps.status.RunStatus`` (what sweeps read)."""

    def __init__(self) -> None:
        self.started = time.time()
        self.samples_seen = 0

    @property
    def state_key(self) -> str:
        return (
            "RunStatus"  # the class's name before it was renamed: older checkpoints resume their samples_seen
        )

    def _write(self, trainer, pl_module, status: str, error: str | None = None) -> None:
        folder = run_dir(trainer)  # on every rank: run_dir may broadcast
        if not trainer.is_global_zero:
            return
        RunStatus(
            status=status,
            wall_clock_s=round(time.time() - self.started, 3),
            samples_seen=self.samples_seen,
            error=error,
            iteration=getattr(pl_module, "iteration", 0),
        ).write(folder)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.started = time.time()
        self._write(trainer, pl_module, "running")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        result = getattr(pl_module, "last_rollout", None)
        if result is not None:
            self.samples_seen += result.num_trajectories * trainer.world_size
        self._write(trainer, pl_module, "running")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "completed")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._write(trainer, pl_module, "failed", f"{type(exception).__name__}: {exception}")

    def state_dict(self) -> dict[str, Any]:
        return {"samples_seen": self.samples_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.samples_seen = int(state_dict.get("samples_seen", 0))
