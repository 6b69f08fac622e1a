"""LoRA-only checkpoints counted in RL iterations."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L

from mtflow.training.callbacks.rundir import run_dir


class IterationCheckpoint(L.Callback):
    """Save ``last.ckpt`` (and ``iter_XXXXXX.ckpt`` every ``every_n_iterations``) counted in RL iterations, not
    optimiser steps (Lightning's ``global_step`` advances ``updates_per_rollout`` times per iteration)."""

    def __init__(
        self, every_n_iterations: int = 50, keep_every: bool = False, dirpath: str | None = None
    ) -> None:
        """
        Args:
            every_n_iterations: checkpoint period in RL iterations (0: only at the end of training).
            keep_every: also keep a numbered copy at every period (otherwise only ``last.ckpt``).
            dirpath: folder (default: ``<run>/checkpoints``).
        """
        self.every_n_iterations = every_n_iterations
        self.keep_every = keep_every
        self.dirpath = dirpath
        self._saved_iteration: int | None = None

    def _folder(self, trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else run_dir(trainer) / "checkpoints"

    def _save(self, trainer, pl_module) -> None:
        if self._saved_iteration == pl_module.iteration:
            return  # already saved after this iteration's batch (that state resumes mid-epoch correctly)
        self._saved_iteration = pl_module.iteration
        folder = self._folder(trainer)
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
        trainer.strategy.barrier()
        tmp = folder / "last.ckpt.tmp"
        # every rank takes part (FSDP gathers the adapters); optimizer, loops and callbacks are needed to resume
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, folder / "last.ckpt")  # atomic: a crash never leaves a half-written last.ckpt
            if self.keep_every:
                target = folder / f"iter_{pl_module.iteration:06d}.ckpt"
                target.write_bytes((folder / "last.ckpt").read_bytes())
        trainer.strategy.barrier()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_iterations and pl_module.iteration % self.every_n_iterations == 0:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"every_n_iterations": self.every_n_iterations}
