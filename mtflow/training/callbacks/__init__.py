"""Callbacks a user of a research trainer expects: rollout image grids, iteration-based LoRA checkpoints and a
``status.json`` that sweeps read."""

from mtflow.training.callbacks.checkpoint import IterationCheckpoint
from mtflow.training.callbacks.heldout import HeldOutEvaluation
from mtflow.training.callbacks.images import RolloutImageLogger
from mtflow.training.callbacks.progress import IterationProgressBar
from mtflow.training.callbacks.rundir import run_dir
from mtflow.training.callbacks.status import RunStatusWriter

__all__ = [
    "HeldOutEvaluation",
    "IterationCheckpoint",
    "IterationProgressBar",
    "RolloutImageLogger",
    "RunStatusWriter",
    "run_dir",
]
