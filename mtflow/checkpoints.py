"""Reading ``mtflow fit`` checkpoints safely: data only (``weights_only``: nothing is unpickled as code), with one
clear line naming the file when it is missing, truncated, corrupt or not a checkpoint at all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint path that cannot be used; the message names the file and what is wrong."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist."""


def read_checkpoint(ckpt_path: str | Path, *, require_mtflow: bool = True) -> dict[str, Any]:
    """The checkpoint's dict (CPU tensors). ``require_mtflow``: refuse files not written by ``mtflow fit``."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise MissingCheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (an interrupted save?), not a checkpoint")
    try:  # weights_only: a checkpoint is data, never code to unpickle
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a truncated, corrupt or foreign file
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(
            f"{path} is not a readable mtflow checkpoint (corrupt, truncated, or not a torch file?): {first_line}"
        ) from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not an mtflow fit checkpoint")
    if require_mtflow and "mtflow" not in checkpoint:
        raise CheckpointError(f"{path} was not written by mtflow fit (no 'mtflow' section)")
    return checkpoint
