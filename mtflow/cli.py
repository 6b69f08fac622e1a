"""``mtflow`` command line: ``fit | validate | test | export`` through LightningCLI, plus ``serve-reward``,
``data`` and ``sweep``.

    mtflow fit --config configs/toy.yaml
    mtflow fit --config configs/flux_kontext.yaml --config configs/ablations/G8.yaml --model.rollout.group_size=8
    mtflow fit --config configs/flux_kontext.yaml --config configs/flux_kontext_nft.yaml --print_config
    mtflow export --config runs/x/config.yaml --ckpt_path runs/x/checkpoints/last.ckpt --output_dir lora/
    mtflow serve-reward --config configs/reward_server.yaml
    mtflow data convert-edival --csv ... --images ... --output manifest.jsonl
    mtflow sweep run --grid configs/sweeps/G_T.yaml --out sweeps/G_T

``main(args)`` runs in-process (tests call it with a list of arguments). ``resolve_fit_config(args)`` is the config
``mtflow fit <args>`` would run, resolved and validated by the same parser without running anything (sweeps expand
their grids with it).
"""

from __future__ import annotations

import logging
import sys
import warnings
from argparse import ArgumentError
from collections.abc import Callable, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mtflow.checkpoints import read_checkpoint
from mtflow.data.module import ChainDataModule
from mtflow.training.callbacks import (
    HeldOutEvaluation,
    IterationCheckpoint,
    IterationProgressBar,
    RolloutImageLogger,
    RunStatusWriter,
)
from mtflow.training.callbacks.config import RunConfigSaver
from mtflow.training.migrate import migrate_hparams
from mtflow.training.module import FlowRLModule

REPO_CONFIGS = Path(str(resources.files("mtflow.configs")))  # configs/ of the checkout, or as installed
DEFAULT_FIT_CONFIG = REPO_CONFIGS / "toy.yaml"


class MtflowTrainer(Trainer):
    """Lightning's Trainer plus ``export``."""

    def export(
        self,
        model: FlowRLModule,
        ckpt_path: str,
        output_dir: str = "lora_export",
        adapter: Literal["default", "ema"] = "default",
        datamodule: ChainDataModule | None = None,
        push_to_hub: str | None = None,
        model_card_only: bool = False,
        private: bool = True,
        hub_token_env: str = "HF_TOKEN",
        weights_only: None = None,
    ) -> Path:
        """Write a trained LoRA as ``pytorch_lora_weights.safetensors`` for diffusers and ComfyUI.

        Args:
            model: the module of the run (only its policy's LoRA settings are read).
            ckpt_path: a checkpoint written by ``mtflow fit``.
            output_dir: folder to write into.
            adapter: "default" (the trained adapter) or "ema".
            push_to_hub: a Hub repository (``user/name``): write a model card (README.md) next to the LoRA and
                upload both (created private unless ``private`` is false).
            model_card_only: write (and with ``push_to_hub`` upload) only the model card, not the weights.
            private: create the Hub repository as private.
            hub_token_env: environment variable holding the Hub token.
            weights_only: not an export option (a run's saved config.yaml carries it as null).
        """
        if push_to_hub is not None or model_card_only:
            from mtflow.workflow.hub import share_export

            path = share_export(
                ckpt_path, output_dir, adapter, push_to_hub, model_card_only, private, hub_token_env
            )
            print(f"wrote {Path(output_dir)}")
            return path
        from mtflow.export import export_checkpoint

        path = export_checkpoint(ckpt_path, output_dir, adapter=adapter)
        print(f"wrote {path}")
        return path


