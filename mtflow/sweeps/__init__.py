"""Ablation sweeps: expand a grid YAML into runs whose configs ``mtflow fit``'s own parser resolves, launch them
(locally, as a Slurm array, as a W&B sweep) and collect the results into a table and figures.

    grid       grid files, cartesian product, cost matching, expansion (``expand_grid``)
    plan       ``sweep.json`` and the run-folder layout
    status     ``status.json`` (``RunStatus``), written by the trainer and the runners
    launchers  local / in-process runners, Slurm array script, W&B sweep file
    collect    run folders -> ``summary.csv`` / ``summary.md``
    plots      matplotlib figures
    cli        ``mtflow sweep expand|run|slurm|wandb|collect``
"""

from mtflow.sweeps.collect import (
    CellSummary,
    RunResult,
    SweepIncompleteError,
    SweepSummary,
    collect,
    read_metrics_csv,
    render_summary_markdown,
    summarise_cells,
)
from mtflow.sweeps.grid import CostMatch, SweepGrid, config_value, expand_grid, load_grid, resolve_run_config
from mtflow.sweeps.launchers import (
    RunOutcome,
    default_fit_args,
    default_fit_command,
    run_in_process,
    run_local,
)
from mtflow.sweeps.plan import SweepPlan, SweepRun, load_plan
from mtflow.sweeps.plots import (
    heatmap_matrix,
    make_heatmap_figure,
    make_metric_vs_group_figure,
    make_reward_curves_figure,
)
from mtflow.sweeps.schedulers import write_slurm_array, write_wandb_sweep
from mtflow.sweeps.status import RunStatus, SweepError, mark_failed

__all__ = [
    "CellSummary",
    "CostMatch",
    "RunOutcome",
    "RunResult",
    "RunStatus",
    "SweepError",
    "SweepGrid",
    "SweepIncompleteError",
    "SweepPlan",
    "SweepRun",
    "SweepSummary",
    "collect",
    "config_value",
    "default_fit_args",
    "default_fit_command",
    "expand_grid",
    "heatmap_matrix",
    "load_grid",
    "load_plan",
    "make_heatmap_figure",
    "make_metric_vs_group_figure",
    "make_reward_curves_figure",
    "mark_failed",
    "read_metrics_csv",
    "render_summary_markdown",
    "resolve_run_config",
    "run_in_process",
    "run_local",
    "summarise_cells",
    "write_slurm_array",
    "write_wandb_sweep",
]
