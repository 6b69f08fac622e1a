"""The ablation study of docs/ablations.md: the paper's claims tested on the toy world, 3 seeds per cell.

    python tools/ablations.py run [--parallel 2] [--only ref single_turn ...]   # mtflow sweep run, every grid
    python tools/ablations.py report                                           # docs/ablations.md + figures

``run`` expands every grid of ``configs/sweeps/ablations/`` with ``mtflow sweep`` into ``--root`` (one sweep folder
per grid) and runs them with ``mtflow sweep run`` (1 torch thread per run, ``--parallel`` grids at a time; finished
runs are skipped, so an interrupted study resumes). ``report`` reads every run folder (``eval/before_after.json``,
``eval/heldout_scores.json``, ``metrics.csv``, ``status.json``) and rebuilds every table and figure: per ablation,
C_3, CC_3, O_3 and M_1 - M_3 after RL (mean ± std over seeds), the difference to the reference cell with a paired
bootstrap CI (seeds resampled, then held-out chains within each seed: every cell of a seed is evaluated on the same
chains with the same noise), the learning curves, and a verdict on the paper's claim.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation_report import write_report  # noqa: E402
from ablation_study import ABLATIONS, GRIDS, REFERENCE, Cell, cell_of_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GRID_DIR = REPO / "configs" / "sweeps" / "ablations"
DEFAULT_ROOT = Path("/tmp/mtflow_ablations")


def run_grid(name: str, root: Path, log_dir: Path) -> tuple[str, int, float]:
    """``mtflow sweep run`` of one grid, 1 torch thread per run; returns (grid, exit code, seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "mtflow", "sweep", "run", "--grid", str(GRID_DIR / f"{name}.yaml")]
    command += ["--out", str(root / name)]
    started = time.perf_counter()
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{name}.log", "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    return name, done.returncode, time.perf_counter() - started


def run(args: argparse.Namespace) -> int:
    names = args.only or list(GRIDS)
    unknown = sorted(set(names) - set(GRIDS))
    if unknown:
        print(f"unknown grids {unknown}; known: {list(GRIDS)}", file=sys.stderr)
        return 2
    print(f"{len(names)} grids, {args.parallel} at a time, runs under {args.root}")
    failed = 0
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        for name, code, seconds in pool.map(lambda n: run_grid(n, args.root, args.root / "logs"), names):
            print(f"{name}: exit {code} after {seconds / 60:.1f} min", flush=True)
            failed += code != 0
    return 1 if failed else 0


def collect(root: Path) -> dict[Cell, dict[int, dict]]:
    """Every completed run under ``root``: cell -> seed -> {before_after, scores, curve, wall_clock_s, run}."""
    found: dict[Cell, dict[int, dict]] = {}
    for grid in GRIDS:
        runs = root / grid / "runs"
        if not runs.is_dir():
            continue
        for run_dir in sorted(runs.iterdir()):
            status_path, scores_path = run_dir / "status.json", run_dir / "eval" / "heldout_scores.json"
            if not status_path.is_file() or not scores_path.is_file():
                continue
            status = json.loads(status_path.read_text())
            if status.get("status") != "completed":
                continue
            plan_axes = json.loads((root / grid / "sweep.json").read_text())
            axes = next(r["axes"] for r in plan_axes["runs"] if r["name"] == run_dir.name)
            cell, seed = cell_of_run(grid, axes)
            found.setdefault(cell, {})[seed] = {
                "before_after": json.loads((run_dir / "eval" / "before_after.json").read_text()),
                "scores": json.loads(scores_path.read_text()),
                "curve": _reward_curve(run_dir / "metrics.csv"),
                "wall_clock_s": float(status.get("wall_clock_s") or 0.0),
                "run": str(run_dir),
            }
    return found


def _reward_curve(path: Path) -> list[float]:
    import csv

    if not path.is_file():
        return []
    with open(path) as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("reward/mean")]
    return [float(r["reward/mean"]) for r in rows]


def report(args: argparse.Namespace) -> int:
    found = collect(args.root)
    if REFERENCE not in found:
        print(
            f"no completed reference runs under {args.root}; run `python tools/ablations.py run` first",
            file=sys.stderr,
        )
        return 1
    missing = [(a.name, c.label) for a in ABLATIONS for c in a.cells if len(found.get(c, {})) < 3]
    if missing:
        print(f"cells with fewer than 3 completed seeds (reported as they are): {missing}", file=sys.stderr)
    path = write_report(
        found,
        args.out,
        args.figures,
        rng=np.random.default_rng(0),
        bootstrap=args.bootstrap,
        judge_cache=args.root / "judge_errors.json",
    )
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root", type=Path, default=DEFAULT_ROOT, help="study folder (one sweep folder per grid)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="expand and run the grids")
    run_parser.add_argument(
        "--parallel", type=int, default=2, help="grids at a time (1 torch thread per run)"
    )
    run_parser.add_argument("--only", nargs="+", help="grid names (default: all)")
    report_parser = commands.add_parser("report", help="tables and figures from the finished runs")
    report_parser.add_argument("--out", type=Path, default=REPO / "docs" / "ablations.md")
    report_parser.add_argument("--figures", type=Path, default=REPO / "docs" / "ablations")
    report_parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of each CI")
    args = parser.parse_args(argv)
    return run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
