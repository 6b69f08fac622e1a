"""A 2 x 2 sweep (G in {2, 4}, T in {2, 3}) of real ``mtflow fit`` runs on the tiny model, collected into a table
and plots; collect refuses, naming the run, when one is missing or failed."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from mtflow.cli import main
from mtflow.sweeps import SweepIncompleteError, collect, expand_grid, run_in_process
from mtflow.testing.fixtures import REPO_CONFIGS, write_random_manifest

pytestmark = pytest.mark.slow


def test_two_by_two_sweep_end_to_end(tiny_kontext_path, tmp_path):
    manifest = write_random_manifest(tmp_path / "data", num_chains=6, num_turns=2)
    grid = {
        "name": "tiny_G_T",
        "base_configs": [str(REPO_CONFIGS / "tiny" / "grpo.yaml")],
        "overrides": {
            "model.policy.init_args.pretrained": str(tiny_kontext_path),
            "data.init_args.train_manifest": str(manifest),
            "data.init_args.val_manifest": str(manifest),
            "model.max_iterations": 2,
            "trainer.enable_progress_bar": False,
            "trainer.logger.init_args.name": "",
            "trainer.logger.init_args.version": "",
            "heldout.num_chains": 4,
            "checkpoint.every_n_iterations": 0,
        },
        "axes": {"model.rollout.group_size": [2, 4], "model.rollout.num_steps": [2, 3]},
        "run_dir_keys": ["trainer.default_root_dir", "trainer.logger.init_args.save_dir"],
    }
    grid_path = tmp_path / "grid.yaml"
    grid_path.write_text(yaml.safe_dump(grid))
    plan = expand_grid(grid_path, tmp_path / "sweep")
    assert len(plan.runs) == 4
    outcomes = run_in_process(plan, main)
    assert [o.status.status for o in outcomes] == ["completed"] * 4, [o.status for o in outcomes]

    summary = collect(tmp_path / "sweep")
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "summary.csv")))
    assert len(rows) == 4
    assert sorted((r["model.rollout.group_size"], r["model.rollout.num_steps"]) for r in rows) == [
        ("2", "2"),
        ("2", "3"),
        ("4", "2"),
        ("4", "3"),
    ]
    for row in rows:  # the table's O_K is each run's own held-out report
        run = next(r for r in plan.runs if r.name == row["run"])
        report = json.loads((run.directory / "eval" / "report.json").read_text())
        assert float(row["final_overall"]) == pytest.approx(report["final_overall"])
    # samples seen = iterations x B x G, as recorded by each run
    by_g = {r["model.rollout.group_size"]: int(float(r["samples_seen"])) for r in rows}
    assert by_g == {"2": 2 * 2 * 2, "4": 2 * 2 * 4}
    for name in ("summary.md", "metric_vs_G.png", "heatmap_G_T.png", "reward_curves.png"):
        assert (tmp_path / "sweep" / name).stat().st_size > 0
    assert summary is not None

    broken = plan.runs[1]
    status = json.loads((broken.directory / "status.json").read_text())
    (broken.directory / "status.json").write_text(json.dumps({**status, "status": "failed", "error": "boom"}))
    (plan.runs[2].directory / "metrics.csv").unlink()
    with pytest.raises(SweepIncompleteError) as error:
        collect(tmp_path / "sweep")
    assert broken.name in str(error.value) and plan.runs[2].name in str(error.value)
