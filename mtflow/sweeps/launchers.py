"""Launching the runs of an expanded sweep on this machine (subprocesses, one after another or several side by side
on their own GPUs; or in this process for tests); Slurm arrays and W&B sweep files are in ``schedulers.py``. Every launcher
runs ``mtflow fit --config <run>/config.yaml``, skips runs already completed, and records a run that failed without
saying so in its ``status.json``."""

from __future__ import annotations

import math
import os
import queue
import shlex
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mtflow.sweeps.plan import LOG_FILE, SweepPlan, SweepRun
from mtflow.sweeps.status import RunStatus, SweepError, mark_failed


def default_fit_command(run: SweepRun, python: str = sys.executable, resume: bool = False) -> list[str]:
    """``python -m mtflow fit --config <run>/config.yaml`` (``resume``: ``--ckpt_path last``, so a requeued or
    resubmitted run continues from its newest checkpoint, and starts from scratch when it has none)."""
    command = [python, "-m", "mtflow", "fit", "--config", str(run.config_path)]
    return command + (["--ckpt_path", "last"] if resume else [])


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


def _is_completed(run: SweepRun) -> RunStatus | None:
    try:
        previous = RunStatus.read(run.directory)
    except SweepError:  # a half-written or foreign status file: the run is simply rerun
        return None
    return previous if previous is not None and previous.status == "completed" else None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


class _Progress:
    """One line per run as it starts and as it ends, with the sweep's estimated time left (the mean wall clock of
    the runs finished so far x the runs left / the runs side by side)."""

    def __init__(self, total: int, parallel: int, report: Callable[[str], None] | None) -> None:
        self.total, self.parallel, self.report = total, parallel, report
        self.finished: list[float] = []
        self.lock = threading.Lock()

    def _eta(self, left: int) -> str:
        if not self.finished:
            return "ETA after the first run"
        mean = sum(self.finished) / len(self.finished)
        return f"ETA {_duration(mean * math.ceil(left / self.parallel))}" if left else "sweep done"

    def started(self, run: SweepRun, where: str) -> None:
        if self.report is not None:
            with self.lock:
                left = self.total - len(self.finished)
                self.report(
                    f"[{len(self.finished)}/{self.total}] {run.name}: started{where}; {self._eta(left)}"
                )

    def ended(self, run: SweepRun, status: RunStatus, seconds: float) -> None:
        with self.lock:
            self.finished.append(seconds)
            if self.report is not None:
                detail = f" at iteration {status.iteration}" if status.iteration is not None else ""
                left = self.total - len(self.finished)
                self.report(
                    f"[{len(self.finished)}/{self.total}] {run.name}: {status.status}{detail} in "
                    f"{_duration(seconds)}; {self._eta(left)}"
                )


def _run_all(
    plan: SweepPlan,
    execute: Callable[[SweepRun, int], tuple[bool, str, int | None]],
    skip_completed: bool,
    stop: bool,
    parallel: int = 1,
    report: Callable[[str], None] | None = None,
    slot_names: Sequence[str] = (),
) -> list[RunOutcome]:
    """Run ``execute(run, slot)`` for every run (``parallel`` at once, slot in 0..parallel-1) and record outcomes in
    plan order; runs never started because of ``stop`` are left out."""
    outcomes: dict[int, RunOutcome] = {}
    todo = []
    for run in plan.runs:
        previous = _is_completed(run) if skip_completed else None
        if previous is not None:
            outcomes[run.index] = RunOutcome(run=run, status=previous, skipped=True)
            if report is not None:
                report(f"{run.name}: already completed, skipped")
        else:
            todo.append(run)
    progress = _Progress(len(todo), parallel, report)
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(parallel):
        slots.put(slot)
    halted = threading.Event()

    def work(run: SweepRun) -> None:
        slot = slots.get()
        try:
            if halted.is_set():
                return
            RunStatus(status="running").write(run.directory)
            progress.started(run, f" ({slot_names[slot]})" if slot < len(slot_names) else "")
            start = time.perf_counter()
            ok, failure, returncode = execute(run, slot)
            status = _finish(run, ok, failure, time.perf_counter() - start)
            outcomes[run.index] = RunOutcome(run=run, status=status, returncode=returncode)
            progress.ended(run, status, time.perf_counter() - start)
            if stop and status.status != "completed":
                halted.set()
        finally:
            slots.put(slot)

    if parallel == 1:
        for run in todo:
            work(run)
            if halted.is_set():
                break
    else:
        with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="mtflow-sweep") as pool:
            for future in [pool.submit(work, run) for run in todo]:
                future.result()
    return [outcomes[run.index] for run in plan.runs if run.index in outcomes]


