"""LoRA-only checkpoints through Lightning's ``ModelCheckpoint``, counted in RL iterations.

Being a ``ModelCheckpoint`` is what makes the rest of Lightning work: ``--ckpt_path last`` (Lightning looks for
``last.ckpt`` only through ``ModelCheckpoint`` callbacks), loggers' ``log_model`` (they read its paths after each
save), top-k by a monitored metric, and Slurm auto-requeue. What a checkpoint holds (only the LoRA adapters and the
exact-resume state) is decided by ``FlowRLModule.on_save_checkpoint`` and the strategy; how it is written (atomically)
by ``mtflow.checkpoints.AtomicCheckpointIO``.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from mtflow.checkpoints import use_atomic_checkpoint_io
from mtflow.training.callbacks.rundir import run_dir

log = logging.getLogger(__name__)

_LAST = re.compile(r"^last(-v\d+)?\.ckpt$")
_HPC = re.compile(r"^hpc_ckpt_\d+\.ckpt$")


def resume_candidates(
    checkpoint_dir: str | Path | None,
    versions_root: str | Path | None = None,
    default_root_dir: str | Path | None = None,
) -> list[Path]:
    """Every checkpoint ``--ckpt_path last`` may mean: ``last.ckpt`` in ``checkpoint_dir``, in each
    ``<versions_root>/version_*/checkpoints/`` (a logger that numbers its runs: the resumed run gets a new version
    folder, its predecessors hold the checkpoints) and Lightning's Slurm-requeue checkpoints ``hpc_ckpt_N.ckpt`` in
    ``default_root_dir``. The newest file is the one to resume."""
    found: list[Path] = []
    folders = [Path(checkpoint_dir)] if checkpoint_dir else []
    if versions_root is not None and Path(versions_root).is_dir():
        folders += [v / "checkpoints" for v in sorted(Path(versions_root).glob("version_*")) if v.is_dir()]
    for folder in folders:
        if folder.is_dir():
            found += [p for p in folder.iterdir() if _LAST.match(p.name) and p.is_file()]
    if default_root_dir is not None and Path(default_root_dir).is_dir():
        found += [p for p in Path(default_root_dir).iterdir() if _HPC.match(p.name) and p.is_file()]
    return sorted(set(found))


def newest_checkpoint(candidates: list[Path]) -> Path | None:
    """The most recently written of ``candidates`` (None if there are none)."""
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


class IterationCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` counted in RL iterations: ``last.ckpt`` every ``every_n_iterations`` and at
    the end of training, optionally the top-k checkpoints by a monitored metric (e.g. ``reward/mean``, mode
    ``max``), named ``iter_<iteration>.ckpt``. Lightning's step counter cannot be used: with manual optimisation
    ``global_step`` advances ``updates_per_rollout`` times per iteration, and not at all when an update is skipped.

    Under Slurm with auto-requeue (``#SBATCH --signal=SIGUSR1@90 --requeue``), the requeue signal is acted on at the
    end of the RL iteration in progress, so the requeued job resumes exactly where this one stopped."""

    def __init__(
        self,
        every_n_iterations: int = 50,
        dirpath: str | None = None,
        filename: str = "iter_{iteration:06d}",
        save_last: bool | Literal["link"] = True,
        save_top_k: int = 0,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "max",
        verbose: bool = False,
    ) -> None:
        """
        Args:
            every_n_iterations: checkpoint period in RL iterations (0: only at the end of training).
            dirpath: folder (default: ``<run>/checkpoints``).
            filename: name of the top-k checkpoints; ``{iteration}`` and logged metrics may be used.
            save_last: keep ``last.ckpt`` current ("link": a symbolic link to the newest top-k file).
            save_top_k: numbered checkpoints kept: 0 none, -1 all, k the best k by ``monitor`` (1 without a
                monitor: the newest).
            monitor: metric that ranks the top-k checkpoints, e.g. ``reward/mean`` (None: by recency).
            mode: "max" keeps the highest values of ``monitor``, "min" the lowest.
            verbose: log every save decision.
        """
        if every_n_iterations < 0:
            raise ValueError(f"every_n_iterations must be >= 0, got {every_n_iterations}")
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            verbose=verbose,
            save_last=save_last,
            save_top_k=save_top_k,
            mode=mode,
            auto_insert_metric_name=False,
            every_n_train_steps=0,
            every_n_epochs=0,
            enable_version_counter=False,  # last.ckpt is always the last one, never last-v1.ckpt
        )
        self.every_n_iterations = every_n_iterations
        self._dirpath_given = dirpath is not None
        self._last_iteration_saved: int | None = None
        self._requeue_signal: signal.Signals | None = None
        self._requeue_requested = False
        self._requeued = False

    # ------------------------------------------------------------------ when to save
    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not self._dirpath_given:
            # <run>/checkpoints: Lightning's default is <save_dir>/<project>/<run id>/checkpoints for W&B and
            # other loggers without a versioned log_dir, i.e. outside the run folder everything else writes into
            self.dirpath = str(run_dir(trainer) / "checkpoints")
        use_atomic_checkpoint_io(trainer.strategy)  # before anything is restored or saved

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._defer_requeue_to_iteration_end(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_iterations and pl_module.iteration % self.every_n_iterations == 0:
            self._save_iteration(trainer)
        self._requeue_if_signalled(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass  # periods are counted in iterations; an epoch end is no reason to save

    def on_validation_end(self, trainer, pl_module) -> None:
        # a top-k save that waited for a validation metric (monitor: "val/...")
        if self._defer_save_until_validation and trainer.state.fn == TrainerFn.FITTING:
            if not trainer.sanity_checking:
                self._defer_save_until_validation = False
                self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer, pl_module) -> None:
        self._save_iteration(
            trainer
        )  # the state training ended with (unless this iteration is saved already)

    def _save_iteration(self, trainer) -> None:
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is not None and self.monitor not in candidates and self.save_top_k:
            self._defer_save_until_validation = True  # ranked once validation has logged the metric
        else:
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def _should_skip_saving_checkpoint(self, trainer) -> bool:
        return (
            bool(trainer.fast_dev_run)
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
            or self._last_iteration_saved == _iteration(trainer)
        )

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._last_iteration_saved = _iteration(trainer)

    def _monitor_candidates(self, trainer) -> dict[str, torch.Tensor]:
        candidates = super()._monitor_candidates(trainer)
        candidates["iteration"] = torch.tensor(_iteration(trainer))
        return candidates

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath", self.dirpath) != self.dirpath and not self.save_top_k:
            return  # resumed into a new run folder, no top-k to carry over: nothing to restore (and no warning)
        super().load_state_dict(state_dict)

    # ------------------------------------------------------------------ --ckpt_path last
    def _find_last_checkpoints(self, trainer) -> set[str]:
        versions_root = None
        logger = trainer.loggers[0] if trainer.loggers else None
        if not self._dirpath_given and logger is not None and isinstance(logger.version, int):
            versions_root = Path(logger.save_dir or trainer.default_root_dir) / str(logger.name)
        found = resume_candidates(None, versions_root, trainer.default_root_dir)
        return super()._find_last_checkpoints(trainer) | {str(p) for p in found}

    # ------------------------------------------------------------------ Slurm auto-requeue
    def _defer_requeue_to_iteration_end(self, trainer) -> None:
        """Lightning saves the requeue checkpoint inside the signal handler, wherever the main thread happens to be:
        in the middle of an RL update (between two optimiser steps, say) that state belongs to no iteration boundary,
        and the requeued job would not continue this one exactly. So the signal is only noted here and acted on by
        ``_requeue_if_signalled`` at the end of the iteration."""
        environment = getattr(trainer._accelerator_connector, "cluster_environment", None)
        if not isinstance(environment, SLURMEnvironment) or not environment.auto_requeue:
            return
        if environment.requeue_signal is None or threading.current_thread() is not threading.main_thread():
            return
        self._requeue_signal = environment.requeue_signal
        self._requeue_requested = self._requeued = False
        signal.signal(
            environment.requeue_signal, self._note_requeue_signal
        )  # Lightning restores it at teardown

    def _note_requeue_signal(self, signum: int, frame: Any) -> None:
        self._requeue_requested = True

    def _requeue_if_signalled(self, trainer) -> None:
        if self._requeue_signal is None or self._requeued:
            return
        # every rank decides together (the signal reaches the ranks at slightly different times)
        if not trainer.strategy.reduce_boolean_decision(self._requeue_requested, all=False):
            return
        self._requeued = True
        log.warning(
            "requeue signal received: saving the state after iteration %d and requeueing the job",
            _iteration(trainer),
        )
        # Lightning's own handler: flushes the loggers, saves <default_root_dir>/hpc_ckpt_N.ckpt (every rank takes
        # part), and rank 0 runs `scontrol requeue`; the requeued job resumes from that file by itself.
        trainer._signal_connector._slurm_sigusr_handler_fn(self._requeue_signal, None)


def _iteration(trainer) -> int:
    return int(getattr(trainer.lightning_module, "iteration", trainer.global_step))
