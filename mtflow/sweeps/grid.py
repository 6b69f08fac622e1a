"""Grid files, their cartesian product and cost matching, expanded into a plan of runs with resolved configs.

Grid file (``configs/sweeps/G_T.yaml``)::

    name: G_T                              # optional (default: the file's stem)
    base_configs: [../flux_kontext.yaml, ../flux_kontext_grpo.yaml]  # relative to the grid file, stacked in order
    overrides: {trainer.max_steps: 20}     # keys set in every run
    axes:                                  # cartesian product, first axis slowest
      model.rollout.group_size: [2, 4]
      model.rollout.num_steps: [2, 3]
      seed_everything: [0, 1]
    cost_match:                            # optional: hold B x G constant
      key: data.init_args.batch_size       #   the key that absorbs it: key = total / G (must divide exactly)
      total: 8
      group_key: model.rollout.group_size  #   default
    run_dir_keys: [trainer.default_root_dir]  # keys set to each run's folder (absolute path)

Keys are ``mtflow fit`` command-line keys. Each run's config is what ``mtflow fit --config <base_configs...>
--<override>=<value> ... --<axis>=<value> ... --<cost_match.key>=<total / G> --<run_dir_key>=<run folder>``
resolves, parsed and validated by LightningCLI's own parser (``mtflow.cli.resolve_fit_config``): a misspelt key or
an invalid value fails ``expand``, naming the key, before any run folder is written. Strings are passed as typed on
a command line; other values (numbers, lists, mappings, null) as YAML text.

The sweep folder it writes is described in ``mtflow.sweeps.plan``.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtflow.sweeps.plan import PLAN_FILE, RUNS_DIR, SweepPlan, SweepRun
from mtflow.sweeps.status import SweepError

DEFAULT_GROUP_KEY = "model.rollout.group_size"
DEFAULT_STEPS_KEY = "model.rollout.num_steps"
_GRID_KEYS = {"name", "base_configs", "overrides", "axes", "cost_match", "run_dir_keys", "description"}


def load_yaml(path: Path) -> Any:
    try:
        with path.open("r", encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except FileNotFoundError:
        raise SweepError(f"file not found: {path}") from None
    except yaml.YAMLError as error:
        raise SweepError(f"{path}: invalid YAML ({error})") from error


def config_value(config: Mapping[str, Any], key: str) -> Any:
    """The value at dotted ``key`` of a resolved config (``data.batch_size`` also reaches
    ``data.init_args.batch_size``, as on the command line); KeyError naming the key when absent."""
    node: Any = config
    for part in key.split("."):
        if isinstance(node, Mapping) and part not in node and isinstance(node.get("init_args"), Mapping):
            node = node["init_args"]
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def fit_argument(key: str, value: Any) -> str:
    """``--key=value`` as ``mtflow fit`` takes it: a string as typed, anything else as one line of YAML (so lists,
    mappings, null and non-finite floats keep their structure)."""
    if isinstance(value, str):
        return f"--{key}={value}"
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf, allow_unicode=True).strip()
    return f"--{key}={text.removesuffix('...').strip()}"  # a scalar's dump ends with a document-end marker


@dataclass
class CostMatch:
    """Hold ``key * group_key`` at ``total`` (e.g. batch size B x group size G = rollouts per iteration)."""

    key: str
    total: int
    group_key: str = DEFAULT_GROUP_KEY


@dataclass
class SweepGrid:
    """A parsed grid file.

    Attributes:
        name: sweep name.
        base_configs: config files stacked in order under every run.
        axes: dotted key -> values; runs are their cartesian product (first axis slowest).
        overrides: dotted key -> value set in every run (after the base configs, before the axes).
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
        where = self.where
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

    @property
    def where(self) -> str:
        return f"grid {self.source}" if self.source else f"grid {self.name!r}"

    def assignments(self) -> list[dict[str, Any]]:
        """Axis values of every run: the cartesian product, first axis slowest."""
        keys = list(self.axes)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.axes[k] for k in keys))]

    def fit_arguments(
        self, assignment: Mapping[str, Any], run_dir: Path, derived: Mapping[str, Any] | None = None
    ) -> list[str]:
        """``mtflow fit`` arguments of one run: base configs, overrides, axis values, derived values, run folder."""
        args: list[str] = []
        for base in self.base_configs:
            args += ["--config", str(base)]
        for values in (
            self.overrides,
            assignment,
            derived or {},
            dict.fromkeys(self.run_dir_keys, str(run_dir)),
        ):
            args += [fit_argument(key, value) for key, value in values.items()]
        return args