class MtflowCLI(LightningCLI):
    """LightningCLI with mtflow's defaults: Rich progress, CSV logs every iteration, image grids, checkpoints in RL
    iterations, and a ``status.json`` for sweeps."""

    def __init__(self, *args, **kwargs) -> None:
        given = kwargs.get("args")
        self._command_line = [str(a) for a in (given if isinstance(given, (list, tuple)) else sys.argv[1:])]
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = dict(LightningCLI.subcommands())
        del commands[
            "predict"
        ]  # an RL trainer has no forward to predict with; Lightning would fail after loading
        commands["export"] = {"model", "datamodule"}
        return commands

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RolloutImageLogger, "image_logger")
        parser.add_lightning_class_args(IterationCheckpoint, "checkpoint")
        parser.add_lightning_class_args(RunStatusWriter, "run_status")
        parser.add_lightning_class_args(HeldOutEvaluation, "heldout")
        parser.set_defaults(
            {
                "trainer.log_every_n_steps": 1,
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": "runs", "name": "mtflow"},
                },
                "trainer.enable_checkpointing": False,  # IterationCheckpoint saves LoRA-only checkpoints
                "trainer.num_sanity_val_steps": 0,
            }
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI overwrites the model config with the checkpoint's hyperparameters. When resuming a fit, the
        # given config wins (so a run can be resumed with e.g. a larger max_iterations). Elsewhere (test, validate,
        # export) the checkpoint fills in the model, but what the user typed (--model.evaluation.conditions=[model],
        # ...) still wins: Lightning would drop it silently. Hyperparameters written by v0.1 (flat arguments) are
        # migrated to the typed groups first.
        subcommand = self.config.get("subcommand")
        if subcommand in (None, "fit"):
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = dict(read_checkpoint(ckpt_path).get("hyper_parameters") or {})
        for private in ("_instantiator", "_class_path"):
            hparams.pop(private, None)
        if not hparams:
            return
        typed = {
            arg.split("=", 1)[0][len("--model.") :]
            for arg in self._command_line
            if arg.startswith("--model.")
        }
        before = {key: self.config.get(f"{subcommand}.model.{key}") for key in typed}
        hparams = migrate_hparams(hparams)
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        for key, value in before.items():
            self.config[f"{subcommand}.model.{key}"] = value

    def before_instantiate_classes(self) -> None:
        # RichProgressBar refuses enable_progress_bar=False; add it only where a bar is wanted and none is set.
        config = self.config.get(str(self.subcommand), self.config)
        trainer = config.get("trainer", {})
        callbacks = trainer.get("callbacks") or []
        has_bar = any("ProgressBar" in str(getattr(c, "class_path", c)) for c in callbacks)
        if trainer.get("enable_progress_bar", True) is not False and not has_bar:
            self.trainer_defaults.setdefault("callbacks", [])
            if not any(isinstance(c, IterationProgressBar) for c in self.trainer_defaults["callbacks"]):
                self.trainer_defaults["callbacks"].append(IterationProgressBar(leave=True))


def _with_default_config(argv: list[str]) -> list[str]:
    """``mtflow fit`` with no ``--config`` runs the embedded toy world (configs/toy.yaml)."""
    asks_help = any(a in ("-h", "--help") for a in argv)
    if argv[:1] == ["fit"] and not asks_help and not any(a.startswith("--config") for a in argv):
        if DEFAULT_FIT_CONFIG.is_file():
            return ["fit", "--config", str(DEFAULT_FIT_CONFIG), *argv[1:]]
    return argv


MAIN_HELP = "mtflow: multi-turn RL for flow-matching image editors (fit / validate / test / export a LoRA)."
# `mtflow --help` is LightningCLI's parser, which does not know the commands main() handles before it.
EXTRA_HELP = (
    "more commands (each with --help): "
    "mtflow serve-reward (the judge as an HTTP service), "
    "mtflow data convert-edival (an EdiVal CSV to a chain manifest), "
    "mtflow sweep (expand, run and collect G x T ablation sweeps), "
    "mtflow data build-chains (training chains from images by a VLM), "
    "mtflow edit (a K-turn edit of one's own image), "
    "mtflow runs ls|show|gallery (runs, one run, its static HTML page). "
    "Without --config, `mtflow fit` runs the embedded toy world (configs/toy.yaml)."
)


