"""Reading and writing ``mtflow fit`` checkpoints safely. Reads are data only (``weights_only``: nothing is unpickled
as code), with one clear line naming the file when it is missing, truncated, corrupt or not a checkpoint at all.
Writes are atomic (a temporary file next to the target, renamed over it) and leave nothing behind when they fail."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol


class CheckpointError(ValueError):
    """A checkpoint path that cannot be used; the message names the file and what is wrong."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist."""


def read_checkpoint(ckpt_path: str | Path, *, require_mtflow: bool = True) -> dict[str, Any]:
    """The checkpoint's dict (CPU tensors). ``require_mtflow``: refuse files not written by ``mtflow fit``."""
    path = Path(ckpt_path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file (mtflow writes one .ckpt file)")
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


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only folder, ...); the message names the file. The
    previous checkpoint at that path is left as it was and no temporary file is left behind."""


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` through ``write(file)`` into ``<path>.tmp`` next to it, fsync, then rename over ``path``.

    The rename is atomic because the temporary file is on the target's own filesystem: a reader, a crash or a
    ``kill -9`` sees either the old file or the new one, never half of one. On any failure the temporary file is
    removed; an ``OSError`` is re-raised as ``CheckpointWriteError`` naming the file.
    """
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    handle = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as raw:
            handle = _WriteErrors(raw)
            write(handle)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        if handle is not None and handle.error is not None and not isinstance(error, OSError):
            error = handle.error  # torch.save reports a failed write as "[enforce fail ...] unexpected pos"
        if isinstance(error, OSError) and not isinstance(error, CheckpointWriteError):
            reason = error.strerror or str(error) or type(error).__name__
            kept = " (the previous checkpoint there is intact)" if path.exists() else ""
            raise CheckpointWriteError(
                error.errno, f"cannot write checkpoint {path}: {reason}{kept}"
            ) from error
        raise
    return path


class _WriteErrors:
    """A binary file that remembers the first ``OSError`` of a write (torch's zip writer replaces it by a
    ``RuntimeError`` that does not say the disk is full)."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self.handle.flush()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic writes on the checkpoint's own filesystem and data-only reads
    that refuse a bad file in one line (``read_checkpoint``'s messages) before anything is restored.

    Why not Lightning's own ``_atomic_save``: it buffers the whole checkpoint in memory and commits through an fsspec
    transaction whose temporary file lives in the system temp folder; across filesystems (node-local ``/tmp``, run
    folder on shared storage: the usual cluster layout) the commit is ``shutil.move``, i.e. a copy into the final
    path, so a full disk or a kill during it leaves a truncated ``last.ckpt``. Remote (fsspec URL) paths still go
    through Lightning's implementation.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        write_atomically(path, lambda handle: torch.save(checkpoint, handle))

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            raise CheckpointError(
                f"{path}: weights_only=False is refused: mtflow reads checkpoints as data only (nothing unpickled)"
            )
        if not _is_local_file_protocol(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return read_checkpoint(path)


def use_atomic_checkpoint_io(strategy: Any) -> None:
    """Give ``strategy`` an ``AtomicCheckpointIO`` unless the user configured a checkpoint IO plugin of their own."""
    current = getattr(strategy, "_checkpoint_io", None)
    if current is None or type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
