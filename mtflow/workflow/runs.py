"""``mtflow runs``: the runs under a folder (``ls``), one run (``show``) and its static HTML page (``gallery``).

    mtflow runs ls runs/
    mtflow runs show runs/toy/version_0
    mtflow runs gallery runs/toy/version_0        # writes runs/toy/version_0/gallery.html (open it in a browser)

A run folder is what ``mtflow fit`` writes (``status.json``, ``config.yaml``, ``images/``, ``eval/``, and the
metrics of a CSV or TensorBoard logger). Metrics are read from ``metrics.csv`` or from TensorBoard event files in
the folder; a W&B run keeps its metrics in W&B.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

import yaml

from mtflow.sweeps.status import STATUS_FILE, RunStatus


def find_runs(root: str | Path) -> list[Path]:
    """Every run folder (one holding ``status.json``) under ``root``, ``root`` itself included, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    return sorted(p.parent for p in root.rglob(STATUS_FILE))


def read_metrics(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Logged scalars by name: ``[(step, value), ...]`` from ``metrics.csv`` (CSV logger) or TensorBoard events."""
    series: dict[str, list[tuple[int, float]]] = {}
    path = run / "metrics.csv"
    if path.is_file():
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                step = int(float(row.get("step") or 0))
                for name, value in row.items():
                    if name not in ("step", "epoch") and value not in (None, ""):
                        series.setdefault(name, []).append((step, float(value)))
        return series
    if any(run.glob("events.out.tfevents*")):
        try:
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        except ImportError:
            return series
        events = EventAccumulator(str(run), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            series[tag] = [(e.step, float(e.value)) for e in events.Scalars(tag)]
    return series


def last(series: dict[str, list[tuple[int, float]]], name: str) -> float | None:
    values = [v for _, v in series.get(name, []) if math.isfinite(v)]
    return values[-1] if values else None


def eval_summary(run: Path) -> str:
    """``O_K before -> after`` of the held-out evaluation, or the report's O_K, or ``-``."""
    before_after = run / "eval" / "before_after.json"
    if before_after.is_file():
        data = json.loads(before_after.read_text())
        values = [data[side].get("final_overall") for side in ("before", "after")]
        return "O_K " + " -> ".join("n/a" if v is None else f"{v:.1f}" for v in values)
    report = run / "eval" / "report.json"
    if report.is_file():
        value = json.loads(report.read_text()).get("final_overall")
        return "O_K n/a" if value is None else f"O_K {value:.1f}"
    return "-"


def run_config(run: Path) -> dict[str, Any]:
    path = run / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def describe(run: Path) -> dict[str, Any]:
    """One run in a few facts: status, iteration, last fused reward, eval summary, base model, algorithm."""
    status = RunStatus.read(run)
    config = run_config(run)
    model = config.get("model") or {}
    policy = (model.get("policy") or {}).get("init_args") or {}
    reward = last(read_metrics(run), "reward/mean")
    return {
        "run": str(run),
        "status": status.status if status else "unknown",
        "iteration": status.iteration if status else None,
        "wall_clock_s": status.wall_clock_s if status else None,
        "error": status.error if status else None,
        "last_reward": reward,
        "eval": eval_summary(run),
        "pretrained": policy.get("pretrained"),
        "lora_rank": policy.get("lora_rank"),
        "algorithm": ((model.get("algorithm") or {}).get("class_path") or "").rsplit(".", 1)[-1] or None,
        "judge": ((model.get("scorer") or {}).get("class_path") or "").rsplit(".", 1)[-1] or None,
    }


def format_table(rows: list[dict[str, Any]], root: Path) -> str:
    header = ["run", "status", "iteration", "last reward", "held-out", "algorithm", "base"]
    lines = []
    for row in rows:
        run = Path(row["run"])
        lines.append(
            [
                str(run.relative_to(root)) if run != root and root in run.parents else str(run),
                row["status"],
                "-" if row["iteration"] is None else str(row["iteration"]),
                "-" if row["last_reward"] is None else f"{row['last_reward']:.3f}",
                row["eval"],
                row["algorithm"] or "-",
                row["pretrained"] or "-",
            ]
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)] if lines else []
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    out += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def show(run: Path) -> str:
    """A run's facts, its last logged metrics and its held-out before/after table."""
    facts = describe(run)
    lines = [f"{key}: {value}" for key, value in facts.items() if value is not None]
    series = read_metrics(run)
    shown = [n for n in sorted(series) if n.split("/")[0] in ("reward", "eval", "adv", "loss", "perf")]
    if shown:
        lines += ["", "last logged values:"]
        lines += [f"  {name}: {last(series, name):.4g}" for name in shown if last(series, name) is not None]
    table = run / "eval" / "before_after.md"
    if table.is_file():
        lines += ["", "held-out chains, before -> after RL:", table.read_text().rstrip()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mtflow runs", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ls = commands.add_parser("ls", help="the runs under a folder, one line each")
    ls.add_argument("root", nargs="?", default="runs", help="folder to search (default: runs)")
    ls.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    one = commands.add_parser("show", help="one run: facts, last metrics, held-out table")
    one.add_argument("run", help="the run folder")
    gallery = commands.add_parser("gallery", help="write <run>/gallery.html, a static page of the run")
    gallery.add_argument("run", help="the run folder")
    gallery.add_argument("--output", default=None, help="HTML file to write (default: <run>/gallery.html)")
    args = parser.parse_args(argv)
    try:
        if args.command == "ls":
            root = Path(args.root)
            rows = [describe(run) for run in find_runs(root)]
            if args.json:
                print("\n".join(json.dumps(row) for row in rows))
            else:
                print(format_table(rows, root) if rows else f"no runs under {root}")
            return
        run = Path(args.run)
        if RunStatus.read(run) is None and not (run / "config.yaml").is_file():
            raise ValueError(f"{run} is not a run folder (no status.json or config.yaml)")
        if args.command == "show":
            print(show(run))
        else:
            from mtflow.workflow.gallery import write_gallery

            print(f"wrote {write_gallery(run, args.output)}")
    except ValueError as error:
        raise SystemExit(f"mtflow runs {args.command}: {error}") from None
