"""``mtflow`` command line: ``fit | validate | test | export`` through LightningCLI, plus ``serve-reward``,
``data`` and ``sweep``.

    mtflow fit --config configs/toy.yaml
    mtflow fit --config configs/flux_kontext.yaml --config configs/ablations/G8.yaml --model.rollout.group_size=8
    mtflow fit --config configs/flux_kontext.yaml --config configs/flux_kontext_nft.yaml --print_config
    mtflow export --config runs/x/config.yaml --ckpt_path runs/x/checkpoints/last.ckpt --output_dir lora/
    mtflow serve-reward --config configs/reward_server.yaml
    mtflow data convert-edival --csv ... --images ... --output manifest.jsonl
    mtflow sweep run --grid configs/sweeps/G_T.yaml --out sweeps/G_T
    mtflow check --config configs/flux_kontext.yaml --config configs/flux_kontext_grpo.yaml --gpu_memory_gb 80

``main(args)`` runs in-process (tests call it with a list of arguments). ``resolve_fit_config(args)`` is the config
``mtflow fit <args>`` would run, resolved and validated by the same parser without running anything (sweeps expand
their grids with it).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from argparse import ArgumentError
from collections.abc import Callable, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mtflow import __version__
from mtflow.checkpoints import CheckpointError, read_checkpoint
from mtflow.data.module import ChainDataModule
from mtflow.reward.base import ScorerUnavailableError
from mtflow.training.callbacks import (
    HeldOutEvaluation,
    IterationCheckpoint,
    IterationProgressBar,
    RolloutImageLogger,
    RunStatusWriter,
)
from mtflow.training.callbacks.checkpoint import newest_checkpoint, resume_candidates
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
        weights_only: bool | None = None,
    ) -> Path:
        """Write a trained LoRA as ``pytorch_lora_weights.safetensors`` for diffusers and ComfyUI.

        Args:
            model: not needed: the checkpoint carries the LoRA settings, and the config's policy class
                (``--model.policy``) the file layout.
            ckpt_path: a checkpoint written by ``mtflow fit`` ("last": the newest of the config's run).
            output_dir: folder to write into.
            adapter: "default" (the trained adapter) or "ema".
            push_to_hub: a Hub repository (``user/name``): write a model card (README.md) next to the LoRA and
                upload both (created private unless ``private`` is false).
            model_card_only: write (and with ``push_to_hub`` upload) only the model card, not the weights.
            private: create the Hub repository as private.
            hub_token_env: environment variable holding the Hub token.
            weights_only: accepted so that a run's saved ``config.yaml`` (which holds fit's value) can be passed;
                export always reads the checkpoint as data only, so ``false`` is refused.
        """
        policy = None if model is None else type(model.policy)
        layout = None if policy is None else f"{policy.__module__}.{policy.__qualname__}"
        return export_lora(
            ckpt_path,
            output_dir,
            adapter,
            weights_only,
            policy_class=layout,
            push_to_hub=push_to_hub,
            model_card_only=model_card_only,
            private=private,
            hub_token_env=hub_token_env,
        )


def export_lora(
    ckpt_path: str,
    output_dir: str,
    adapter: str,
    weights_only: bool | None = None,
    policy_class: str | None = None,
    push_to_hub: str | None = None,
    model_card_only: bool = False,
    private: bool = True,
    hub_token_env: str = "HF_TOKEN",
) -> Path:
    """``mtflow export``: the checkpoint's adapter as ``pytorch_lora_weights.safetensors`` in the layout of
    ``policy_class`` (a class path; None: FLUX.1-Kontext's), with a model card and a Hub upload when asked
    (``MtflowTrainer.export`` documents the options)."""
    from mtflow.export import export_checkpoint

    if weights_only is False:
        raise CheckpointError(
            f"{ckpt_path}: export reads checkpoints as data only; weights_only=false is refused"
        )
    if push_to_hub is not None or model_card_only:
        from mtflow.workflow.hub import share_export

        path = share_export(
            ckpt_path,
            output_dir,
            adapter,
            push_to_hub,
            model_card_only,
            private,
            hub_token_env,
            policy=_layout_of(policy_class),
        )
        print(f"wrote {Path(output_dir)}")
        return path
    path = export_checkpoint(ckpt_path, output_dir, adapter=adapter, policy=_layout_of(policy_class))
    print(f"wrote {path}")
    return path


def _layout_of(policy_class: str | None) -> Any:
    """An editor's LoRA file layout without building it: ``lora_file_tensors`` reads class attributes only, so an
    instance that never ran ``__init__`` (no weights, no GPU) writes the same file as a loaded policy."""
    if policy_class is None:
        return None
    import importlib

    module, _, name = policy_class.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls.__new__(cls)


SECRET_NAMES = ("token", "api_key", "password", "secret")


def _is_secret(name: str) -> bool:
    return any(name == s or name.endswith("_" + s) for s in SECRET_NAMES)


def redact_secrets(config: Any, found: list[str] | None = None, where: str = "") -> list[str]:
    """Replace, in place, every secret-named argument (``token``, ``api_key``, ``*_token``, ...) of a class in a parsed
    config by the class's default, so that no secret typed on the command line or in a config reaches a file on
    disk; returns the dotted keys that were replaced. ``token_env``-style arguments (a variable's name) stay."""
    found = [] if found is None else found
    if isinstance(config, list):
        for index, value in enumerate(config):
            redact_secrets(value, found, f"{where}[{index}]")
        return found
    if not isinstance(config, (Namespace, dict)):
        return found
    items = vars(config) if isinstance(config, Namespace) else config
    class_path = items.get("class_path")
    init_args = items.get("init_args")
    if isinstance(class_path, str) and isinstance(init_args, (Namespace, dict)):
        arguments = vars(init_args) if isinstance(init_args, Namespace) else init_args
        defaults = _init_defaults(class_path)
        for name in list(arguments):
            if _is_secret(name) and arguments[name] is not None and arguments[name] != defaults.get(name):
                arguments[name] = defaults.get(name)
                found.append(f"{where}.init_args.{name}".lstrip("."))
    for key, value in items.items():
        redact_secrets(value, found, f"{where}.{key}".lstrip("."))
    return found


def _init_defaults(class_path: str) -> dict[str, Any]:
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    try:
        signature = inspect.signature(getattr(importlib.import_module(module), name).__init__)
    except (ImportError, AttributeError, TypeError, ValueError):
        return {}
    return {p.name: (None if p.default is p.empty else p.default) for p in signature.parameters.values()}


class SecretFreeSaveConfig(RunConfigSaver):
    """The run's ``config.yaml`` and the loggers' hyperparameters (``RunConfigSaver``), without secrets: a token
    given on the command line (``--model.scorer.init_args.token``) is replaced by its default, and the run's copy
    says to use ``token_env``."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.already_saved:
            self.config = self.config.clone()
            removed = redact_secrets(self.config)
            if removed:
                rank_zero_warn(
                    f"not written to the run's {self.config_filename}: {', '.join(removed)} (secrets stay off "
                    "disk; give them with token_env / api_key_env when re-using that config)"
                )
        super().setup(trainer, pl_module, stage)


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
                "trainer.enable_checkpointing": True,  # through IterationCheckpoint (LoRA-only; false: none)
                "trainer.num_sanity_val_steps": 0,
            }
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI overwrites the model config with the checkpoint's hyperparameters. When resuming a fit, the
        # given config wins (so a run can be resumed with e.g. a larger max_iterations). Elsewhere (test, validate,
        # export) the checkpoint fills in the model, but what the user typed (--model.evaluation.conditions=[model],
        # ...) still wins: Lightning would drop it silently. Hyperparameters written by v0.1 (flat arguments) are
        # migrated to the typed groups first.
        # A checkpoint path is checked here, before any model is built or Lightning reads it: a missing, empty,
        # truncated, corrupt or foreign file is one line naming it (mtflow.checkpoints.read_checkpoint).
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or str(ckpt_path) in LIGHTNING_CKPT_NAMES:
            return
        checkpoint = read_checkpoint(ckpt_path)
        if subcommand in ("fit", "export"):
            return  # fit: the given config wins; export reads the checkpoint alone
        hparams = dict(checkpoint.get("hyper_parameters") or {})
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

    def instantiate_classes(self) -> None:
        if self.subcommand == "export":
            # export reads the checkpoint alone: no policy, judge (and its token) or trainer (and its GPUs) is built
            self.model = self.datamodule = self.trainer = None
            return
        super().instantiate_classes()

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Trainer:
        if (
            config.get("enable_checkpointing") is False
        ):  # checkpoints off: the checkpoint group does not apply
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        return super()._instantiate_trainer(config, callbacks)

    def _run_subcommand(self, subcommand: str) -> None:
        config = self.config_init[subcommand] if subcommand != "export" else self.config[subcommand]
        if config.get("ckpt_path") == "last":
            config["ckpt_path"] = self._last_checkpoint(subcommand)
        if subcommand == "export":
            export_lora(
                config["ckpt_path"],
                config["output_dir"],
                config["adapter"],
                config.get("weights_only"),
                policy_class=config.get("model.policy.class_path"),
                push_to_hub=config.get("push_to_hub"),
                model_card_only=bool(config.get("model_card_only")),
                private=config.get("private", True),
                hub_token_env=config.get("hub_token_env", "HF_TOKEN"),
            )
            return
        super()._run_subcommand(subcommand)

    def _last_checkpoint(self, subcommand: str) -> str:
        """``--ckpt_path last``: the newest ``last.ckpt`` of this config's run (its earlier versions included) or
        Slurm-requeue checkpoint, checked like any given path. Without one, ``fit`` starts from scratch (Lightning's
        set-and-forget convention, so a requeued or resubmitted job uses one command line); the others refuse."""
        if self.trainer is not None:
            candidates = [
                Path(p)
                for c in self.trainer.checkpoint_callbacks
                if isinstance(c, ModelCheckpoint)
                for p in c._find_last_checkpoints(self.trainer)
            ]
        else:
            candidates = _last_candidates_from_config(self.config[subcommand])
        newest = newest_checkpoint(candidates)
        if newest is None:
            if subcommand == "fit":
                return "last"  # Lightning warns and starts from scratch
            raise CheckpointError(
                "--ckpt_path last: no last.ckpt of this config's run found; pass the checkpoint's path"
            )
        read_checkpoint(newest)
        return str(newest)

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


LIGHTNING_CKPT_NAMES = ("last", "best", "hpc")  # ckpt_path values Lightning resolves itself


def _last_candidates_from_config(config: Namespace) -> list[Path]:
    """``resume_candidates`` of a parsed (not instantiated) config: its checkpoint folder, or its logger's version
    folders, and its ``default_root_dir``."""
    root = Path(config.get("trainer.default_root_dir") or Path.cwd())
    dirpath = config.get("checkpoint.dirpath")
    logger = config.get("trainer.logger")
    init_args = logger.get("init_args") if isinstance(logger, Namespace) else None
    versions_root = None
    if dirpath is None and init_args is not None and init_args.get("name") is not None:
        base = Path(init_args.get("save_dir") or root) / str(init_args.get("name"))
        version = init_args.get("version")
        if version is None:
            versions_root = base
        else:
            dirpath = base / (version if isinstance(version, str) else f"version_{version}") / "checkpoints"
    return resume_candidates(dirpath, versions_root, root)


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
    "mtflow check (a config's checks and per-GPU memory / time plan before any weight is loaded; also "
    "mtflow fit ... --dry_run), "
    "mtflow data build-chains (training chains from images by a VLM), "
    "mtflow edit (a K-turn edit of one's own image), "
    "mtflow runs ls|show|gallery (runs, one run, its static HTML page), "
    "mtflow --version. "
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
        "save_config_callback": SecretFreeSaveConfig,
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
    if args[0] != "convert-edival":  # as argparse does: usage, then the error as the last line, status 2
        print(usage, file=sys.stderr)
        print(
            f"mtflow data: error: unknown data command {args[0]!r} (choose from: build-chains, convert-edival)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    from mtflow.data.edival import main as convert_main

    code = convert_main(list(args[1:]))
    if code:
        raise SystemExit(code)  # the converter printed why


def _check(args: Sequence[str]) -> None:
    from mtflow.plan.check import main as check_main

    check_main(list(args))


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
    "check": _check,
    "edit": _edit,
    "runs": _runs,
}


def main(args: Sequence[str] | None = None) -> MtflowCLI | None:
    """Entry point of the ``mtflow`` console script (``args`` replaces ``sys.argv[1:]`` when given).

    Returns the LightningCLI object for fit / validate / test / export (its ``model`` and ``trainer``)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] in (["--version"], ["-V"]):
        print(f"mtflow {__version__}")
        return None
    if argv[:1] == ["fit"] and "--dry_run" in argv:  # `mtflow fit ... --dry_run` is `mtflow check ...`
        argv = ["check", *(a for a in argv[1:] if a != "--dry_run")]
    if argv and argv[0] in EXTRA_COMMANDS:
        EXTRA_COMMANDS[argv[0]](argv[1:])
        return None
    return _lightning_main(_with_default_config(argv))


# Failures a user causes or meets (bad config values, files, checkpoints, an unreachable judge, a full disk, an
# unavailable accelerator): one line naming the problem, exit status 1. Anything else is a bug: its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    OSError,
    FloatingPointError,
    MisconfigurationException,
    ScorerUnavailableError,
)


