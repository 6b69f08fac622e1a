"""Launching a sweep on a scheduler: a Slurm array script (job shape derived from the runs' resolved configs,
auto-requeue, completed runs left out) or a W&B sweep file. The launched command is ``mtflow fit --config
<run>/config.yaml``, as for the local launchers in ``launchers.py``."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from mtflow.sweeps.grid import SweepGrid
from mtflow.sweeps.launchers import _is_completed, default_fit_command
from mtflow.sweeps.plan import SweepPlan, SweepRun
from mtflow.sweeps.status import SweepError

SLURM_REQUEUE_SIGNAL = "SIGUSR1"  # what Lightning's SLURMEnvironment listens for (auto-requeue)


def slurm_job_shape(plan: SweepPlan) -> tuple[int, int, bool]:
    """``(num_nodes, devices per node, on GPUs)`` shared by every run of ``plan``, read from the resolved configs.

    Raises:
        SweepError: a run's ``trainer.devices`` is not a number of devices, or the runs differ (one array script
            has one set of ``#SBATCH`` directives).
    """
    shapes: dict[tuple[int, int, bool], list[str]] = {}
    for run in plan.runs:
        trainer = (yaml.safe_load(run.config_path.read_text(encoding="utf-8")) or {}).get("trainer") or {}
        devices, nodes = trainer.get("devices", "auto"), trainer.get("num_nodes", 1)
        if isinstance(devices, list):
            devices = len(devices)
        try:
            devices, nodes = int(devices), int(nodes)
        except (TypeError, ValueError):
            raise SweepError(
                f"{run.name}: trainer.devices={devices!r}, trainer.num_nodes={nodes!r}; a Slurm script needs numbers "
                "(Lightning requires --ntasks-per-node to equal devices)"
            ) from None
        if devices < 1 or nodes < 1:
            raise SweepError(f"{run.name}: trainer.devices={devices}, num_nodes={nodes}; both must be >= 1")
        on_gpu = str(trainer.get("accelerator", "auto")) in ("gpu", "cuda", "auto")
        shapes.setdefault((nodes, devices, on_gpu), []).append(run.name)
    if len(shapes) > 1:
        described = "; ".join(
            f"{n} node(s) x {d} device(s): {', '.join(r)}" for (n, d, _), r in shapes.items()
        )
        raise SweepError(
            f"the runs need different job shapes, which one array script cannot hold: {described}"
        )
    return next(iter(shapes))


def write_slurm_array(
    plan: SweepPlan,
    out_path: str | Path | None = None,
    *,
    command_builder: Callable[[SweepRun], Sequence[str]] = lambda run: default_fit_command(run, resume=True),
    job_name: str | None = None,
    partition: str | None = None,
    account: str | None = None,
    time_limit: str = "04:00:00",
    cpus_per_task: int | None = None,
    mem: str | None = None,
    max_parallel: int | None = None,
    requeue_signal_s: int = 90,
    setup_lines: Sequence[str] = (),
    extra_directives: Sequence[str] = (),
    workdir: str | Path | None = None,
    python: str = sys.executable,
    skip_completed: bool = True,
) -> Path | None:
    """Write a Slurm array script with one task per run that is not completed yet (``sbatch <script>``); returns its
    path, or None when every run is completed already.

    The job shape comes from the runs' resolved configs (``slurm_job_shape``): ``--nodes=<num_nodes>``,
    ``--ntasks-per-node=<devices>`` and ``--gpus-per-node=<devices>`` (GPU runs), one task per device launched by
    ``srun``, as Lightning's ``SLURMEnvironment`` requires. ``--signal=SIGUSR1@<requeue_signal_s> --requeue``: Slurm
    warns that long before the time limit, the trainer saves at the end of the iteration in progress and requeues
    the task, which resumes from that checkpoint (``--ckpt_path last`` in the default command). A task whose run is
    completed when it starts (a resubmitted array, a requeue after the end) exits at once; a non-zero exit is
    recorded in the run's ``status.json`` (``python -m mtflow.sweeps mark-failed``) unless the trainer already
    recorded the failure.

    Args:
        plan: the expanded sweep.
        out_path: script path (default ``<sweep>/slurm_array.sh``).
        command_builder: run -> argv, launched under ``srun`` (mind the cluster's Python: e.g.
            ``partial(default_fit_command, python="python", resume=True)``).
        job_name: ``--job-name`` (default: the sweep name).
        partition, account, time_limit, cpus_per_task, mem: the usual sbatch directives (None: not written).
        max_parallel: at most this many array tasks at once (``%N``).
        requeue_signal_s: seconds before the time limit that Slurm sends SIGUSR1; more than one RL iteration takes
            (the save waits for the iteration in progress), see ``perf/iteration_s``.
        setup_lines: shell lines before the run (``module load ...``, ``source venv/bin/activate``).
        extra_directives: more ``#SBATCH`` options, e.g. ``"--qos=high"``.
        workdir: folder to ``cd`` into first (default: the current one at writing time).
        python: interpreter (on the nodes) that checks and records a task's status.
        skip_completed: leave runs whose status is already ``completed`` out of the array.
    """
    name = job_name or plan.name
    if name in ("bash", "interactive"):  # Lightning's SLURMEnvironment ignores jobs with these names
        raise SweepError(f"job name {name!r} hides the job from Lightning's Slurm detection; choose another")
    if requeue_signal_s < 1:
        raise SweepError(f"requeue_signal_s must be >= 1, got {requeue_signal_s}")
    nodes, devices, on_gpu = slurm_job_shape(plan)
    runs = [run for run in plan.runs if not (skip_completed and _is_completed(run))]
    if not runs:
        return None
    out_path = Path(out_path) if out_path is not None else plan.sweep_dir / "slurm_array.sh"
    log_dir = plan.sweep_dir / "slurm"
    indices = [run.index for run in runs]
    contiguous = len(indices) > 1 and indices == list(range(indices[0], indices[-1] + 1))
    array = f"{indices[0]}-{indices[-1]}" if contiguous else ",".join(str(i) for i in indices)
    array += f"%{max_parallel}" if max_parallel else ""
    directives = [
        f"--job-name={name}",
        f"--array={array}",
        f"--output={log_dir}/%A_%a.out",
        f"--nodes={nodes}",
        f"--ntasks-per-node={devices}",
        f"--time={time_limit}",
        f"--signal={SLURM_REQUEUE_SIGNAL}@{requeue_signal_s}",
        "--requeue",
    ]
    if on_gpu:
        directives.append(f"--gpus-per-node={devices}")
    for option, value in (
        ("partition", partition),
        ("account", account),
        ("cpus-per-task", cpus_per_task),
        ("mem", mem),
    ):
        if value is not None:
            directives.append(f"--{option}={value}")
    directives += list(extra_directives)
    python = shlex.quote(python)
    lines = ["#!/bin/bash"] + [f"#SBATCH {d}" for d in directives]
    lines += [
        f"# mtflow sweep {plan.name!r}: {len(runs)} of {len(plan.runs)} runs. Generated by mtflow sweep slurm; "
        "edit the grid, not this.",
        "set -uo pipefail",
        f"mkdir -p {shlex.quote(str(log_dir))}",
        f"cd {shlex.quote(str(Path(workdir).resolve() if workdir else Path.cwd()))}",
        *setup_lines,
        'case "$SLURM_ARRAY_TASK_ID" in',
    ]
    for run in runs:
        lines.append(
            f"  {run.index}) RUN_DIR={shlex.quote(str(run.directory))}; CMD=({shlex.join(command_builder(run))}) ;;"
        )
    lines += [
        '  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;',
        "esac",
        # mtflow.sweeps, not the mtflow command: it imports no torch, so a broken node environment is recorded too
        f'if {python} -m mtflow.sweeps is-completed "$RUN_DIR"; then',
        '  echo "run $RUN_DIR is completed already; nothing to do"',
        "  exit 0",
        "fi",
        'echo "run $RUN_DIR: ${CMD[*]}"',
        "START=$(date +%s)",
        'srun "${CMD[@]}"',
        "CODE=$?",
        'if [ "$CODE" -ne 0 ]; then',
        f'  {python} -m mtflow.sweeps mark-failed "$RUN_DIR" --code "$CODE" '
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
        ``axes``: the axes become W&B parameters (``--model.rollout.group_size=4``) on top of the base configs and
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
