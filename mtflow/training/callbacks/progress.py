"""A progress bar counted in RL iterations."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


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
