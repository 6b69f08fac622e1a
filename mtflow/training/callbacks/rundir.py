"""The run folder every callback writes into: one versioned folder per run, whatever the logger."""

from __future__ import annotations

from pathlib import Path

import lightning as L

VERSION_PREFIX = "version_"


def _claim_next_version(parent: Path) -> Path:
    """Create and return ``parent/version_N`` for the smallest free N above every existing one. ``mkdir`` without
    ``exist_ok`` is the claim, so two runs starting at once in the same folder still get different versions."""
    parent.mkdir(parents=True, exist_ok=True)
    taken = [
        int(p.name[len(VERSION_PREFIX) :])
        for p in parent.iterdir()
        if p.is_dir() and p.name.startswith(VERSION_PREFIX) and p.name[len(VERSION_PREFIX) :].isdigit()
    ]
    version = max(taken, default=-1) + 1
    while True:
        folder = parent / f"{VERSION_PREFIX}{version}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            version += 1


def _versioned_by_logger(logger) -> bool:
    """CSV and TensorBoard loggers own a versioned ``log_dir`` (``<save_dir>/<name>/version_N``); sweeps pin it
    with an empty name and version. Other loggers (W&B, MLflow, ...) have only a shared ``save_dir``."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    return isinstance(logger, (CSVLogger, TensorBoardLogger))


def run_dir(trainer: L.Trainer) -> Path:
    """The folder of this run.

    - CSV / TensorBoard first: the logger's own ``log_dir`` (``runs/toy/version_0``), as before.
    - another logger first (W&B, MLflow, ...): ``<save_dir>/<name>/version_N``, a new N per run. Lightning's
      ``trainer.log_dir`` is then the logger's unversioned ``save_dir``, so runs would overwrite each other's
      checkpoints, images, ``eval/`` and ``config.yaml``.
    - no logger: ``default_root_dir``.

    Rank 0 picks the folder and broadcasts it, so every rank must call this (never inside ``rank_zero_only``); the
    answer is cached on the trainer.
    """
    cached = getattr(trainer, "_mtflow_run_dir", None)
    if cached is not None:
        return cached
    logger = getattr(trainer, "logger", None)
    if logger is None or _versioned_by_logger(logger):
        folder = str(trainer.log_dir or trainer.default_root_dir)
    else:
        folder = None
        if trainer.is_global_zero:
            root = Path(logger.save_dir or trainer.default_root_dir)
            name = str(logger.name or "mtflow")
            folder = str(_claim_next_version(root / name))
        folder = trainer.strategy.broadcast(folder, src=0)
    cached = Path(folder)
    trainer._mtflow_run_dir = cached
    return cached
