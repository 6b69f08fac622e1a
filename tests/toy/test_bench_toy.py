"""tools/bench_toy.py's bookkeeping on hand-made reports: per-seed gains, mean ± std cells, the target check and
``--reuse`` reading finished runs back instead of running them again."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_toy.py"


@pytest.fixture(scope="module")
def bench_toy():
    spec = importlib.util.spec_from_file_location("bench_toy", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(cumulative, consistency, overall, exposure_bias):
    def values(xs):
        return [{"value": x, "ci_low": None, "ci_high": None} for x in xs]

    return {
        "conditions": {
            "model": {
                "cumulative_success": values(cumulative),
                "consistency": values(consistency),
                "overall": values(overall),
                "exposure_bias": {"value": exposure_bias},
            }
        }
    }


def _write_run(root: Path, name: str, before: dict, after: dict, wall: float) -> None:
    eval_dir = root / name / "version_0" / "eval"
    eval_dir.mkdir(parents=True)
    (eval_dir / "before_after.json").write_text(json.dumps({"before": before, "after": after}))
    (root / f"{name}.wall_clock_s").write_text(str(wall))


def test_reuse_reads_finished_runs_and_checks_the_target_per_seed(bench_toy, tmp_path, capsys):
    prior = _report([60.0, 40.0, 20.0], [90.0, 85.0, 80.0], [70.0, 55.0, 40.0], 2.0)
    # seed 0 gains 12 points at turn 3, seed 1 only 8: the target (+10 on every seed) is not reached
    _write_run(tmp_path, "grpo_seed0", prior, _report([70, 50, 32], [80, 75, 70], [72, 60, 50], -4.0), 100.0)
    _write_run(tmp_path, "grpo_seed1", prior, _report([66, 44, 28], [84, 79, 74], [71, 58, 46], 0.0), 300.0)
    summary = bench_toy.main(["--reuse", "--root", str(tmp_path), "--seeds", "0", "1", "--losses", "grpo"])
    grpo = summary["losses"]["grpo"]
    assert grpo["turn_K_gain_points"] == [12.0, 8.0]
    assert grpo["target_reached_every_seed"] is False
    assert grpo["wall_clock_s"] == [100.0, 300.0]
    assert grpo["exposure_bias_before"] == [2.0, 2.0] and grpo["exposure_bias_after"] == [-4.0, 0.0]
    rows = {line.split(" | ")[0].strip("| "): line for line in summary["table"].splitlines()}
    # C_3 after: mean 30, sample std of (32, 28) = 2.83; wall clock mean 200
    assert "| 30.0 ± 2.8 |" in rows["after grpo"] and rows["after grpo"].endswith("| 200 |")
    assert rows["prior"].startswith("| prior | 60.0 ± 0.0 | 40.0 ± 0.0 | 20.0 ± 0.0 | 90.0 ± 0.0")
    assert json.loads((tmp_path / "bench_toy.json").read_text())["losses"]["grpo"]["turn_K_gain_points"] == [
        12,
        8,
    ]
    assert "NOT reached" in capsys.readouterr().out


def test_summarise_ignores_undefined_values(bench_toy):
    mean, std = bench_toy.summarise([1.0, float("nan"), 3.0])
    assert mean == 2.0 and std == pytest.approx(2**0.5)
    assert bench_toy.summarise([5.0]) == (5.0, 0.0)
