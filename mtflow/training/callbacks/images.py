"""Rollout image grids for the run folder and the loggers that take images."""

from __future__ import annotations

import lightning as L
import numpy as np

from mtflow.eval.report import chain_grid
from mtflow.training.callbacks.rundir import run_dir


class RolloutImageLogger(L.Callback):
    """Every ``every_n_iterations``, save a grid of the latest rollout (one row per trajectory: source, turn 1..K,
    each turn captioned with the judge's IF / CC and its instruction, as ``eval/chains.png``) and send it to the
    loggers that take images (TensorBoard, W&B)."""

    def __init__(self, every_n_iterations: int = 10, max_rows: int = 4, cell_size: int = 160) -> None:
        """
        Args:
            every_n_iterations: log a grid after every this many RL iterations (0 disables).
            max_rows: trajectories shown (the first members of the first groups, so a group's spread is visible).
            cell_size: each image is fitted into a square of this many pixels (small images are magnified).
        """
        self.every_n_iterations = every_n_iterations
        self.max_rows = max_rows
        self.cell_size = cell_size

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        folder = run_dir(trainer) / "images"  # on every rank: run_dir may broadcast
        preview = getattr(pl_module, "last_rollout", None)
        if not trainer.is_global_zero or not self.every_n_iterations or preview is None:
            return
        if pl_module.iteration % self.every_n_iterations:
            return
        grid, _ = chain_grid(
            preview.items(), preview.scores, max_chains=self.max_rows, cell_size=self.cell_size
        )
        folder.mkdir(parents=True, exist_ok=True)
        grid.save(folder / f"rollout_iter{pl_module.iteration:06d}.png")
        step = pl_module.iteration
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):  # TensorBoard
                experiment.add_image("rollout", np.asarray(grid), step, dataformats="HWC")
            elif hasattr(logger, "log_image"):  # W&B
                logger.log_image("rollout", [grid], step=step)
