"""Callbacks a user of a research trainer expects: rollout image grids, iteration-based LoRA checkpoints and a
``status.json`` that sweeps read."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import RichProgressBar

from mtflow.eval.report import chain_grid
from mtflow.sweeps.status import RunStatus


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


class RunStatusWriter(L.Callback):
    """Keep ``<run>/status.json`` current: running / completed / failed, wall clock, samples seen, iteration, error.
    The file's format is ``mtflow.sweeps.status.RunStatus`` (what sweeps read)."""

    def __init__(self) -> None:
        self.started = time.time()
        self.samples_seen = 0

    @property
    def state_key(self) -> str:
        return (
            "RunStatus"  # the class's name before it was renamed: older checkpoints resume their samples_seen
        )

    def _write(self, trainer, pl_module, status: str, error: str | None = None) -> None:
        folder = run_dir(trainer)  # on every rank: run_dir may broadcast
        if not trainer.is_global_zero:
            return
        RunStatus(
            status=status,
            wall_clock_s=round(time.time() - self.started, 3),
            samples_seen=self.samples_seen,
            error=error,
            iteration=getattr(pl_module, "iteration", 0),
        ).write(folder)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.started = time.time()
        self._write(trainer, pl_module, "running")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        result = getattr(pl_module, "last_rollout", None)
        if result is not None:
            self.samples_seen += result.num_trajectories * trainer.world_size
        self._write(trainer, pl_module, "running")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "completed")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._write(trainer, pl_module, "failed", f"{type(exception).__name__}: {exception}")

    def state_dict(self) -> dict[str, Any]:
        return {"samples_seen": self.samples_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.samples_seen = int(state_dict.get("samples_seen", 0))


class HeldOutEvaluation(L.Callback):
    """Evaluate held-out chains before RL (the prior) and after it, and print the per-turn before/after table
    (cumulative success C_k, consistency CC_k, overall O_k, marginal M_k). Writes ``<run>/eval/``:
    ``before_after.json``, ``before_after.md`` and the report of the trained model (``report.json`` ...)."""

    def __init__(self, num_chains: int = 64, batch_size: int = 32, enabled: bool = True) -> None:
        """
        Args:
            num_chains: held-out chains evaluated (the first ones of the data module's validation split).
            batch_size: chains per evaluation rollout.
            enabled: switch the evaluation off without removing the callback.
        """
        self.num_chains = num_chains
        self.batch_size = batch_size
        self.enabled = enabled
        self.before: dict[str, Any] | None = None

    def _evaluate(self, trainer, pl_module, label: str):
        from mtflow.eval.evaluate import evaluate_chains

        source = trainer.datamodule.sources.get("val") if trainer.datamodule is not None else None
        if source is None:
            return None
        chains = [source[i] for i in range(min(self.num_chains, len(source)))]
        # every rank evaluates the same chains (sharded models need equal forward calls on all ranks)
        pl_module.policy.eval()
        report, raw = evaluate_chains(
            pl_module.policy,
            pl_module.scorer,
            chains,
            conditions=["model"],
            model_adapter=pl_module.eval_adapter,
            num_steps=pl_module.eval_num_steps,
            batch_size=self.batch_size,
            forward_batch_size=pl_module.rollout_config.forward_batch_size,
            seed=pl_module.seed,
            threshold=pl_module.eval_config.threshold,
            num_bootstrap=200,
            # a bar on rank 0 only, and only when the run shows one (enable_progress_bar=false stays quiet)
            progress=label if trainer.is_global_zero and trainer.progress_bar_callback is not None else None,
        )
        return report, raw

    def on_train_start(self, trainer, pl_module) -> None:
        folder = run_dir(trainer) / "eval"
        if not self.enabled or self.before is not None:
            return  # resumed: keep the prior's numbers from the checkpoint
        result = self._evaluate(trainer, pl_module, "held-out before RL")
        if result is None:
            return
        self.before = result[0].to_dict()
        if trainer.is_global_zero:
            from mtflow.eval.evaluate import turn_table
            from mtflow.eval.report import EvalReport

            folder.mkdir(parents=True, exist_ok=True)
            print(f"\nheld-out chains before RL (iteration {pl_module.iteration}):")
            print(turn_table(EvalReport.from_dict(self.before)))

    def on_train_end(self, trainer, pl_module) -> None:
        folder = run_dir(trainer) / "eval"
        if not self.enabled or self.before is None:
            return
        result = self._evaluate(trainer, pl_module, "held-out after RL")
        if result is None or not trainer.is_global_zero:
            return
        from mtflow.eval.evaluate import before_after_table
        from mtflow.eval.report import EvalReport, write_report

        after, raw = result
        before = EvalReport.from_dict(self.before)
        table = before_after_table(before, after)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "before_after.md").write_text(table + "\n")
        (folder / "before_after.json").write_text(
            json.dumps({"before": before.to_dict(), "after": after.to_dict()}, indent=2, allow_nan=False)
        )
        # the run-folder contract: <run>/eval/report.json, and chains.png captioned with per-turn scores
        model = raw["model"]
        write_report(folder, after, grid_items=model.items, grid_scores=model.item_scores())
        print(f"\nheld-out chains, before RL -> after {pl_module.iteration} iterations:\n{table}")
        print(f"(written to {folder})")

    def state_dict(self) -> dict[str, Any]:
        return {"before": self.before}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = state_dict.get("before")


class IterationProgressBar(RichProgressBar):
    """Rich progress counted in RL iterations: the bar ends at ``max_iterations`` (not at the end of a 4096-chain
    epoch), and shows the latest fused reward next to the loss."""

    def _iterations_left_in_epoch(self) -> int | float:
        batches = super().total_train_batches
        module = self.trainer.lightning_module
        limit = getattr(module, "max_iterations", None)
        if limit is None or not hasattr(module, "iteration"):
            return batches
        done_in_epoch = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready
        return min(batches, max(limit - module.iteration, 0) + done_in_epoch)

    @property
    def total_train_batches(self) -> int | float:
        return self._iterations_left_in_epoch()

    def _get_train_description(self, current_epoch: int) -> str:
        description = "RL iterations" if current_epoch == 0 else f"RL iterations (epoch {current_epoch})"
        return f"{description:{len(self.validation_description)}}"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        reward = trainer.callback_metrics.get("reward/mean")
        if reward is not None:
            items["reward"] = f"{float(reward):.3f}"
        return items
