"""Benchmark the default job: held-out per-turn cumulative success C_k and overall O_k of the toy prior and after
RL (GRPO: ``configs/toy.yaml``, NFT: ``configs/toy.yaml`` + ``configs/toy_nft.yaml``), mean and spread over seeds,
with wall clock.

    python tools/bench_toy.py                         # 3 seeds x {grpo, nft}, runs under /tmp/mtflow_bench_toy
    python tools/bench_toy.py --seeds 0 --losses grpo --extra=--model.max_iterations=5
    python tools/bench_toy.py --reuse                 # finish an interrupted benchmark, keep the finished runs
    python tools/bench_toy.py --overlay configs/toy_drift.yaml --root /tmp/mtflow_bench_toy_drift  # the drift world

Each run is ``mtflow fit`` in its own process (``--threads`` torch threads) with ``--seed_everything`` set, which
seeds the LoRA initialisation, the rollouts, the update order and the data order; the prior and after-RL
numbers come from the run's ``eval/before_after.json``, written by ``HeldOutEvaluation`` (the same held-out
chains, the same deterministic per-chain noise before and after). Prints a Markdown table and writes
``<root>/bench_toy.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mtflow.toy.prior import write_json

REPO = Path(__file__).resolve().parents[1]
# each job's config files, stacked in order (NFT is an overlay on the default GRPO job)
CONFIGS = {
    "grpo": [REPO / "configs" / "toy.yaml"],
    "nft": [REPO / "configs" / "toy.yaml", REPO / "configs" / "toy_nft.yaml"],
}
TARGET_POINTS = 10.0  # the goal: turn-3 cumulative success at least this many points above the prior


def run_fit(
    configs: list[Path],
    root: Path,
    name: str,
    seed: int,
    threads: int,
    extra: list[str],
    reuse: bool = False,
    overlays: list[Path] | None = None,
) -> dict[str, Any]:
    """One ``mtflow fit`` in a subprocess; returns the run folder, wall clock and its before/after report.
    ``overlays`` are config files stacked on ``configs`` (e.g. ``configs/toy_drift.yaml``). With ``reuse``, a run
    whose report and wall clock are already on disk is read back instead of run again."""
    run = root / name / "version_0"
    report_path, wall_path = run / "eval" / "before_after.json", root / f"{name}.wall_clock_s"
    if reuse and report_path.is_file() and wall_path.is_file():
        report = json.loads(report_path.read_text())
        wall = float(wall_path.read_text())
        return {"run": str(run), "wall_clock_s": wall, "before": report["before"], "after": report["after"]}
    code = f"import torch; torch.set_num_threads({threads}); from mtflow.cli import main; main()"
    command = [
        sys.executable,
        "-c",
        code,
        "fit",
        *[argument for config in [*configs, *(overlays or [])] for argument in ("--config", str(config))],
        f"--seed_everything={seed}",
        f"--trainer.logger.init_args.save_dir={root}",
        f"--trainer.logger.init_args.name={name}",
        "--trainer.logger.init_args.version=0",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    log_path = root / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"{name}: mtflow fit failed with exit code {completed.returncode}; see {log_path}")
    wall_path.write_text(f"{wall:.1f}")
    report = json.loads(report_path.read_text())
    return {"run": str(run), "wall_clock_s": wall, "before": report["before"], "after": report["after"]}


def turn_values(report: dict[str, Any], metric: str) -> list[float]:
    """Per-turn point estimates of ``metric`` of the "model" condition (NaN where undefined)."""
    values = report["conditions"]["model"][metric]
    return [math.nan if v["value"] is None else float(v["value"]) for v in values]


def exposure_bias(report: dict[str, Any]) -> float:
    value = report["conditions"]["model"]["exposure_bias"]["value"]
    return math.nan if value is None else float(value)


def summarise(values: list[float]) -> tuple[float, float]:
    """(mean, sample std) ignoring NaN; std is 0 for one value."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def rows_for(runs: list[dict[str, Any]], which: str) -> dict[str, list[float]]:
    """Per seed: C_1..C_K, CC_1..CC_K, O_1..O_K, M_1 - M_K of ``which`` ("before" or "after")."""
    out: dict[str, list[float]] = {}
    for run in runs:
        report = run[which]
        for k, v in enumerate(turn_values(report, "cumulative_success"), start=1):
            out.setdefault(f"C_{k}", []).append(v)
        for k, v in enumerate(turn_values(report, "consistency"), start=1):
            out.setdefault(f"CC_{k}", []).append(v)
        for k, v in enumerate(turn_values(report, "overall"), start=1):
            out.setdefault(f"O_{k}", []).append(v)
        out.setdefault("M_1-M_K", []).append(exposure_bias(report))
    return out


