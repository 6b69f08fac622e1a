"""``<run>/status.json``, the file sweeps read (format: ``mtflow.sweeps.status.RunStatus``)."""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mtflow.sweeps.status import RunStatus
from mtflow.training.callbacks.rundir import run_dir


class RunStatusWriter(L.Callback):
    """Keep ``<run>/status.json`` current: running / completed / failed, wall clock, samples seen, iteration, error.
    The file's format is ``mtflow.sweeps.status.RunStatus`` (what sweeps read). The counters are the module's own
    (``iteration``, ``samples_seen``), the same values its checkpoints hold: one source of truth."""

    def __init__(self) -> None:
        self.started = time.time()

    def _write(self, trainer, pl_module, status: str, error: str | None = None) -> None:
        folder = run_dir(trainer)  # on every rank: run_dir may broadcast
        if not trainer.is_global_zero:
            return
        RunStatus(
            status=status,
            wall_clock_s=round(time.time() - self.started, 3),
            samples_seen=int(getattr(pl_module, "samples_seen", 0)),
            error=error,
            iteration=getattr(pl_module, "iteration", 0),
        ).write(folder)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.started = time.time()
        self._write(trainer, pl_module, "running")

    def on_train_start(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "running")  # a resumed run: the counters its checkpoint restored

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._write(trainer, pl_module, "running")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "completed")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            reason = (
                f"stopped by SIGTERM after iteration {getattr(pl_module, 'iteration', 0)} (preempted, time limit or "
                "requeued); resume with --ckpt_path last"
            )
        else:
            reason = f"{type(exception).__name__}: {exception}"
        self._write(trainer, pl_module, "failed", reason)