class _DropLightningTips(logging.Filter):
    """Drops Lightning's "💡 Tip: ..." advertisements (for its cloud logger) from every run's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def _lightning_main(args: Sequence[str] | None) -> MtflowCLI:
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLightningTips) for f in rank_zero_log.filters):
        rank_zero_log.addFilter(_DropLightningTips())
    # Frozen encoders are in eval mode on purpose (T5 dropout must stay off); Lightning warns about it.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # Lightning's own pytree helper calls a torch API torch now deprecates; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # We always pass the argument list (mtflow rewrites a bare `mtflow fit`); Lightning warns whenever that list is
    # given while sys.argv holds arguments too, i.e. on every command a user types.
    warnings.filterwarnings(
        "ignore", message=r"LightningCLI's args parameter is intended to run from within Python"
    )
    return MtflowCLI(
        **_cli_setup(),
        parser_kwargs={"description": MAIN_HELP, "epilog": EXTRA_HELP},
        args=list(args) if args is not None else None,
    )


def _cli_setup() -> dict[str, Any]:
    """What ``mtflow`` gives LightningCLI besides the arguments: the parser ``mtflow fit`` and
    ``resolve_fit_config`` share."""
    return {
        "model_class": FlowRLModule,
        "datamodule_class": ChainDataModule,
        "subclass_mode_data": True,
        "trainer_class": MtflowTrainer,
        "save_config_callback": RunConfigSaver,  # into the versioned run folder, and to every logger
        "save_config_kwargs": {"overwrite": True},
        "auto_configure_optimizers": False,
    }


_BUILD_PARSER_ONLY = object()


class _FitConfigParser(MtflowCLI):
    """MtflowCLI that builds its parser and parses, and does nothing LightningCLI does after parsing: no seeding,
    no class instantiated, no subcommand run. Constructed with ``args=_BUILD_PARSER_ONLY`` it only builds the
    parser (once per process, ``_fit_config_parser``); ``resolve`` then parses through LightningCLI's own
    ``parse_arguments``."""

    def parse_arguments(self, parser, args) -> None:
        if args is _BUILD_PARSER_ONLY:
            self.config = Namespace(subcommand=None)  # no subcommand: LightningCLI.__init__ runs nothing
            return
        super().parse_arguments(parser, args)

    def _set_seed(self) -> None:
        pass

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str | None) -> None:
        pass

    def resolve(self, args: list[str]) -> dict[str, Any]:
        with warnings.catch_warnings():  # `mtflow sweep ...` has sys.argv arguments of its own
            warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
            self.parse_arguments(self.parser, _with_default_config(["fit", *args]))
        # what `mtflow fit ... --print_config` writes: the fit parser's dump, unset (null) values included
        text = self._subcommand_parsers["fit"].dump(self.config["fit"], skip_unset=False)
        return yaml.safe_load(text)


@lru_cache(maxsize=1)
def _fit_config_parser() -> _FitConfigParser:
    parser_kwargs = {"exit_on_error": False, "fit": {"exit_on_error": False}}  # raise, do not print and exit
    return _FitConfigParser(
        **_cli_setup(),
        parser_kwargs=parser_kwargs,
        load_from_checkpoint_support=False,
        args=_BUILD_PARSER_ONLY,
    )


def resolve_fit_config(args: Sequence[str]) -> dict[str, Any]:
    """The config ``mtflow fit <args>`` would run (``--config`` files stacked in order, then ``--key=value``
    arguments), resolved and validated by the same LightningCLI parser, as ``--print_config`` shows it; nothing is
    instantiated, seeded or run. Without ``--config``, the default toy config is used, as ``mtflow fit`` does.

    Raises:
        ValueError: a misspelt key, an invalid value or an unreadable config; the message is jsonargparse's (it names
            the key), on one line.
    """
    try:
        return _fit_config_parser().resolve([str(a) for a in args])
    except ArgumentError as error:
        raise ValueError(" ".join(str(error).split())) from None


def _serve_reward(args: Sequence[str]) -> None:
    from mtflow.reward.server import main as serve_main

    serve_main(list(args))


def _data(args: Sequence[str]) -> None:
    usage = "usage: mtflow data convert-edival|build-chains [options]   (see: mtflow data <command> --help)"
    if not args or args[0] in ("-h", "--help"):
        print(usage)
        return
    if args[0] == "build-chains":
        from mtflow.workflow.chains import main as build_main

        build_main(list(args[1:]))
        return
    if args[0] != "convert-edival":
        raise SystemExit(f"unknown data command {args[0]!r}\n{usage}")
    from mtflow.data.edival import main as convert_main

    convert_main(list(args[1:]))


def _sweep(args: Sequence[str]) -> None:
    from mtflow.sweeps.cli import main as sweep_main

    code = sweep_main(list(args))
    if code:
        raise SystemExit(code)  # `mtflow sweep collect` on an unfinished sweep must not exit 0


def _edit(args: Sequence[str]) -> None:
    from mtflow.workflow.edit import main as edit_main

    edit_main(list(args))


def _runs(args: Sequence[str]) -> None:
    from mtflow.workflow.runs import main as runs_main

    runs_main(list(args))


EXTRA_COMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
    "serve-reward": _serve_reward,
    "data": _data,
    "sweep": _sweep,
    "edit": _edit,
    "runs": _runs,
}


def main(args: Sequence[str] | None = None) -> MtflowCLI | None:
    """Entry point of the ``mtflow`` console script (``args`` replaces ``sys.argv[1:]`` when given).

    Returns the LightningCLI object for fit / validate / test / export (its ``model`` and ``trainer``)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in EXTRA_COMMANDS:
        EXTRA_COMMANDS[argv[0]](argv[1:])
        return None
    return _lightning_main(_with_default_config(argv))


def console_main() -> int:
    """The ``mtflow`` console script: ``main`` with an exit status (``sys.exit(main())`` would print the returned
    CLI object and exit 1 after a successful fit)."""
    main()
    return 0


if __name__ == "__main__":
    sys.exit(console_main())
