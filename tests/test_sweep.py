"""Sweep tooling: grid expansion, cost matching, runners, Slurm / W&B writers and collect on synthetic runs."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mtflow.eval.metrics import compute_eval_metrics
from mtflow.eval.report import EvalReport, write_report
from mtflow.eval.sweep import (
    RunStatus,
    SweepError,
    SweepIncompleteError,
    collect,
    expand_grid,
    get_dotted,
    heatmap_matrix,
    load_grid,
    load_plan,
    main,
    make_metric_vs_group_figure,
    make_reward_curves_figure,
    merge_configs,
    read_metrics_csv,
    run_in_process,
    run_local,
    set_dotted,
    write_slurm_array,
    write_wandb_sweep,
)

REPO = Path(__file__).resolve().parents[1]

BASE = {
    "seed_everything": 123,
    "model": {"class_path": "mtflow.training.FlowRLModule", "init_args": {"group_size": 16, "num_steps": 12}},
    "data": {"batch_size": 1, "manifest": "chains.jsonl"},
    "trainer": {"max_steps": 100},
}
ABLATION = {"model": {"init_args": {"lambda_cc": 0.5}}, "trainer": {"max_steps": 10}}


def _write_yaml(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _grid(tmp_path: Path, **extra) -> Path:
    _write_yaml(tmp_path / "configs" / "base.yaml", BASE)
    _write_yaml(tmp_path / "configs" / "ablation.yaml", ABLATION)
    grid = {
        "name": "gt",
        "base_configs": ["../base.yaml", "../ablation.yaml"],
        "overrides": {"trainer.log_every_n_steps": 1},
        "axes": {"model.group_size": [2, 4], "model.num_steps": [2, 3], "seed_everything": [0, 1]},
        "run_dir_keys": ["trainer.default_root_dir"],
        **extra,
    }
    return _write_yaml(tmp_path / "configs" / "sweeps" / "gt.yaml", grid)


def test_dotted_keys_and_stacking_follow_lightning_cli():
    config = merge_configs(BASE, ABLATION)
    assert config["model"]["init_args"] == {"group_size": 16, "num_steps": 12, "lambda_cc": 0.5}
    assert config["trainer"]["max_steps"] == 10 and BASE["trainer"]["max_steps"] == 100  # no aliasing
    assert get_dotted(config, "model.group_size") == 16  # init_args is transparent
    set_dotted(config, "model.group_size", 4)
    assert config["model"]["init_args"]["group_size"] == 4 and "group_size" not in config["model"]
    set_dotted(config, "model.class_path", "other.Module")  # an existing key is set where it is
    assert config["model"]["class_path"] == "other.Module"
    set_dotted(config, "trainer.logger.init_args.save_dir", "/x")
    assert config["trainer"]["logger"] == {"init_args": {"save_dir": "/x"}}
    with pytest.raises(KeyError):
        get_dotted(config, "model.absent")
    with pytest.raises(SweepError, match="'max_steps' holds a int"):
        set_dotted(config, "trainer.max_steps.sub", 1)
    replaced = merge_configs(BASE, {"model": {"class_path": "other.Module", "init_args": {"x": 1}}})
    assert replaced["model"] == {
        "class_path": "other.Module",
        "init_args": {"x": 1},
    }  # new class: old args dropped


def test_expand_writes_one_resolved_config_per_run(tmp_path):
    plan = expand_grid(_grid(tmp_path), tmp_path / "sweep")
    assert len(plan.runs) == 8
    # First axis slowest: run 5 is G=4 (second value), T=2 (first), seed=1 (second).
    run = plan.runs[5]
    assert run.axes == {"model.group_size": 4, "model.num_steps": 2, "seed_everything": 1}
    assert run.name == "r005__group_size=4__num_steps=2__seed_everything=1"
    config = yaml.safe_load(run.config_path.read_text())
    assert config["model"]["init_args"] == {"group_size": 4, "num_steps": 2, "lambda_cc": 0.5}
    assert config["seed_everything"] == 1
    assert config["trainer"] == {
        "max_steps": 10,
        "log_every_n_steps": 1,
        "default_root_dir": str(run.directory),
    }
    assert config["data"] == BASE["data"]
    assert len({r.directory for r in plan.runs}) == 8
    assert {
        (r.axes["model.group_size"], r.axes["model.num_steps"], r.axes["seed_everything"]) for r in plan.runs
    } == {(g, t, s) for g in (2, 4) for t in (2, 3) for s in (0, 1)}
    loaded = load_plan(tmp_path / "sweep")
    assert [(r.name, r.axes, r.directory) for r in loaded.runs] == [
        (r.name, r.axes, r.directory) for r in plan.runs
    ]


def test_reexpansion_is_idempotent_but_a_different_grid_is_refused(tmp_path):
    grid_path = _grid(tmp_path)
    expand_grid(grid_path, tmp_path / "sweep")
    RunStatus("completed", 1.0, 8).write(
        tmp_path / "sweep" / "runs" / load_plan(tmp_path / "sweep").runs[0].name
    )
    expand_grid(grid_path, tmp_path / "sweep")  # same plan: fine, run folders untouched
    assert RunStatus.read(load_plan(tmp_path / "sweep").runs[0].directory).status == "completed"
    other = _grid(tmp_path / "other", axes={"model.group_size": [8]})
    with pytest.raises(SweepError, match="already holds a different sweep"):
        expand_grid(other, tmp_path / "sweep")
    assert len(expand_grid(other, tmp_path / "sweep", overwrite=True).runs) == 1


def test_cost_matching_holds_batch_times_group_constant(tmp_path):
    grid = load_grid(_grid(tmp_path, cost_match={"key": "data.batch_size", "total": 8}))
    plan = expand_grid(grid, tmp_path / "sweep")
    for run in plan.runs:
        config = yaml.safe_load(run.config_path.read_text())
        g = config["model"]["init_args"]["group_size"]
        assert config["data"]["batch_size"] * g == 8
        assert run.derived == {"data.batch_size": 8 // g}
    bad = _grid(tmp_path / "bad", cost_match={"key": "data.batch_size", "total": 6})
    with pytest.raises(SweepError, match=r"total 6 is not divisible by model.group_size = 4"):
        expand_grid(bad, tmp_path / "bad_sweep")
    clash = _grid(tmp_path / "clash", cost_match={"key": "model.group_size", "total": 8})
    with pytest.raises(SweepError, match="cannot also be an axis"):
        load_grid(clash)


def test_grid_file_errors_name_the_problem(tmp_path):
    path = _write_yaml(tmp_path / "g.yaml", {"base_configs": ["missing.yaml"], "axes": {"a": [1]}})
    with pytest.raises(SweepError, match=r"base config not found: .*missing\.yaml"):
        load_grid(path)
    _write_yaml(tmp_path / "b.yaml", {})
    with pytest.raises(SweepError, match=r"unknown key\(s\) \['axis'\]"):
        load_grid(_write_yaml(tmp_path / "g2.yaml", {"base_configs": ["b.yaml"], "axis": {"a": [1]}}))
    with pytest.raises(SweepError, match="axis 'a' repeats a value"):
        load_grid(_write_yaml(tmp_path / "g3.yaml", {"base_configs": ["b.yaml"], "axes": {"a": [1, 1]}}))
    with pytest.raises(SweepError, match="'axes' is empty"):
        load_grid(_write_yaml(tmp_path / "g4.yaml", {"base_configs": ["b.yaml"]}))


@pytest.mark.parametrize(("name", "num_runs"), [("G_T.yaml", 8), ("G_T_cost_matched.yaml", 16)])
def test_shipped_grids_expand(tmp_path, name, num_runs):
    """The example grids in configs/sweeps, expanded on a stand-in for the paper config they stack on."""
    (tmp_path / "configs" / "sweeps").mkdir(parents=True)
    shutil.copy(REPO / "configs" / "sweeps" / name, tmp_path / "configs" / "sweeps" / name)
    grid = yaml.safe_load((REPO / "configs" / "sweeps" / name).read_text())
    for base in grid["base_configs"]:
        _write_yaml((tmp_path / "configs" / "sweeps" / base).resolve(), BASE)
    plan = expand_grid(tmp_path / "configs" / "sweeps" / name, tmp_path / "sweep")
    assert len(plan.runs) == num_runs
    for run in plan.runs:
        config = yaml.safe_load(run.config_path.read_text())
        assert config["trainer"]["default_root_dir"] == str(run.directory)
        if "cost_match" in grid:
            assert config["data"]["batch_size"] * config["model"]["init_args"]["group_size"] == 16


def test_toy_grid_resolves_to_configs_the_cli_accepts(tmp_path, capsys):
    """configs/sweeps/toy_G_T.yaml stacks on the real toy config: every resolved run config passes LightningCLI's
    own validation (a misspelt key fails there) with B x G = 32 trajectories per iteration and its axis values."""
    from mtflow.cli import main

    plan = expand_grid(REPO / "configs" / "sweeps" / "toy_G_T.yaml", tmp_path / "sweep")
    assert len(plan.runs) == 4
    for run in plan.runs:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(run.config_path), "--print_config"])
        assert exit_info.value.code in (0, None)
        printed = yaml.safe_load(capsys.readouterr().out)
        model, data = printed["model"], printed["data"]["init_args"]
        assert model["group_size"] == run.axes["model.group_size"]
        assert model["num_steps"] == run.axes["model.num_steps"]
        assert data["batch_size"] * model["group_size"] == 32
        assert printed["seed_everything"] == run.axes["seed_everything"]
        assert printed["trainer"]["default_root_dir"] == str(run.directory)


# ---------------------------------------------------------------------------------------- a synthetic trainer


def _expected_overall(g: int, t: int, seed: int) -> float:
    """The fake trainer's held-out O_K: m of 4 chains succeed at every turn, CC = 100 -> O = sqrt(25 m * 100)."""
    return math.sqrt(25.0 * (g // 2 + (t - 2) + seed) * 100.0)


def _expected_reward(g: int, t: int, seed: int) -> float:
    return 0.1 * g + 0.01 * t + 0.001 * seed


def fake_fit(args: list[str]) -> None:
    """Stands in for ``mtflow.cli.main``: honours the run-folder contract with values set by the config."""
    assert args[:2] == ["fit", "--config"]
    config = yaml.safe_load(Path(args[2]).read_text())
    run_dir = Path(config["trainer"]["default_root_dir"])
    g, t = config["model"]["init_args"]["group_size"], config["model"]["init_args"]["num_steps"]
    seed = config["seed_everything"]
    if config.get("fail"):
        RunStatus("failed", 0.5, 4, error="loss went non-finite 3 times in a row").write(run_dir)
        raise RuntimeError("boom")
    final = _expected_reward(g, t, seed)
    with (run_dir / "metrics.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "loss/policy", "reward/mean", "step"])
        for step in range(5):
            writer.writerow([0, 0.1, final * (step + 1) / 5, step])
            writer.writerow([0, 0.2, "", step])  # CSVLogger leaves cells of metrics not logged on a row empty
    m = g // 2 + (t - 2) + seed
    if_scores = torch.tensor([[5.0, 5.0]] * m + [[1.0, 1.0]] * (4 - m))
    metrics = compute_eval_metrics(
        if_scores, torch.full((4, 2), 5.0), torch.ones(4, 2, dtype=torch.bool), num_bootstrap=20
    )
    write_report(run_dir / "eval", EvalReport(conditions={"model": metrics}))
    RunStatus(
        "completed", wall_clock_s=10.0 * g + t, samples_seen=5 * g * config["data"]["batch_size"]
    ).write(run_dir)


def test_in_process_runs_then_collect_builds_the_table_and_plots(tmp_path):
    plan = expand_grid(_grid(tmp_path), tmp_path / "sweep")
    calls = []

    def main_spy(args):
        calls.append(args)
        fake_fit(args)

    outcomes = run_in_process(plan, main_spy)
    assert [o.status.status for o in outcomes] == ["completed"] * 8 and len(calls) == 8
    assert run_in_process(plan, main_spy)[0].skipped and len(calls) == 8  # completed runs are not rerun

    summary = collect(tmp_path / "sweep")
    assert len(summary.runs) == 8
    for result in summary.runs:
        g, t, s = (
            result.axes["model.group_size"],
            result.axes["model.num_steps"],
            result.axes["seed_everything"],
        )
        assert (result.group_size, result.num_steps) == (g, t)
        assert result.final_overall == pytest.approx(_expected_overall(g, t, s))
        assert result.final_reward == pytest.approx(_expected_reward(g, t, s))
        assert result.samples_seen == 5 * g and result.wall_clock_s == 10.0 * g + t
        assert [step for step, _ in result.reward_curve] == [0, 1, 2, 3, 4]

    cells = {(c.group_size, c.num_steps): c for c in summary.cells}
    assert len(cells) == 4
    for (g, t), cell in cells.items():
        pair = [_expected_overall(g, t, s) for s in (0, 1)]
        assert cell.num_runs == 2
        assert cell.overall_mean == pytest.approx(sum(pair) / 2)
        assert cell.overall_std == pytest.approx(abs(pair[0] - pair[1]) / math.sqrt(2))
        assert cell.reward_mean == pytest.approx(_expected_reward(g, t, 0.5))

    with summary.files["csv"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8
    row = next(r for r in rows if r["run"] == plan.runs[5].name)
    assert float(row["final_overall"]) == pytest.approx(_expected_overall(4, 2, 1))
    assert row["model.group_size"] == "4" and row["samples_seen"] == "20"
    markdown = summary.files["markdown"].read_text()
    assert (
        f"| 4 | 3 | 2 | {(_expected_overall(4, 3, 0) + _expected_overall(4, 3, 1)) / 2:.2f} +- " in markdown
    )
    for key in ("metric_vs_G", "heatmap", "reward_curves"):
        assert summary.files[key].is_file() and summary.files[key].stat().st_size > 1000

    steps_values, groups, matrix = heatmap_matrix(summary.cells)
    assert (steps_values, groups) == ([2, 3], [2, 4])
    assert matrix[1][0] == pytest.approx(cells[(2, 3)].overall_mean)
    figure = make_metric_vs_group_figure(summary.cells)
    lines = {container.get_label(): container.lines[0] for container in figure.axes[0].containers}
    assert list(lines["T=3"].get_xdata()) == [2, 4]
    assert list(lines["T=3"].get_ydata()) == pytest.approx(
        [cells[(2, 3)].overall_mean, cells[(4, 3)].overall_mean]
    )
    curves = make_reward_curves_figure(summary.runs, "reward/mean", ["seed_everything"])
    assert [ax.get_title() for ax in curves.axes] == ["T=2", "T=3"]
    t3 = {line.get_label(): line for line in curves.axes[1].get_lines()}
    assert sorted(t3) == [
        "G=2 seed_everything=0",
        "G=2 seed_everything=1",
        "G=4 seed_everything=0",
        "G=4 seed_everything=1",
    ]
    assert t3["G=4 seed_everything=1"].get_ydata()[-1] == pytest.approx(_expected_reward(4, 3, 1))


def test_collect_refuses_naming_every_unusable_run(tmp_path):
    plan = expand_grid(_grid(tmp_path), tmp_path / "sweep")
    run_in_process(plan, fake_fit)
    names = [run.name for run in plan.runs]
    shutil.rmtree(plan.runs[0].directory)  # missing
    RunStatus("failed", 3.0, 0, error="judge unreachable at http://judge:8000").write(plan.runs[1].directory)
    RunStatus("running", 3.0, 0).write(plan.runs[2].directory)
    (plan.runs[3].report_path).unlink()
    (plan.runs[4].metrics_path).write_text("step,epoch\n0,0\n")  # no reward column
    (plan.runs[5].status_path).unlink()
    with pytest.raises(SweepIncompleteError) as caught:
        collect(tmp_path / "sweep")
    problems = caught.value.problems
    assert set(problems) == set(names[:6])
    assert "run folder missing" in problems[names[0]]
    assert "status 'failed': judge unreachable at http://judge:8000" in problems[names[1]]
    assert "status 'running'" in problems[names[2]]
    assert "held-out evaluation" in problems[names[3]] and "report.json is missing" in problems[names[3]]
    assert "['reward/mean'] missing" in problems[names[4]]
    assert "never ran" in problems[names[5]]
    message = str(caught.value)
    assert "6 run(s) not usable" in message and all(name in message for name in names[:6])
    assert main(["collect", str(tmp_path / "sweep")]) == 1


def test_in_process_failures_are_recorded(tmp_path):
    axes = {"model.group_size": [2], "model.num_steps": [2], "seed_everything": [0], "fail": [False, True]}
    grid = _grid(tmp_path, axes=axes)
    plan = expand_grid(grid, tmp_path / "sweep")
    outcomes = run_in_process(plan, fake_fit)
    assert [o.status.status for o in outcomes] == ["completed", "failed"]
    assert (
        outcomes[1].status.error == "loss went non-finite 3 times in a row"
    )  # the trainer's own message kept

    def exits(args):
        raise SystemExit(2)

    outcomes = run_in_process(plan, exits, skip_completed=False, stop_on_failure=True)
    assert len(outcomes) == 1 and outcomes[0].status.error == "exited with code 2"


FAKE_TRAINER = """
import json, sys, yaml, pathlib
config = yaml.safe_load(open(sys.argv[1]))
run = pathlib.Path(config["trainer"]["default_root_dir"])
mode = config["mode"]
print("training", mode)
if mode == "ok":
    json.dump({"status": "completed", "wall_clock_s": 1.5, "samples_seen": 12}, open(run / "status.json", "w"))
elif mode == "crash":
    print("Traceback: CUDA out of memory", file=sys.stderr)
    sys.exit(3)
elif mode == "silent":
    pass  # exits 0 without recording completion
"""


def test_local_runner_subprocesses_and_failure_bookkeeping(tmp_path):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    plan = expand_grid(_grid(tmp_path, axes={"mode": ["ok", "crash", "silent"]}), tmp_path / "sweep")
    outcomes = run_local(plan, lambda run: [sys.executable, str(script), str(run.config_path)])
    by_mode = {o.run.axes["mode"]: o for o in outcomes}
    assert by_mode["ok"].status == RunStatus("completed", 1.5, 12)
    crash = by_mode["crash"]
    assert crash.returncode == 3 and crash.status.status == "failed"
    assert "command exited with code 3" in crash.status.error and "CUDA out of memory" in crash.status.error
    assert "training crash" in (crash.run.directory / "log.txt").read_text()
    assert RunStatus.read(crash.run.directory).status == "failed"
    silent = by_mode["silent"].status
    assert silent.status == "failed" and "recorded status 'running'" in silent.error
    assert silent.wall_clock_s > 0


def test_slurm_array_script_runs_a_task_and_records_its_failure(tmp_path):
    plan = expand_grid(_grid(tmp_path, axes={"mode": ["ok", "crash"]}), tmp_path / "sweep")
    script = write_slurm_array(
        plan,
        command_builder=lambda run: [
            sys.executable,
            "-c",
            "import sys; sys.exit(0 if 'r000' in sys.argv[1] else 7)",
            run.name,
        ],
        partition="gpu",
        gpus_per_node=8,
        max_parallel=1,
        setup_lines=["export MTFLOW_TEST=1"],
        python=sys.executable,
    )
    text = script.read_text()
    assert (
        "#SBATCH --array=0-1%1" in text
        and "#SBATCH --partition=gpu" in text
        and "#SBATCH --gpus-per-node=8" in text
    )
    assert "export MTFLOW_TEST=1" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "1", "SLURM_JOB_ID": "42"}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert done.returncode == 7, done.stderr
    status = RunStatus.read(plan.runs[1].directory)
    assert status.status == "failed" and status.error == "command exited with code 7 (Slurm log 42_1)"
    env["SLURM_ARRAY_TASK_ID"] = "0"
    assert subprocess.run(["bash", str(script)], env=env, capture_output=True).returncode == 0
    env["SLURM_ARRAY_TASK_ID"] = "5"
    assert subprocess.run(["bash", str(script)], env=env, capture_output=True).returncode == 2


def test_wandb_sweep_file(tmp_path):
    grid = load_grid(_grid(tmp_path))
    plan = expand_grid(grid, tmp_path / "sweep")
    sweep = yaml.safe_load(write_wandb_sweep(plan, project="mtflow").read_text())
    assert sweep["method"] == "grid" and sweep["project"] == "mtflow"
    assert sweep["parameters"] == {"config": {"values": [str(run.config_path) for run in plan.runs]}}
    assert sweep["command"] == ["${env}", "${interpreter}", "-m", "mtflow", "fit", "${args}"]

    plain = load_grid(_grid(tmp_path / "plain", run_dir_keys=[]))
    axes = yaml.safe_load(write_wandb_sweep(plan, tmp_path / "w.yaml", grid=plain, mode="axes").read_text())
    assert axes["parameters"]["model.group_size"] == {"values": [2, 4]}
    assert axes["parameters"]["trainer.log_every_n_steps"] == {"value": 1}
    assert axes["command"][-1] == "${args}" and axes["command"].count("--config") == 2
    with pytest.raises(SweepError, match="cannot express cost_match or run_dir_keys"):
        write_wandb_sweep(plan, grid=grid, mode="axes")


def test_cli_expand_and_metrics_reader(tmp_path, capsys):
    assert main(["expand", "--grid", str(_grid(tmp_path)), "--out", str(tmp_path / "s")]) == 0
    assert "8 runs" in capsys.readouterr().out
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["name"] == "gt"
    assert main(["expand", "--grid", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "s")]) == 1
    assert "file not found" in capsys.readouterr().err
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("step,reward/mean,x\n0,0.5,\n1,,3\n2,0.75,\n")
    assert read_metrics_csv(metrics, "reward/mean") == [(0.0, 0.5), (2.0, 0.75)]