def console_main(args: Sequence[str] | None = None) -> int:
    """The ``mtflow`` console script: ``main`` with an exit status (``sys.exit(main())`` would print the returned
    CLI object and exit 1 after a successful fit). A failure of the kinds in ``USER_ERRORS`` prints one line
    ``mtflow <command>: error: ...`` and exits 1 (``MTFLOW_TRACEBACK=1`` shows the traceback too); a SIGTERM stop
    (Slurm preemption, requeue, time limit) exits 143."""
    argv = list(sys.argv[1:] if args is None else args)
    command = "mtflow" + (f" {argv[0]}" if argv and not argv[0].startswith("-") else "")
    try:
        main(argv)
    except SIGTERMException:
        print(f"{command}: stopped by SIGTERM; resume with --ckpt_path last", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        if os.environ.get("MTFLOW_TRACEBACK"):
            traceback.print_exc()
        print(f"{command}: error: {_describe_error(error)}", file=sys.stderr)
        return 1
    return 0


def _describe_error(error: BaseException) -> str:
    message = str(error).strip()
    if isinstance(error, OSError) and error.strerror and not isinstance(error, CheckpointError):
        where = f": {error.filename}" if error.filename else ""
        message = f"{error.strerror}{where}"
        if error.filename2:
            message += f" -> {error.filename2}"
    return message or type(error).__name__


if __name__ == "__main__":
    sys.exit(console_main())