def single_device_problems(plan: SweepPlan) -> list[str]:
    """Runs whose resolved config needs more than one device or node (they cannot share a machine side by side)."""
    problems = []
    for run in plan.runs:
        trainer = (yaml.safe_load(run.config_path.read_text(encoding="utf-8")) or {}).get("trainer") or {}
        devices, nodes = trainer.get("devices", "auto"), trainer.get("num_nodes", 1)
        one = devices in (1, "1", "auto") or (isinstance(devices, list) and len(devices) == 1)
        if not one or nodes not in (1, "1"):
            problems.append(f"{run.name} (trainer.devices={devices!r}, num_nodes={nodes!r})")
    return problems


def run_local(
    plan: SweepPlan,
    command_builder: Callable[[SweepRun], Sequence[str]] = default_fit_command,
    *,
    skip_completed: bool = True,
    stop_on_failure: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout_s: float | None = None,
    parallel: int = 1,
    gpus: Sequence[str] = (),
    report: Callable[[str], None] | None = None,
) -> list[RunOutcome]:
    """Run every run of ``plan`` as a subprocess, ``parallel`` at a time; output goes to ``<run>/log.txt``.

    Args:
        plan: the expanded sweep.
        command_builder: run -> argv (default ``python -m mtflow fit --config <run>/config.yaml``).
        skip_completed: leave runs whose status is already ``completed`` alone (resume a sweep).
        stop_on_failure: stop at the first run that does not complete (default: run them all, report at the end).
        env: extra environment variables for the runs.
        cwd: working directory of the runs (default: the current one).
        timeout_s: per-run time limit; a run that exceeds it is killed and marked failed.
        parallel: runs side by side (more than 1 needs single-device runs).
        gpus: GPU ids shared out among the ``parallel`` slots (each run sees its slot's share as
            ``CUDA_VISIBLE_DEVICES``); empty: the environment's GPUs are left as they are.
        report: called with one line as each run starts and ends (wall clock, the sweep's time left).

    A run that exits non-zero, or exits 0 without its trainer recording ``completed``, is marked ``failed`` in its
    ``status.json`` (the trainer's own error message is kept when it wrote one).
    """
    if parallel < 1:
        raise SweepError(f"parallel must be >= 1, got {parallel}")
    if gpus and len(gpus) % parallel:
        raise SweepError(f"{len(gpus)} GPUs cannot be shared out evenly among {parallel} parallel runs")
    if parallel > 1:
        problems = single_device_problems(plan)
        if problems:
            raise SweepError(
                f"side-by-side runs must each use one device on one node; not: {', '.join(problems)} "
                "(run them one after another, or with mtflow sweep slurm)"
            )
    share = len(gpus) // parallel if gpus else 0
    slot_gpus = (
        [",".join(str(g) for g in gpus[i * share : (i + 1) * share]) for i in range(parallel)] if gpus else []
    )
    full_env = {**os.environ, **(env or {})}

    def execute(run: SweepRun, slot: int) -> tuple[bool, str, int | None]:
        command = [str(part) for part in command_builder(run)]
        log_path = run.directory / LOG_FILE
        run_env = {**full_env, "CUDA_VISIBLE_DEVICES": slot_gpus[slot]} if slot_gpus else full_env
        with log_path.open("w", encoding="utf-8") as log:
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            try:
                completed = subprocess.run(
                    command, stdout=log, stderr=subprocess.STDOUT, env=run_env, cwd=cwd, timeout=timeout_s
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

    names = [f"GPU {g}" for g in slot_gpus] if slot_gpus else []
    return _run_all(plan, execute, skip_completed, stop_on_failure, parallel, report, names)


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

    def execute(run: SweepRun, slot: int) -> tuple[bool, str, int | None]:
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