def markdown_table(results: dict[str, list[dict[str, Any]]]) -> str:
    """Rows: prior (from the first loss's runs) and each loss after RL; cells: mean ± std over seeds."""
    lines = []
    first = next(iter(results.values()))
    columns = list(rows_for(first, "before"))
    lines.append("| model | " + " | ".join(columns) + " | wall clock (s) |")
    lines.append("| --- " * (len(columns) + 2) + "|")
    table_rows = [("prior", first, "before")] + [
        (f"after {loss}", runs, "after") for loss, runs in results.items()
    ]
    for label, runs, which in table_rows:
        data = rows_for(runs, which)
        cells = [f"{summarise(data[c])[0]:.1f} ± {summarise(data[c])[1]:.1f}" for c in columns]
        wall = "-" if which == "before" else f"{summarise([r['wall_clock_s'] for r in runs])[0]:.0f}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {wall} |")
    return "\n".join(lines)


def target_check(runs: list[dict[str, Any]]) -> list[float]:
    """Per seed: turn-K cumulative success after RL minus before, in points."""
    return [
        turn_values(r["after"], "cumulative_success")[-1] - turn_values(r["before"], "cumulative_success")[-1]
        for r in runs
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="trainer / data seeds")
    parser.add_argument("--losses", nargs="+", choices=sorted(CONFIGS), default=["grpo", "nft"])
    parser.add_argument("--root", type=Path, default=Path("/tmp/mtflow_bench_toy"), help="run folders")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (wall clock per run grows)")
    parser.add_argument("--extra", action="append", default=[], help="extra argument for every mtflow fit")
    parser.add_argument(
        "--overlay",
        type=Path,
        action="append",
        default=[],
        help="config stacked on each loss's config (e.g. configs/toy_drift.yaml: the drift world)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="read finished runs under --root back instead of running them again",
    )
    args = parser.parse_args(argv)

    jobs = [(loss, seed) for loss in args.losses for seed in args.seeds]

    def one(job: tuple[str, int]) -> dict[str, Any]:
        loss, seed = job
        name = f"{loss}_seed{seed}"
        run = run_fit(
            CONFIGS[loss], args.root, name, seed, args.threads, args.extra, args.reuse, args.overlay
        )
        run["seed"] = seed
        gain = target_check([run])[0]
        print(f"{name}: turn-K C {gain:+.1f} points, {run['wall_clock_s']:.0f} s", flush=True)
        return run

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        finished = list(pool.map(one, jobs))
    results: dict[str, list[dict[str, Any]]] = {}
    for (loss, _), run in zip(jobs, finished):
        results.setdefault(loss, []).append(run)
    table = markdown_table(results)
    print(table)
    summary: dict[str, Any] = {
        "table": table,
        "target_points": TARGET_POINTS,
        "overlays": [str(o) for o in args.overlay],
        "losses": {},
    }
    for loss, runs in results.items():
        gains = target_check(runs)
        before = rows_for(runs, "before")["M_1-M_K"]
        after = rows_for(runs, "after")["M_1-M_K"]
        summary["losses"][loss] = {
            "seeds": [r["seed"] for r in runs],
            "turn_K_gain_points": gains,
            "target_reached_every_seed": all(g >= TARGET_POINTS for g in gains),
            "exposure_bias_before": before,
            "exposure_bias_after": after,
            "wall_clock_s": [r["wall_clock_s"] for r in runs],
            "runs": [r["run"] for r in runs],
        }
        print(
            f"{loss}: turn-K cumulative success gain per seed {[round(g, 1) for g in gains]} "
            f"(target +{TARGET_POINTS:.0f} on every seed: {'reached' if all(g >= TARGET_POINTS for g in gains) else 'NOT reached'}); "
            f"exposure bias M_1-M_K {[round(v, 1) for v in before]} -> {[round(v, 1) for v in after]}"
        )
    write_json(summary, args.root / "bench_toy.json")  # NaN (an undefined metric) as null
    return summary


if __name__ == "__main__":
    main()
