"""The run's resolved config: ``<run>/config.yaml`` and every logger's hyperparameters."""

from __future__ import annotations

from typing import Any

import yaml
from lightning.pytorch.cli import SaveConfigCallback

from mtflow.training.callbacks.rundir import run_dir


class RunConfigSaver(SaveConfigCallback):
    """LightningCLI's config saver, writing into ``run_dir`` (Lightning's writes into ``trainer.log_dir``, which
    is unversioned for W&B and shared by every run) and sending the whole resolved config (policy, scorer,
    algorithm, data, trainer, callbacks) to every logger as its hyperparameters, plus ``run_dir``.

    Lightning would log only the module's own hyperparameters, which leave out the policy (base model, LoRA rank,
    resolution) and the judge; logging both would give TensorBoard two competing hparams sessions, so the
    module's and data module's automatic logging is switched off in favour of this superset."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        folder = run_dir(trainer)  # on every rank: it broadcasts
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            self.parser.save(
                self.config,
                folder / self.config_filename,
                skip_none=False,
                overwrite=self.overwrite,
                multifile=self.multifile,
            )
            params = logged_hyperparameters(self.parser.dump(self.config, skip_none=False), folder)
            for logger in trainer.loggers:
                logger.log_hyperparams(params)
            self.already_saved = True
        for owner in (pl_module, trainer.datamodule):
            if owner is not None and hasattr(owner, "_log_hyperparams"):
                owner._log_hyperparams = False  # the superset above was logged instead
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


def logged_hyperparameters(config_yaml: str, folder) -> dict[str, Any]:
    """The resolved config as nested plain data (what ``--print_config`` shows) plus ``run_dir``; the subcommand
    level (``fit:``) is dropped so keys read ``model/policy/init_args/pretrained`` in every logger."""
    config = yaml.safe_load(config_yaml) or {}
    config.pop("config", None)  # the --config file paths: not a hyperparameter
    return {**config, "run_dir": str(folder)}
