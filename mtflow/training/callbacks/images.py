"""Rollout image grids for the run folder and the loggers, and the helpers that send images and tables to any
Lightning logger that takes them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from PIL import Image

from mtflow.eval.report import chain_grid
from mtflow.reward.base import ScoreBatch, ScoringItem
from mtflow.training.callbacks.rundir import run_dir


def log_image(trainer: L.Trainer, tag: str, image: Image.Image, step: int) -> None:
    """Send ``image`` to every logger that takes images: TensorBoard (``add_image``), W&B (``log_image``)."""
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):  # TensorBoard
            experiment.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        elif hasattr(logger, "log_image"):  # W&B
            logger.log_image(tag, [image], step=step)


def log_table(
    trainer: L.Trainer, tag: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int
) -> None:
    """Send a table to every logger that takes one: W&B (``log_table``), TensorBoard (as Markdown text)."""
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(logger, "log_table"):  # W&B
            logger.log_table(tag, columns=list(columns), data=[list(r) for r in rows], step=step)
        elif hasattr(experiment, "add_text"):  # TensorBoard renders Markdown tables in its text tab
            header = "| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns)
            body = "\n".join(
                "| " + " | ".join("n/a" if c is None else str(c) for c in row) + " |" for row in rows
            )
            experiment.add_text(tag, f"{header}\n{body}", step)


def log_metrics(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    """Send scalars to every logger (outside a LightningModule hook, where ``self.log`` is not allowed)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
        logger.save()


def save_chains(
    folder: Path, name: str, items: Sequence[ScoringItem], scores: ScoreBatch | None, **info: Any
) -> Path:
    """Write each chain's images (``<name>/row{r}_turn{k}.png``, turn 0 = source) and ``<name>.json`` with their
    ids, instructions and per-turn IF / CC (null where unscored): what ``mtflow runs gallery`` shows."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).mkdir(exist_ok=True)
    rows = []
    for r, item in enumerate(items):
        images = []
        for k, image in enumerate([item.source, *item.outputs]):
            relative = f"{name}/row{r}_turn{k}.png"
            image.save(folder / relative)
            images.append(relative)
        turns = []
        for k, instruction in enumerate(item.instructions):
            scored = scores is not None and bool(scores.scored[r, k])
            turns.append(
                {
                    "instruction": instruction,
                    "if": float(scores.instruction_following[r, k]) if scored else None,
                    "cc": float(scores.content_consistency[r, k]) if scored else None,
                }
            )
        rows.append({"item_id": item.item_id, "chain_id": item.chain_id, "images": images, "turns": turns})
    path = folder / f"{name}.json"
    path.write_text(json.dumps({**info, "chains": rows}, indent=2))
    return path


class RolloutImageLogger(L.Callback):
    """Every ``every_n_iterations``, save a grid of the latest rollout (one row per trajectory: source, turn 1..K,
    each turn captioned with the judge's IF / CC and its instruction, as ``eval/chains.png``), the rows' images
    with their scores (``images/rollout_iterN.json``, for ``mtflow runs gallery``), and send the grid to the
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
        items = preview.items()[: self.max_rows]
        scores = None if preview.scores is None else preview.scores.first(len(items))
        grid, _ = chain_grid(items, scores, max_chains=self.max_rows, cell_size=self.cell_size)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"rollout_iter{pl_module.iteration:06d}"
        grid.save(folder / f"{name}.png")
        save_chains(folder, name, items, scores, iteration=pl_module.iteration)
        log_image(trainer, "rollout", grid, pl_module.iteration)
