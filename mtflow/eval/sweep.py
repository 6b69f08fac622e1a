"""Ablation sweeps: expand a grid YAML into runs, launch them (local, Slurm array, W&B sweep), collect the results.

Grid file (``configs/sweeps/G_T.yaml``)::

    name: G_T                              # optional (default: the file's stem)
    base_configs: [../tiny_grpo.yaml]      # relative to the grid file; stacked in order like --config a --config b
    overrides: {trainer.max_steps: 20}     # dotted keys applied to every run
    axes:                                  # cartesian product, first axis slowest
      model.group_size: [2, 4]
      model.num_steps: [2, 3]
      seed_everything: [0, 1]
    cost_match:                            # optional: hold B x G constant
      key: data.batch_size                 #   the key that absorbs it: key = total / G (must divide exactly)
      total: 8
      group_key: model.group_size          #   default
    run_dir_keys: [trainer.default_root_dir]  # keys set to each run's folder (absolute path)

Dotted keys follow LightningCLI: ``model.group_size`` also reaches ``model: {class_path: ..., init_args:
{group_size: ...}}``. Keys absent from the base configs are created (LightningCLI itself rejects a misspelt key at
start-up, so a typo fails the run immediately).

Sweep folder layout and the run-folder contract the trainer honours::

    <sweep>/sweep.json               the plan: runs, their axis values, derived values
    <sweep>/runs/<run>/config.yaml   resolved config (base configs + overrides + axes + cost matching)
    <sweep>/runs/<run>/status.json   {"status": "completed" | "failed" | "running", "wall_clock_s",
                                      "samples_seen", "error"?}   (``RunStatus``)
    <sweep>/runs/<run>/metrics.csv   Lightning CSVLogger format: a ``step`` column and metric columns
    <sweep>/runs/<run>/eval/report.json  ``mtflow.eval.report`` format (final held-out O_K)
    <sweep>/runs/<run>/log.txt       stdout + stderr of the run (local runner)

``collect`` reads every run into one table (CSV + Markdown) and plots; it refuses, naming each run, when any run
is missing, failed or still running.
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # plotting and report reading import matplotlib / torch: only collect needs them
    from matplotlib.figure import Figure

PLAN_FORMAT = "mtflow.sweep/1"
PLAN_FILE = "sweep.json"
RUNS_DIR = "runs"
CONFIG_FILE = "config.yaml"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.csv"
REPORT_FILE = Path("eval") / "report.json"
LOG_FILE = "log.txt"
STATUS_VALUES = ("completed", "failed", "running")
_GRID_KEYS = {"name", "base_configs", "overrides", "axes", "cost_match", "run_dir_keys", "description"}


class SweepError(ValueError):
    """A grid, plan or run folder is not usable; the message names the file, key or run."""


class SweepIncompleteError(SweepError):
    """``collect`` found runs that are missing, failed or unfinished; ``problems`` maps run name -> reason."""

    def __init__(self, sweep_dir: Path, problems: Mapping[str, str]):
        self.problems = dict(problems)
        listed = "\n".join(f"  {name}: {reason}" for name, reason in self.problems.items())
        super().__init__(
            f"cannot collect sweep {sweep_dir}: {len(self.problems)} run(s) not usable:\n{listed}"
        )


# ----------------------------------------------------------------------------------------------------- configs


def get_dotted(config: Mapping[str, Any], key: str) -> Any:
    """Value at dotted ``key`` (``init_args`` transparent); raises KeyError naming the key."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping):
            raise KeyError(key)
        if part not in node and isinstance(node.get("init_args"), Mapping) and "class_path" in node:
            node = node["init_args"]
        if part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` to ``value`` in place, creating missing levels (``init_args`` transparent)."""
    parts = key.split(".")
    node = config
    for part in parts[:-1]:
        if isinstance(node.get("init_args"), dict) and "class_path" in node and part not in node:
            node = node["init_args"]
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SweepError(f"cannot set {key!r}: {part!r} holds a {type(child).__name__}, not a mapping")
        node = child
    last = parts[-1]
    if last not in node and isinstance(node.get("init_args"), dict) and "class_path" in node:
        node = node["init_args"]
    node[last] = copy.deepcopy(value)


def merge_configs(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Stack ``update`` on ``base`` like a later ``--config``: mappings merge key by key, anything else is
    replaced; a mapping with a different ``class_path`` replaces the old one whole (its init_args no longer apply).
    Returns a new dict."""
    result = copy.deepcopy(base)
    for key, value in update.items():
        old = result.get(key)
        if (
            isinstance(old, dict)
            and isinstance(value, Mapping)
            and not (
                "class_path" in value and "class_path" in old and value["class_path"] != old["class_path"]
            )
        ):
            result[key] = merge_configs(old, value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def _load_yaml(path: Path) -> Any:
    try:
        with path.open("r", encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except FileNotFoundError:
        raise SweepError(f"file not found: {path}") from None
    except yaml.YAMLError as error:
        raise SweepError(f"{path}: invalid YAML ({error})") from error


# -------------------------------------------------------------------------------------------------------- grid


@dataclass
class CostMatch:
    """Hold ``key * group_key`` at ``total`` (e.g. batch size B x group size G = rollouts per iteration)."""

    key: str
    total: int
    group_key: str = "model.group_size"


@dataclass
class SweepGrid:
    """A parsed grid file.

    Attributes:
        name: sweep name.
        base_configs: config files stacked in order under every run.
        axes: dotted key -> values; runs are their cartesian product (first axis slowest).
        overrides: dotted key -> value applied to every run (after the base configs, before the axes).
        cost_match: optional B x G constant rule.
        run_dir_keys: dotted keys set to each run's folder.
        source: the grid file (None when built in code).
    """

    name: str
    base_configs: list[Path]
    axes: dict[str, list[Any]]
    overrides: dict[str, Any] = field(default_factory=dict)
    cost_match: CostMatch | None = None
    run_dir_keys: list[str] = field(default_factory=list)
    source: Path | None = None

    def __post_init__(self) -> None:
        where = f"grid {self.source}" if self.source else f"grid {self.name!r}"
        if not self.axes:
            raise SweepError(f"{where}: 'axes' is empty; a sweep needs at least one axis")
        for key, values in self.axes.items():
            if not isinstance(values, list) or not values:
                raise SweepError(f"{where}: axis {key!r} must be a non-empty list, got {values!r}")
            if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
                raise SweepError(f"{where}: axis {key!r} repeats a value: {values}")
        if self.cost_match is not None:
            if self.cost_match.key in self.axes:
                raise SweepError(f"{where}: cost_match.key {self.cost_match.key!r} cannot also be an axis")
            if self.cost_match.total < 1:
                raise SweepError(f"{where}: cost_match.total must be >= 1, got {self.cost_match.total}")


def load_grid(path: str | Path) -> SweepGrid:
    """Parse a grid YAML (schema in the module docstring); base config paths become absolute."""
    path = Path(path).resolve()
    data = _load_yaml(path)
    if not isinstance(data, dict):
        raise SweepError(f"{path}: a grid file must be a mapping")
    unknown = sorted(set(data) - _GRID_KEYS)
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {unknown} (allowed: {sorted(_GRID_KEYS)})")
    base = data.get("base_configs", [])
    if isinstance(base, str):
        base = [base]
    base_paths = [(path.parent / p).resolve() for p in base]
    for base_path in base_paths:
        if not base_path.is_file():
            raise SweepError(f"{path}: base config not found: {base_path}")
    cost = data.get("cost_match")
    cost_match = None
    if cost is not None:
        if not isinstance(cost, dict) or "key" not in cost or "total" not in cost:
            raise SweepError(
                f"{path}: cost_match needs 'key' and 'total' (and optionally 'group_key'), got {cost!r}"
            )
        cost_match = CostMatch(
            key=str(cost["key"]),
            total=int(cost["total"]),
            group_key=str(cost.get("group_key", "model.group_size")),
        )
    run_dir_keys = data.get("run_dir_keys", []) or []
    if isinstance(run_dir_keys, str):
        run_dir_keys = [run_dir_keys]
    return SweepGrid(
        name=str(data.get("name") or path.stem),
        base_configs=base_paths,
        axes=dict(data.get("axes") or {}),
        overrides=dict(data.get("overrides") or {}),
        cost_match=cost_match,
        run_dir_keys=list(run_dir_keys),
        source=path,
    )


# -------------------------------------------------------------------------------------------------------- plan


@dataclass
class SweepRun:
    """One run of a sweep.

    Attributes:
        index: position in the plan (the Slurm array index).
        name: folder name under ``<sweep>/runs``.
        directory: absolute run folder.
        axes: dotted key -> this run's value on each axis.
        derived: values computed for this run (cost-matched key), dotted key -> value.
    """

    index: int
    name: str
    directory: Path
    axes: dict[str, Any]
    derived: dict[str, Any] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        return self.directory / CONFIG_FILE

    @property
    def status_path(self) -> Path:
        return self.directory / STATUS_FILE

    @property
    def metrics_path(self) -> Path:
        return self.directory / METRICS_FILE

    @property
    def report_path(self) -> Path:
        return self.directory / REPORT_FILE


@dataclass
class SweepPlan:
    """The expanded sweep (``<sweep>/sweep.json``)."""

    name: str
    sweep_dir: Path
    axes: dict[str, list[Any]]
    runs: list[SweepRun]
    grid_source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "name": self.name,
            "grid": self.grid_source,
            "axes": self.axes,
            "runs": [
                {
                    "index": run.index,
                    "name": run.name,
                    "dir": run.directory.relative_to(self.sweep_dir).as_posix(),
                    "axes": run.axes,
                    "derived": run.derived,
                }
                for run in self.runs
            ],
        }


def load_plan(sweep_dir: str | Path) -> SweepPlan:
    """Read ``<sweep_dir>/sweep.json``."""
    sweep_dir = Path(sweep_dir).resolve()
    path = sweep_dir / PLAN_FILE
    if not path.is_file():
        raise SweepError(f"{sweep_dir} is not an expanded sweep: {path} not found (run expand first)")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != PLAN_FORMAT:
        raise SweepError(f"{path}: format {data.get('format')!r}, expected {PLAN_FORMAT!r}")
    runs = [
        SweepRun(
            index=int(r["index"]),
            name=r["name"],
            directory=sweep_dir / r["dir"],
            axes=dict(r["axes"]),
            derived=dict(r.get("derived", {})),
        )
        for r in data["runs"]
    ]
    return SweepPlan(
        name=data["name"], sweep_dir=sweep_dir, axes=data["axes"], runs=runs, grid_source=data.get("grid")
    )


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Last dotted component of each key, or the whole key where that would be ambiguous."""
    leaves = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: (leaf if leaves.count(leaf) == 1 else key) for key, leaf in zip(keys, leaves)}


def _value_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:40] or "_"


def resolve_run_config(grid: SweepGrid, assignment: Mapping[str, Any], run_dir: Path) -> tuple[dict, dict]:
    """The full config of one run and the values derived for it.

    Order: base configs (stacked), ``overrides``, the axis values, cost matching, run-folder keys.

    Returns:
        (config, derived): the resolved config dict and {dotted key: value} computed by cost matching.
    """
    config: dict[str, Any] = {}
    for base_path in grid.base_configs:
        loaded = _load_yaml(base_path) or {}
        if not isinstance(loaded, dict):
            raise SweepError(f"base config {base_path} is not a mapping")
        config = merge_configs(config, loaded)
    for key, value in grid.overrides.items():
        set_dotted(config, key, value)
    for key, value in assignment.items():
        set_dotted(config, key, value)
    derived: dict[str, Any] = {}
    if grid.cost_match is not None:
        rule = grid.cost_match
        try:
            group = get_dotted(config, rule.group_key)
        except KeyError:
            raise SweepError(
                f"cost_match: {rule.group_key!r} is not set for run {dict(assignment)} (neither an axis nor in the "
                "base configs / overrides)"
            ) from None
        if not isinstance(group, int) or group < 1 or rule.total % group:
            raise SweepError(
                f"cost_match: total {rule.total} is not divisible by {rule.group_key} = {group!r} for run "
                f"{dict(assignment)}"
            )
        derived[rule.key] = rule.total // group
        set_dotted(config, rule.key, derived[rule.key])
    for key in grid.run_dir_keys:
        set_dotted(config, key, str(run_dir))
    return config, derived


def expand_grid(grid: SweepGrid | str | Path, sweep_dir: str | Path, *, overwrite: bool = False) -> SweepPlan:
    """Expand ``grid`` into ``sweep_dir``: one folder per run with its resolved ``config.yaml``, plus ``sweep.json``.

    Re-expanding the same grid into the same folder is a no-op for the plan (so a sweep can be resumed); a
    different plan in an existing sweep folder is refused unless ``overwrite``.
    """
    if not isinstance(grid, SweepGrid):
        grid = load_grid(grid)
    sweep_dir = Path(sweep_dir).resolve()
    keys = list(grid.axes)
    short = _short_keys(keys)
    width = max(3, len(str(math.prod(len(v) for v in grid.axes.values()) - 1)))
    runs: list[SweepRun] = []
    configs: list[dict[str, Any]] = []
    for index, values in enumerate(itertools.product(*(grid.axes[k] for k in keys))):
        assignment = dict(zip(keys, values))
        name = f"r{index:0{width}d}__" + "__".join(
            f"{short[k]}={_value_text(v)}" for k, v in assignment.items()
        )
        directory = sweep_dir / RUNS_DIR / name
        config, derived = resolve_run_config(grid, assignment, directory)
        runs.append(SweepRun(index=index, name=name, directory=directory, axes=assignment, derived=derived))
        configs.append(config)
    plan = SweepPlan(
        name=grid.name,
        sweep_dir=sweep_dir,
        axes=grid.axes,
        runs=runs,
        grid_source=str(grid.source) if grid.source else None,
    )

    plan_path = sweep_dir / PLAN_FILE
    if plan_path.is_file() and not overwrite:
        existing = json.loads(plan_path.read_text(encoding="utf-8"))
        if existing != json.loads(json.dumps(plan.to_dict())):
            raise SweepError(
                f"{sweep_dir} already holds a different sweep ({plan_path}); choose another folder or pass "
                "overwrite=True (--overwrite)"
            )
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for run, config in zip(runs, configs):
        run.directory.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(config, sort_keys=False)
        if not run.config_path.is_file() or run.config_path.read_text(encoding="utf-8") != text:
            run.config_path.write_text(text, encoding="utf-8")
    plan_path.write_text(json.dumps(plan.to_dict(), indent=2) + "\n", encoding="utf-8")
    return plan


# ------------------------------------------------------------------------------------------------------ status


@dataclass
class RunStatus:
    """``<run>/status.json``: what the trainer (or the runner, when the trainer could not) recorded.

    Attributes:
        status: ``completed``, ``failed`` or ``running``.
        wall_clock_s: seconds the run took (so far).
        samples_seen: training samples (trajectories) consumed.
        error: why a failed run failed.
    """

    status: str
    wall_clock_s: float = 0.0
    samples_seen: int = 0
    error: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUS_VALUES:
            raise SweepError(f"status must be one of {STATUS_VALUES}, got {self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "status": self.status,
            "wall_clock_s": self.wall_clock_s,
            "samples_seen": self.samples_seen,
        }
        if self.error is not None:
            data["error"] = self.error
        return data

    def write(self, run_dir: str | Path) -> Path:
        """Write atomically (a reader never sees half a file)."""
        path = Path(run_dir) / STATUS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, path)
        return path

    @classmethod
    def read(cls, run_dir: str | Path) -> RunStatus | None:
        """The run's status, or None when it has no status.json; SweepError when the file is malformed."""
        path = Path(run_dir) / STATUS_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                status=data["status"],
                wall_clock_s=float(data.get("wall_clock_s", 0.0)),
                samples_seen=int(data.get("samples_seen", 0)),
                error=data.get("error"),
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise SweepError(f"{path}: malformed status file ({type(error).__name__}: {error})") from error


def mark_failed(run_dir: str | Path, error: str, wall_clock_s: float | None = None) -> RunStatus:
    """Record a failure unless the trainer already did (its own error message is kept)."""
    try:
        previous = RunStatus.read(run_dir)
    except SweepError:
        previous = None
    if previous is not None and previous.status == "failed":
        return previous
    status = RunStatus(
        status="failed",
        wall_clock_s=wall_clock_s
        if wall_clock_s is not None
        else (previous.wall_clock_s if previous else 0.0),
        samples_seen=previous.samples_seen if previous else 0,
        error=error,
    )
    status.write(run_dir)
    return status


# ----------------------------------------------------------------------------------------------------- runners


def default_fit_command(run: SweepRun, python: str = sys.executable) -> list[str]:
    """``python -m mtflow fit --config <run>/config.yaml``."""
    return [python, "-m", "mtflow", "fit", "--config", str(run.config_path)]


def default_fit_args(run: SweepRun) -> list[str]:
    """Arguments for an in-process ``mtflow.cli.main(args)``: ``fit --config <run>/config.yaml``."""
    return ["fit", "--config", str(run.config_path)]


@dataclass
class RunOutcome:
    """What happened to one run in a local sweep (``skipped``: already completed, not rerun)."""

    run: SweepRun
    status: RunStatus
    skipped: bool = False
    returncode: int | None = None


def _tail(path: Path, lines: int = 15) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def _finish(run: SweepRun, ok: bool, failure: str, wall_clock_s: float) -> RunStatus:
    """Status after the run ended: trust the trainer's record when it wrote a final one, else record a failure."""
    try:
        status = RunStatus.read(run.directory)
    except SweepError as error:
        return mark_failed(run.directory, f"{failure}; and {error}", wall_clock_s)
    if ok and status is not None and status.status == "completed":
        return status
    if ok:
        recorded = "no status.json" if status is None else f"status {status.status!r}"
        return mark_failed(
            run.directory, f"the run ended without error but its trainer recorded {recorded}", wall_clock_s
        )
    return mark_failed(run.directory, failure, wall_clock_s)


def _run_all(
    plan: SweepPlan,
    execute: Callable[[SweepRun], tuple[bool, str, int | None]],
    skip_completed: bool,
    stop: bool,
) -> list[RunOutcome]:
    outcomes = []
    for run in plan.runs:
        try:
            previous = RunStatus.read(run.directory)
        except SweepError:  # a half-written or foreign status file: the run is simply rerun
            previous = None
        if skip_completed and previous is not None and previous.status == "completed":
            outcomes.append(RunOutcome(run=run, status=previous, skipped=True))
            continue
        RunStatus(status="running").write(run.directory)
        start = time.perf_counter()
        ok, failure, returncode = execute(run)
        status = _finish(run, ok, failure, time.perf_counter() - start)
        outcomes.append(RunOutcome(run=run, status=status, returncode=returncode))
        if stop and status.status != "completed":
            break
    return outcomes


def run_local(
    plan: SweepPlan,
    command_builder: Callable[[SweepRun], Sequence[str]] = default_fit_command,
    *,
    skip_completed: bool = True,
    stop_on_failure: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout_s: float | None = None,
) -> list[RunOutcome]:
    """Run every run of ``plan`` one after another as a subprocess; output goes to ``<run>/log.txt``.

    Args:
        plan: the expanded sweep.
        command_builder: run -> argv (default ``python -m mtflow fit --config <run>/config.yaml``).
        skip_completed: leave runs whose status is already ``completed`` alone (resume a sweep).
        stop_on_failure: stop at the first run that does not complete (default: run them all, report at the end).
        env: extra environment variables for the runs.
        cwd: working directory of the runs (default: the current one).
        timeout_s: per-run time limit; a run that exceeds it is killed and marked failed.

    A run that exits non-zero, or exits 0 without its trainer recording ``completed``, is marked ``failed`` in its
    ``status.json`` (the trainer's own error message is kept when it wrote one).
    """
    full_env = {**os.environ, **(env or {})}

    def execute(run: SweepRun) -> tuple[bool, str, int | None]:
        command = [str(part) for part in command_builder(run)]
        log_path = run.directory / LOG_FILE
        with log_path.open("w", encoding="utf-8") as log:
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            try:
                completed = subprocess.run(
                    command, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd, timeout=timeout_s
                )
            except subprocess.TimeoutExpired:
                return False, f"killed after the {timeout_s} s time limit (log: {log_path})", None
            except OSError as error:
                return False, f"could not start {command[0]!r}: {error}", None
        if completed.returncode != 0:
            return (
                False,
                f"command exited with code {completed.returncode} (log: {log_path}); last lines:\n{_tail(log_path)}",
                completed.returncode,
            )
        return True, "", 0

    return _run_all(plan, execute, skip_completed, stop_on_failure)


def run_in_process(
    plan: SweepPlan,
    main: Callable[[list[str]], Any],
    args_builder: Callable[[SweepRun], list[str]] = default_fit_args,
    *,
    skip_completed: bool = True,
    stop_on_failure: bool = False,
) -> list[RunOutcome]:
    """Like ``run_local`` but calls ``main(args)`` (e.g. ``mtflow.cli.main``) in this process; an exception marks
    the run failed with its traceback. Fast for tests; runs share the process (and its RNG/global state)."""

    def execute(run: SweepRun) -> tuple[bool, str, int | None]:
        try:
            main(args_builder(run))
        except SystemExit as exit_:  # argparse / LightningCLI exit on bad arguments
            if exit_.code not in (0, None):
                return (
                    False,
                    f"exited with code {exit_.code}",
                    int(exit_.code) if isinstance(exit_.code, int) else 1,
                )
        except Exception:  # noqa: BLE001 - any failure of one run is recorded, the sweep goes on
            return False, traceback.format_exc(limit=8), None
        return True, "", 0

    return _run_all(plan, execute, skip_completed, stop_on_failure)


def write_slurm_array(
    plan: SweepPlan,
    out_path: str | Path | None = None,
    *,
    command_builder: Callable[[SweepRun], Sequence[str]] = default_fit_command,
    job_name: str | None = None,
    partition: str | None = None,
    account: str | None = None,
    time_limit: str = "04:00:00",
    nodes: int = 1,
    gpus_per_node: int | None = None,
    cpus_per_task: int | None = None,
    mem: str | None = None,
    max_parallel: int | None = None,
    setup_lines: Sequence[str] = (),
    extra_directives: Sequence[str] = (),
    workdir: str | Path | None = None,
    python: str = sys.executable,
) -> Path:
    """Write a Slurm array script with one task per run (``sbatch <script>``); returns its path.

    Task i runs run i's command in its own folder's context; a non-zero exit is recorded in the run's
    ``status.json`` (``mtflow.eval.sweep mark-failed``) unless the trainer already recorded the failure.

    Args:
        plan: the expanded sweep.
        out_path: script path (default ``<sweep>/slurm_array.sh``).
        command_builder: run -> argv (mind the cluster's Python: e.g. ``partial(default_fit_command, python="python")``).
        job_name: ``--job-name`` (default: the sweep name).
        partition, account, time_limit, nodes, gpus_per_node, cpus_per_task, mem: the usual sbatch directives
            (None: not written).
        max_parallel: at most this many array tasks at once (``%N``).
        setup_lines: shell lines before the run (``module load ...``, ``source venv/bin/activate``).
        extra_directives: more ``#SBATCH`` options, e.g. ``"--qos=high"``.
        workdir: folder to ``cd`` into first (default: the current one at writing time).
        python: interpreter (on the nodes) that records a failed task's status.
    """
    out_path = Path(out_path) if out_path is not None else plan.sweep_dir / "slurm_array.sh"
    log_dir = plan.sweep_dir / "slurm"
    last = len(plan.runs) - 1
    array = f"0-{last}" + (f"%{max_parallel}" if max_parallel else "")
    directives = [
        f"--job-name={job_name or plan.name}",
        f"--array={array}",
        f"--output={log_dir}/%A_%a.out",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        f"--time={time_limit}",
    ]
    for option, value in (
        ("partition", partition),
        ("account", account),
        ("gpus-per-node", gpus_per_node),
        ("cpus-per-task", cpus_per_task),
        ("mem", mem),
    ):
        if value is not None:
            directives.append(f"--{option}={value}")
    directives += list(extra_directives)
    python = shlex.quote(python)
    lines = ["#!/bin/bash"] + [f"#SBATCH {d}" for d in directives]
    lines += [
        f"# mtflow sweep {plan.name!r}: {len(plan.runs)} runs. Generated by mtflow.eval.sweep; edit the grid, not this.",
        "set -uo pipefail",
        f"mkdir -p {shlex.quote(str(log_dir))}",
        f"cd {shlex.quote(str(Path(workdir).resolve() if workdir else Path.cwd()))}",
        *setup_lines,
        'case "$SLURM_ARRAY_TASK_ID" in',
    ]
    for run in plan.runs:
        lines.append(
            f"  {run.index}) RUN_DIR={shlex.quote(str(run.directory))}; CMD=({shlex.join(command_builder(run))}) ;;"
        )
    lines += [
        '  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;',
        "esac",
        'echo "run $RUN_DIR: ${CMD[*]}"',
        "START=$(date +%s)",
        '"${CMD[@]}"',
        "CODE=$?",
        'if [ "$CODE" -ne 0 ]; then',
        f'  {python} -m mtflow.eval.sweep mark-failed "$RUN_DIR" --code "$CODE" '
        '--wall-clock-s "$(( $(date +%s) - START ))" '
        '--log "${SLURM_JOB_ID:-}_${SLURM_ARRAY_TASK_ID}"',
        "fi",
        'exit "$CODE"',
    ]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out_path.chmod(0o755)
    return out_path


def write_wandb_sweep(
    plan: SweepPlan,
    out_path: str | Path | None = None,
    *,
    grid: SweepGrid | None = None,
    mode: str = "configs",
    project: str | None = None,
    entity: str | None = None,
    metric_name: str = "eval/overall_final",
    metric_goal: str = "maximize",
    launcher: Sequence[str] = ("${env}", "${interpreter}", "-m", "mtflow", "fit"),
) -> Path:
    """Write a W&B sweep file (``wandb sweep <file>`` then ``wandb agent <id>``); returns its path.

    Modes:
        ``configs`` (default): one grid parameter ``config`` over the resolved run configs; W&B expands ``${args}``
            to ``--config=<run>/config.yaml``, so W&B runs exactly the configs the local and Slurm runners use
            (cost matching and run folders included).
        ``axes``: the axes become W&B parameters (``--model.group_size=4``) on top of the base configs and
            overrides; needs ``grid``; refused with cost matching or run-folder keys (W&B cannot derive per-run
            values) and for non-scalar axis values.
    """
    if mode not in ("configs", "axes"):
        raise SweepError(f"mode must be 'configs' or 'axes', got {mode!r}")
    out_path = Path(out_path) if out_path is not None else plan.sweep_dir / "wandb_sweep.yaml"
    command = list(launcher)
    if mode == "configs":
        parameters: dict[str, Any] = {"config": {"values": [str(run.config_path) for run in plan.runs]}}
    else:
        if grid is None:
            raise SweepError("mode 'axes' needs the grid (base configs and overrides)")
        if grid.cost_match is not None or grid.run_dir_keys:
            raise SweepError(
                "mode 'axes' cannot express cost_match or run_dir_keys (W&B cannot derive per-run values); "
                "use mode 'configs'"
            )
        parameters = {}
        for key, value in grid.overrides.items():
            if isinstance(value, (dict, list)):
                raise SweepError(f"mode 'axes' needs scalar values; override {key!r} is {value!r}")
            parameters[key] = {"value": value}
        for key, values in grid.axes.items():
            if any(isinstance(v, (dict, list)) for v in values):
                raise SweepError(f"mode 'axes' needs scalar values; axis {key!r} has {values!r}")
            parameters[key] = {"values": list(values)}
        for base in grid.base_configs:
            command += ["--config", str(base)]
    command.append("${args}")
    sweep: dict[str, Any] = {"name": plan.name, "method": "grid"}
    if project:
        sweep["project"] = project
    if entity:
        sweep["entity"] = entity
    sweep["metric"] = {"name": metric_name, "goal": metric_goal}
    sweep["parameters"] = parameters
    sweep["command"] = command
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(yaml.safe_dump(sweep, sort_keys=False), encoding="utf-8")
    return out_path


# ----------------------------------------------------------------------------------------------------- collect


@dataclass
class RunResult:
    """One collected run.

    Attributes:
        name: run folder name.
        axes: the run's axis values.
        group_size: G read from its resolved config.
        num_steps: T read from its resolved config.
        final_overall: the primary condition's O at the last turn (held-out evaluation), [0, 100].
        final_reward: last logged value of the reward metric.
        wall_clock_s, samples_seen: from status.json.
        reward_curve: (step, value) pairs of the reward metric.
        derived: values computed for this run (e.g. the cost-matched batch size).
    """

    name: str
    axes: dict[str, Any]
    group_size: Any
    num_steps: Any
    final_overall: float
    final_reward: float
    wall_clock_s: float
    samples_seen: int
    reward_curve: list[tuple[float, float]]
    derived: dict[str, Any] = field(default_factory=dict)


@dataclass
class CellSummary:
    """Mean and sample std (ddof 1; 0 for one run) over the runs sharing one (G, T) cell, e.g. seeds."""

    group_size: Any
    num_steps: Any
    num_runs: int
    overall_mean: float
    overall_std: float
    reward_mean: float
    reward_std: float
    wall_clock_mean_s: float
    samples_seen_mean: float


@dataclass
class SweepSummary:
    """What ``collect`` produced (``files``: name -> written path)."""

    runs: list[RunResult]
    cells: list[CellSummary]
    files: dict[str, Path]


def read_metrics_csv(path: Path, key: str) -> list[tuple[float, float]]:
    """(step, value) of every row of a CSVLogger ``metrics.csv`` where ``key`` is logged (empty cells skipped)."""
    with path.open("r", encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        if "step" not in columns or key not in columns:
            missing = [c for c in ("step", key) if c not in columns]
            raise SweepError(f"{path}: column(s) {missing} missing (columns: {columns})")
        points = []
        for row in reader:
            if row.get(key) not in (None, ""):
                points.append((float(row["step"]), float(row[key])))
    return points


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))


def summarise_cells(runs: Sequence[RunResult]) -> list[CellSummary]:
    """Group runs by (G, T) and average everything else away (seeds, other axes)."""
    cells: dict[tuple[Any, Any], list[RunResult]] = {}
    for run in runs:
        cells.setdefault((run.group_size, run.num_steps), []).append(run)
    summaries = []
    for (group, steps), members in sorted(
        cells.items(), key=lambda item: (_sort_key(item[0][1]), _sort_key(item[0][0]))
    ):
        overall = _mean_std([m.final_overall for m in members])
        reward = _mean_std([m.final_reward for m in members])
        summaries.append(
            CellSummary(
                group_size=group,
                num_steps=steps,
                num_runs=len(members),
                overall_mean=overall[0],
                overall_std=overall[1],
                reward_mean=reward[0],
                reward_std=reward[1],
                wall_clock_mean_s=sum(m.wall_clock_s for m in members) / len(members),
                samples_seen_mean=sum(m.samples_seen for m in members) / len(members),
            )
        )
    return summaries


def make_metric_vs_group_figure(cells: Sequence[CellSummary]) -> Figure:
    """Two panels, final O_K and final reward against G, one line per T (mean over seeds, error bar = std).
    Each line's label is ``T=<value>``."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    axes = figure.subplots(1, 2)
    steps_values = sorted({c.num_steps for c in cells}, key=_sort_key)
    groups = sorted({c.group_size for c in cells}, key=_sort_key)
    for ax, (mean_attr, std_attr, title) in zip(
        axes,
        (
            ("overall_mean", "overall_std", "final held-out O_K"),
            ("reward_mean", "reward_std", "final training reward"),
        ),
    ):
        for steps in steps_values:
            members = sorted(
                (c for c in cells if c.num_steps == steps), key=lambda c: _sort_key(c.group_size)
            )
            ax.errorbar(
                [c.group_size for c in members],
                [getattr(c, mean_attr) for c in members],
                yerr=[getattr(c, std_attr) for c in members],
                marker="o",
                capsize=3,
                label=f"T={steps}",
            )
        if all(isinstance(g, (int, float)) and g > 0 for g in groups):
            ax.set_xscale("log", base=2)
            ax.set_xticks(groups, [str(g) for g in groups])
        ax.set_xlabel("group size G")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return figure


def heatmap_matrix(cells: Sequence[CellSummary]) -> tuple[list[Any], list[Any], list[list[float]]]:
    """(T values, G values, matrix[T index][G index] of mean final O_K; NaN where no run)."""
    steps_values = sorted({c.num_steps for c in cells}, key=_sort_key)
    groups = sorted({c.group_size for c in cells}, key=_sort_key)
    matrix = [[math.nan] * len(groups) for _ in steps_values]
    for cell in cells:
        matrix[steps_values.index(cell.num_steps)][groups.index(cell.group_size)] = cell.overall_mean
    return steps_values, groups, matrix


def make_heatmap_figure(cells: Sequence[CellSummary]) -> Figure:
    """Heat map of mean final O_K over G (columns) x T (rows), each cell annotated with its value."""
    from matplotlib.figure import Figure

    steps_values, groups, matrix = heatmap_matrix(cells)
    figure = Figure(figsize=(1.6 + 1.2 * len(groups), 1.4 + 0.9 * len(steps_values)), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(matrix, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(groups)), [str(g) for g in groups])
    ax.set_yticks(range(len(steps_values)), [str(t) for t in steps_values])
    ax.set_xlabel("group size G")
    ax.set_ylabel("sampler steps T")
    ax.set_title("final held-out O_K")
    for row, values in enumerate(matrix):
        for column, value in enumerate(values):
            if not math.isnan(value):
                ax.text(column, row, f"{value:.1f}", ha="center", va="center", color="white", fontsize=9)
    figure.colorbar(image, ax=ax)
    return figure


def make_reward_curves_figure(
    runs: Sequence[RunResult], reward_key: str, label_keys: Sequence[str] = ()
) -> Figure:
    """The reward metric against step for every run: one panel per T, colour by G, one line per run.

    Args:
        runs: collected runs.
        reward_key: the metric's name (axis label).
        label_keys: axis keys shown in each line's label besides G (e.g. the seed); the label reads
            ``G=4 seed_everything=1``.
    """
    from matplotlib.figure import Figure

    steps_values = sorted({run.num_steps for run in runs}, key=_sort_key)
    groups = sorted({run.group_size for run in runs}, key=_sort_key)
    figure = Figure(figsize=(5 * len(steps_values), 4), layout="constrained")
    axes = figure.subplots(1, len(steps_values), squeeze=False)[0]
    palette = [f"C{i % 10}" for i in range(len(groups))]
    for ax, steps in zip(axes, steps_values):
        for run in (r for r in runs if r.num_steps == steps):
            label = " ".join(
                [f"G={run.group_size}"] + [f"{k.rsplit('.', 1)[-1]}={run.axes[k]}" for k in label_keys]
            )
            ax.plot(
                [step for step, _ in run.reward_curve],
                [value for _, value in run.reward_curve],
                color=palette[groups.index(run.group_size)],
                linewidth=1.2,
                label=label,
            )
        ax.set_title(f"T={steps}")
        ax.set_xlabel("step")
        ax.set_ylabel(reward_key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    return figure


def _format(value: Any, digits: int = 2) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def render_summary_markdown(plan: SweepPlan, runs: Sequence[RunResult], cells: Sequence[CellSummary]) -> str:
    """Per-run table and per-(G, T) table (mean +- std over the runs in the cell)."""
    axis_keys = list(plan.axes)
    derived_keys = sorted({k for r in runs for k in r.derived})
    header = ["run", *axis_keys, *derived_keys, "final O_K", "final reward", "wall-clock s", "samples seen"]
    lines = [f"# Sweep {plan.name}", "", f"{len(runs)} runs.", "", "| " + " | ".join(header) + " |"]
    lines.append("| " + " | ".join("---" for _ in header) + " |")
    for run in runs:
        cells_text = [
            run.name,
            *(_format(run.axes[k]) for k in axis_keys),
            *(_format(run.derived.get(k, "")) for k in derived_keys),
            _format(run.final_overall),
            _format(run.final_reward, 4),
            _format(run.wall_clock_s, 1),
            str(run.samples_seen),
        ]
        lines.append("| " + " | ".join(cells_text) + " |")
    lines += [
        "",
        "## Per (G, T), mean +- std over the runs in each cell",
        "",
        "| G | T | runs | final O_K | final reward | wall-clock s | samples seen |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cell in cells:
        lines.append(
            f"| {cell.group_size} | {cell.num_steps} | {cell.num_runs} | "
            f"{_format(cell.overall_mean)} +- {_format(cell.overall_std)} | "
            f"{_format(cell.reward_mean, 4)} +- {_format(cell.reward_std, 4)} | "
            f"{_format(cell.wall_clock_mean_s, 1)} | {_format(cell.samples_seen_mean, 0)} |"
        )
    return "\n".join(lines) + "\n"


def collect(
    sweep_dir: str | Path,
    *,
    out_dir: str | Path | None = None,
    group_key: str = "model.group_size",
    steps_key: str = "model.num_steps",
    reward_key: str = "reward/mean",
) -> SweepSummary:
    """Read every run of an expanded sweep into one table and plots.

    Args:
        sweep_dir: the sweep folder (with ``sweep.json``).
        out_dir: where to write ``summary.csv``, ``summary.md``, ``metric_vs_G.png``, ``heatmap_G_T.png``,
            ``reward_curves.png`` (default: the sweep folder).
        group_key: dotted config key of G (read from each run's resolved config).
        steps_key: dotted config key of T.
        reward_key: metrics.csv column of the training reward.

    Raises:
        SweepIncompleteError naming every run that is missing, failed, still running or lacks its metrics or
        evaluation report.
    """
    from mtflow.eval.report import read_report

    plan = load_plan(sweep_dir)
    problems: dict[str, str] = {}
    results: list[RunResult] = []
    for run in plan.runs:
        if not run.directory.is_dir():
            problems[run.name] = f"run folder missing ({run.directory})"
            continue
        try:
            status = RunStatus.read(run.directory)
        except SweepError as error:
            problems[run.name] = str(error)
            continue
        if status is None:
            problems[run.name] = f"never ran: no {run.status_path}"
            continue
        if status.status != "completed":
            detail = f": {status.error}" if status.error else ""
            problems[run.name] = f"status {status.status!r}{detail}"
            continue
        try:
            config = _load_yaml(run.config_path)
            group, steps = get_dotted(config, group_key), get_dotted(config, steps_key)
        except KeyError as error:
            problems[run.name] = f"{run.config_path} has no {error.args[0]!r}"
            continue
        except SweepError as error:
            problems[run.name] = str(error)
            continue
        if not run.metrics_path.is_file():
            problems[run.name] = f"completed but {run.metrics_path} is missing"
            continue
        try:
            curve = read_metrics_csv(run.metrics_path, reward_key)
        except (SweepError, ValueError) as error:
            problems[run.name] = str(error)
            continue
        if not curve:
            problems[run.name] = f"{run.metrics_path} has no {reward_key!r} value"
            continue
        if not run.report_path.is_file():
            problems[run.name] = f"completed but the held-out evaluation {run.report_path} is missing"
            continue
        try:
            report = read_report(run.report_path)
        except (OSError, ValueError) as error:
            problems[run.name] = str(error)
            continue
        results.append(
            RunResult(
                name=run.name,
                axes=run.axes,
                group_size=group,
                num_steps=steps,
                final_overall=report.final_overall,
                final_reward=curve[-1][1],
                wall_clock_s=status.wall_clock_s,
                samples_seen=status.samples_seen,
                reward_curve=curve,
                derived=run.derived,
            )
        )
    if problems:
        raise SweepIncompleteError(plan.sweep_dir, problems)

    out_dir = Path(out_dir) if out_dir is not None else plan.sweep_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = summarise_cells(results)
    files = {
        "csv": out_dir / "summary.csv",
        "markdown": out_dir / "summary.md",
        "metric_vs_G": out_dir / "metric_vs_G.png",
        "heatmap": out_dir / "heatmap_G_T.png",
        "reward_curves": out_dir / "reward_curves.png",
    }
    axis_keys = list(plan.axes)
    derived_keys = sorted({k for r in results for k in r.derived})
    with files["csv"].open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["run", *axis_keys, *derived_keys, "group_size", "num_steps", "final_overall", "final_reward",
             "wall_clock_s", "samples_seen"]
        )  # fmt: skip
        for r in results:
            writer.writerow(
                [r.name, *(r.axes[k] for k in axis_keys), *(r.derived.get(k, "") for k in derived_keys),
                 r.group_size, r.num_steps, r.final_overall, r.final_reward, r.wall_clock_s, r.samples_seen]
            )  # fmt: skip
    files["markdown"].write_text(render_summary_markdown(plan, results, cells), encoding="utf-8")
    make_metric_vs_group_figure(cells).savefig(files["metric_vs_G"], dpi=100)
    make_heatmap_figure(cells).savefig(files["heatmap"], dpi=100)
    other_keys = [k for k in axis_keys if k not in (group_key, steps_key)]
    make_reward_curves_figure(results, reward_key, other_keys).savefig(files["reward_curves"], dpi=100)
    return SweepSummary(runs=results, cells=cells, files=files)


# --------------------------------------------------------------------------------------------------------- CLI


def build_arg_parser() -> argparse.ArgumentParser:
    """``python -m mtflow.eval.sweep {expand,run,slurm,wandb,collect,mark-failed}``."""
    parser = argparse.ArgumentParser(
        prog="mtflow sweep", description="Expand, launch and collect ablation sweeps."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def with_grid(p: argparse.ArgumentParser) -> None:
        p.add_argument("--grid", required=True, type=Path, help="grid YAML (e.g. configs/sweeps/G_T.yaml)")
        p.add_argument("--out", required=True, type=Path, help="sweep folder")
        p.add_argument("--overwrite", action="store_true", help="replace a different plan in --out")

    with_grid(sub.add_parser("expand", help="write the run folders and resolved configs"))
    run = sub.add_parser("run", help="expand, then run every run locally one after another")
    with_grid(run)
    run.add_argument("--python", default=sys.executable, help="interpreter for the runs")
    run.add_argument("--rerun-completed", action="store_true", help="also rerun runs already completed")
    run.add_argument("--stop-on-failure", action="store_true")
    slurm = sub.add_parser("slurm", help="expand, then write a Slurm array script")
    with_grid(slurm)
    slurm.add_argument("--python", default="python", help="interpreter on the cluster nodes")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--time", default="04:00:00")
    slurm.add_argument("--gpus-per-node", type=int)
    slurm.add_argument("--cpus-per-task", type=int)
    slurm.add_argument("--mem")
    slurm.add_argument("--max-parallel", type=int)
    slurm.add_argument(
        "--setup", action="append", default=[], help="shell line run before each task (repeatable)"
    )
    wandb = sub.add_parser("wandb", help="expand, then write a W&B sweep file")
    with_grid(wandb)
    wandb.add_argument("--mode", choices=("configs", "axes"), default="configs")
    wandb.add_argument("--project")
    wandb.add_argument("--entity")
    coll = sub.add_parser("collect", help="table and plots of a finished sweep")
    coll.add_argument("sweep_dir", type=Path)
    coll.add_argument("--group-key", default="model.group_size")
    coll.add_argument("--steps-key", default="model.num_steps")
    coll.add_argument("--reward-key", default="reward/mean")
    failed = sub.add_parser("mark-failed", help="record a failed run (used by the Slurm script)")
    failed.add_argument("run_dir", type=Path)
    failed.add_argument("--code", type=int, required=True)
    failed.add_argument("--wall-clock-s", type=float)
    failed.add_argument("--log", default="")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    args = build_arg_parser().parse_args(argv)
    try:
        if args.command == "mark-failed":
            where = f" (Slurm log {args.log})" if args.log else ""
            mark_failed(args.run_dir, f"command exited with code {args.code}{where}", args.wall_clock_s)
            return 0
        if args.command == "collect":
            summary = collect(
                args.sweep_dir, group_key=args.group_key, steps_key=args.steps_key, reward_key=args.reward_key
            )
            print(summary.files["markdown"].read_text(encoding="utf-8"))
            return 0
        grid = load_grid(args.grid)
        plan = expand_grid(grid, args.out, overwrite=args.overwrite)
        print(f"sweep {plan.name!r}: {len(plan.runs)} runs in {plan.sweep_dir}")
        if args.command == "run":
            outcomes = run_local(
                plan,
                lambda r: default_fit_command(r, python=args.python),
                skip_completed=not args.rerun_completed,
                stop_on_failure=args.stop_on_failure,
            )
            failed_runs = [o for o in outcomes if o.status.status != "completed"]
            for outcome in outcomes:
                note = " (already completed)" if outcome.skipped else ""
                print(f"  {outcome.run.name}: {outcome.status.status}{note}")
            return 1 if failed_runs else 0
        if args.command == "slurm":
            path = write_slurm_array(
                plan,
                command_builder=lambda r: default_fit_command(r, python=args.python),
                partition=args.partition,
                account=args.account,
                time_limit=args.time,
                gpus_per_node=args.gpus_per_node,
                cpus_per_task=args.cpus_per_task,
                mem=args.mem,
                max_parallel=args.max_parallel,
                setup_lines=args.setup,
                python=args.python,
            )
            print(f"wrote {path}; submit with: sbatch {path}")
        if args.command == "wandb":
            path = write_wandb_sweep(
                plan, grid=grid, mode=args.mode, project=args.project, entity=args.entity
            )
            print(f"wrote {path}; start with: wandb sweep {path}")
        return 0
    except SweepError as error:
        print(f"sweep: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
