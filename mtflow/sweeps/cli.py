"""``mtflow sweep {expand,run,slurm,wandb,collect,mark-failed}``: the command line of ``mtflow.sweeps``.

mtflow sweep expand --grid configs/sweeps/G_T.yaml --out sweeps/G_T   # one folder + resolved config per run
mtflow sweep run --grid configs/sweeps/G_T.yaml --out sweeps/G_T      # ... and run them (--parallel N --gpus ...)
mtflow sweep slurm --grid configs/sweeps/G_T.yaml --out sweeps/G_T    # or a Slurm array script (auto-requeue)
mtflow sweep wandb --grid configs/sweeps/G_T.yaml --out sweeps/G_T    # or a W&B sweep file
mtflow sweep collect sweeps/G_T                                       # summary.csv/.md and figures
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mtflow.sweeps.collect import collect
from mtflow.sweeps.grid import DEFAULT_GROUP_KEY, DEFAULT_STEPS_KEY, expand_grid, load_grid
from mtflow.sweeps.launchers import default_fit_command, run_local
from mtflow.sweeps.schedulers import write_slurm_array, write_wandb_sweep
from mtflow.sweeps.status import RunStatus, SweepError, mark_failed


def build_arg_parser() -> argparse.ArgumentParser:
    """The ``mtflow sweep`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="mtflow sweep", description="Expand, launch and collect ablation sweeps."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def with_grid(p: argparse.ArgumentParser) -> None:
        p.add_argument("--grid", required=True, type=Path, help="grid YAML (e.g. configs/sweeps/G_T.yaml)")
        p.add_argument("--out", required=True, type=Path, help="sweep folder")
        p.add_argument("--overwrite", action="store_true", help="replace a different plan in --out")

    with_grid(sub.add_parser("expand", help="validate every run's config, write the run folders and configs"))
    run = sub.add_parser("run", help="expand, then run the runs locally (one after another, or side by side)")
    with_grid(run)
    run.add_argument("--python", default=sys.executable, help="interpreter for the runs")
    run.add_argument("--rerun-completed", action="store_true", help="also rerun runs already completed")
    run.add_argument("--stop-on-failure", action="store_true")
    run.add_argument("--parallel", type=int, default=1, help="runs side by side (each must use one device)")
    run.add_argument(
        "--gpus",
        default="",
        help="GPU ids shared out among the parallel runs, e.g. 0,1,2,3 (CUDA_VISIBLE_DEVICES)",
    )
    slurm = sub.add_parser("slurm", help="expand, then write a Slurm array script")
    with_grid(slurm)
    slurm.add_argument("--python", default="python", help="interpreter on the cluster nodes")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--time", default="04:00:00")
    slurm.add_argument("--cpus-per-task", type=int)
    slurm.add_argument("--mem")
    slurm.add_argument("--max-parallel", type=int)
    slurm.add_argument(
        "--requeue-signal-s",
        type=int,
        default=90,
        help="seconds before the time limit Slurm sends SIGUSR1 (save and requeue); above one iteration's time",
    )
    slurm.add_argument("--rerun-completed", action="store_true", help="also put completed runs in the array")
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
    coll.add_argument("--group-key", default=DEFAULT_GROUP_KEY, help="config key of G")
    coll.add_argument("--steps-key", default=DEFAULT_STEPS_KEY, help="config key of T")
    coll.add_argument("--reward-key", default="reward/mean")
    done = sub.add_parser(
        "is-completed", help="exit 0 if the run's status is completed (used by the Slurm script)"
    )
    done.add_argument("run_dir", type=Path)
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
        if args.command == "is-completed":
            status = RunStatus.read(args.run_dir)
            return 0 if status is not None and status.status == "completed" else 1
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
                parallel=args.parallel,
                gpus=[g for g in args.gpus.split(",") if g.strip()],
                report=lambda line: print(line, flush=True),
            )
            failed_runs = [o for o in outcomes if o.status.status != "completed"]
            for outcome in failed_runs:
                error = (outcome.status.error or "").splitlines()
                print(f"  {outcome.run.name}: {outcome.status.status}: {error[0] if error else ''}")
            print(f"{len(outcomes) - len(failed_runs)} of {len(plan.runs)} runs completed")
            return 1 if failed_runs else 0
        if args.command == "slurm":
            path = write_slurm_array(
                plan,
                command_builder=lambda r: default_fit_command(r, python=args.python, resume=True),
                partition=args.partition,
                account=args.account,
                time_limit=args.time,
                cpus_per_task=args.cpus_per_task,
                mem=args.mem,
                max_parallel=args.max_parallel,
                requeue_signal_s=args.requeue_signal_s,
                setup_lines=args.setup,
                python=args.python,
                skip_completed=not args.rerun_completed,
            )
            if path is None:
                print(f"every run of {plan.name!r} is completed; nothing to submit")
            else:
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