def load_grid(path: str | Path) -> SweepGrid:
    """Parse a grid YAML (schema in the module docstring); base config paths become absolute."""
    path = Path(path).resolve()
    data = load_yaml(path)
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
            group_key=str(cost.get("group_key", DEFAULT_GROUP_KEY)),
        )
    run_dir_keys = data.get("run_dir_keys", []) or []
    if isinstance(run_dir_keys, str):
        run_dir_keys = [run_dir_keys]
    return SweepGrid(
        name=str(data.get("name") or path.stem),
        base_configs=base_paths,
        axes={str(k): v for k, v in (data.get("axes") or {}).items()},
        overrides={str(k): v for k, v in (data.get("overrides") or {}).items()},
        cost_match=cost_match,
        run_dir_keys=[str(k) for k in run_dir_keys],
        source=path,
    )


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Last dotted component of each key, or the whole key where that would be ambiguous."""
    leaves = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: (leaf if leaves.count(leaf) == 1 else key) for key, leaf in zip(keys, leaves)}


def _value_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:40] or "_"


def resolve_run_config(
    grid: SweepGrid, assignment: Mapping[str, Any], run_dir: Path, *, run_name: str = ""
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The full config of one run, resolved by ``mtflow fit``'s parser, and the values derived for it.

    With cost matching, G is the run's value of ``group_key`` (an axis or override; when neither gives a positive
    int, the config is resolved without the derived key to read it), and the resolved config must agree.

    Returns:
        (config, derived): the resolved config dict and {dotted key: value} computed by cost matching.
    """
    from mtflow.cli import resolve_fit_config  # the parser imports Lightning and the model classes: only here

    where = f"{grid.where}, run {run_name or dict(assignment)}"

    def resolve(derived: Mapping[str, Any]) -> dict[str, Any]:
        try:
            return resolve_fit_config(grid.fit_arguments(assignment, run_dir, derived))
        except ValueError as error:
            raise SweepError(f"{where}: not a valid mtflow fit config: {error}") from None

    rule = grid.cost_match
    if rule is None:
        return resolve({}), {}
    group = {**grid.overrides, **assignment}.get(rule.group_key)
    try:
        if (
            not isinstance(group, int) or isinstance(group, bool) or group < 1
        ):  # G is not given as such: resolve
            group = config_value(resolve({}), rule.group_key)
    except KeyError:
        raise SweepError(
            f"{where}: cost_match.group_key {rule.group_key!r} is not in the resolved config"
        ) from None
    if not isinstance(group, int) or isinstance(group, bool) or group < 1 or rule.total % group:
        raise SweepError(
            f"{where}: cost_match total {rule.total} is not divisible by {rule.group_key} = {group!r}"
        )
    derived = {rule.key: rule.total // group}
    config = resolve(derived)
    resolved = config_value(config, rule.group_key)
    if resolved != group:
        raise SweepError(
            f"{where}: {rule.group_key} resolves to {resolved!r}, not the {group} cost matching used"
        )
    return config, derived


def expand_grid(grid: SweepGrid | str | Path, sweep_dir: str | Path, *, overwrite: bool = False) -> SweepPlan:
    """Expand ``grid`` into ``sweep_dir``: one folder per run with its resolved ``config.yaml``, plus ``sweep.json``.

    Every run's config is resolved (and so validated) before anything is written. Re-expanding the same grid into
    the same folder is a no-op for the plan (so a sweep can be resumed); a different plan in an existing sweep
    folder is refused unless ``overwrite``.
    """
    if not isinstance(grid, SweepGrid):
        grid = load_grid(grid)
    sweep_dir = Path(sweep_dir).resolve()
    assignments = grid.assignments()
    short = _short_keys(list(grid.axes))
    width = max(3, len(str(len(assignments) - 1)))
    runs: list[SweepRun] = []
    configs: list[dict[str, Any]] = []
    for index, assignment in enumerate(assignments):
        name = f"r{index:0{width}d}__" + "__".join(
            f"{short[k]}={_value_text(v)}" for k, v in assignment.items()
        )
        directory = sweep_dir / RUNS_DIR / name
        config, derived = resolve_run_config(grid, assignment, directory, run_name=name)
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
