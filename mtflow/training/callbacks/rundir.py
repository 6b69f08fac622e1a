"""The run folder every callback writes into."""

from __future__ import annotations

from pathlib import Path

import lightning as L


def run_dir(trainer: L.Trainer) -> Path:
    """The folder of this run: the logger's ``log_dir`` (e.g. ``runs/toy/version_0``) or ``default_root_dir``.

    ``trainer.log_dir`` broadcasts from rank 0, so every rank must call this (never inside ``rank_zero_only``); the
    answer is cached on the trainer.
    """
    cached = getattr(trainer, "_mtflow_run_dir", None)
    if cached is None:
        cached = Path(trainer.log_dir or trainer.default_root_dir)
        trainer._mtflow_run_dir = cached
    return cached
