"""Launching the runs of an expanded sweep: one after another on this machine (subprocesses, or in this process for
tests), as a Slurm array script, or as a W&B sweep file. Every launcher runs ``mtflow fit --config
<run>/config.yaml`` and records a run that failed without saying so in its ``status.json``."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mtflow.sweeps.grid import SweepGrid
from mtflow.sweeps.plan import LOG_FILE, SweepPlan, SweepRun
from mtflow.sweeps.status import RunStatus, SweepError, mark_failed


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
    ``status.json`` (``python -m mtflow.sweeps mark-failed``) unless the trainer already recorded the failure.

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
        f"# mtflow sweep {plan.name!r}: {len(plan.runs)} runs. Generated by mtflow sweep slurm; edit the grid, not this.",
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
        # mtflow.sweeps, not the mtflow command: it imports no torch, so a broken node environment is recorded too
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
