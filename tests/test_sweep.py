"""Sweep tooling: grid expansion through LightningCLI's parser, cost matching, runners, Slurm / W&B writers, the
status file and collect on synthetic runs."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from mtflow.eval.metrics import compute_eval_metrics
from mtflow.eval.report import EvalReport, write_report
from mtflow.sweeps import (
    RunStatus,
    SweepError,
    SweepIncompleteError,
    collect,
    expand_grid,
    heatmap_matrix,
    load_grid,
    load_plan,
    make_metric_vs_group_figure,
    make_reward_curves_figure,
    read_metrics_csv,
    run_in_process,
    run_local,
    write_slurm_array,
    write_wandb_sweep,
)
from mtflow.sweeps.cli import main
from mtflow.sweeps.grid import fit_argument
from mtflow.testing.fixtures import REPO_CONFIGS, printed_fit_config

REPO = Path(__file__).resolve().parents[1]
TOY = REPO_CONFIGS / "toy.yaml"
# stacked on configs/toy.yaml (group_size 8, num_steps 6, lambda_cc 0.3, data batch_size 4, trainer max_steps -1)
ABLATION = {"model": {"advantage": {"lambda_cc": 0.5}}, "trainer": {"max_steps": 10, "log_every_n_steps": 3}}
MODE = "trainer.logger.init_args.prefix"  # a string key the synthetic trainers read as what to do


def _write_yaml(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _grid(tmp_path: Path, **extra) -> Path:
    _write_yaml(tmp_path / "configs" / "ablation.yaml", ABLATION)
    grid = {
        "name": "gt",
        "base_configs": [str(TOY), "../ablation.yaml"],
        "overrides": {"trainer.log_every_n_steps": 5, "model.rollout.num_steps": 9},
        "axes": {
            "model.rollout.group_size": [2, 4],
            "model.rollout.num_steps": [2, 3],
            "seed_everything": [0, 1],
        },
        "run_dir_keys": ["trainer.default_root_dir"],
        **extra,
    }
    return _write_yaml(tmp_path / "configs" / "sweeps" / "gt.yaml", grid)


def test_expand_writes_one_config_per_run_resolved_by_the_cli_parser(tmp_path):
    plan = expand_grid(_grid(tmp_path), tmp_path / "sweep")
    assert len(plan.runs) == 8
    # First axis slowest: run 5 is G=4 (second value), T=2 (first), seed=1 (second).
    run = plan.runs[5]
    assert run.axes == {"model.rollout.group_size": 4, "model.rollout.num_steps": 2, "seed_everything": 1}
    assert run.name == "r005__group_size=4__num_steps=2__seed_everything=1"
    config = yaml.safe_load(run.config_path.read_text())
    # base configs stacked in order, then overrides, then axes (the axis T=2 beats the override's 9)
    assert config["model"]["rollout"] == {
        "group_size": 4,
        "num_steps": 2,
        "forward_batch_size": 64,  # toy.yaml
        "store_dtype": "float32",  # the module's defaults, filled in by the parser
        "kernels": "auto",
        "chain_through": "pixels",
        "unsharded": "auto",
    }
    assert (
        config["model"]["advantage"]["lambda_cc"] == 0.5
        and config["model"]["advantage"]["broadcast"] == "turn"
    )
    assert config["seed_everything"] == 1
    trainer = config["trainer"]
    assert (trainer["max_steps"], trainer["log_every_n_steps"]) == (10, 5)
    assert trainer["default_root_dir"] == str(run.directory) and trainer["max_epochs"] == -1
    assert config["data"]["init_args"]["batch_size"] == 4
    assert len({r.directory for r in plan.runs}) == 8
    assert {
        (r.axes["model.rollout.group_size"], r.axes["model.rollout.num_steps"], r.axes["seed_everything"])
        for r in plan.runs
    } == {(g, t, s) for g in (2, 4) for t in (2, 3) for s in (0, 1)}
    loaded = load_plan(tmp_path / "sweep")
    assert [(r.name, r.axes, r.directory) for r in loaded.runs] == [
        (r.name, r.axes, r.directory) for r in plan.runs
    ]


def test_fit_arguments_keep_yaml_structure():
    assert fit_argument("a.b", "") == "--a.b="
    assert fit_argument("a", "x y") == "--a=x y"
    assert fit_argument("a", None) == "--a=null"
    assert fit_argument("a", True) == "--a=true"
    assert fit_argument("a", 1e-5) == "--a=1.0e-05"
    assert fit_argument("a", float("inf")) == "--a=.inf"
    assert fit_argument("a", [1, "2", None]) == "--a=[1, '2', null]"
    assert fit_argument("a", {"class_path": "x.Y", "init_args": {"b": [1, 2]}}) == (
        "--a={class_path: x.Y, init_args: {b: [1, 2]}}"
    )


def test_structured_values_survive_expansion(tmp_path):
    overrides = {
        "model.algorithm": {"class_path": "mtflow.algorithms.NFT", "init_args": {"beta": 2.0}},
        "model.optim.betas": [0.5, 1.0e-5],
        "trainer.logger.init_args.name": "",
        "trainer.logger.init_args.version": None,
    }
    axes = {"model.evaluation.conditions": [["model"], ["model", "base"]]}
    plan = expand_grid(_grid(tmp_path, overrides=overrides, axes=axes), tmp_path / "sweep")
    assert [r.name for r in plan.runs] == ["r000__conditions=model", "r001__conditions=model_base"]
    for run, conditions in zip(plan.runs, (["model"], ["model", "base"])):
        config = yaml.safe_load(run.config_path.read_text())
        assert config["model"]["evaluation"]["conditions"] == conditions
        algorithm = config["model"]["algorithm"]
        assert (
            algorithm["class_path"] == "mtflow.algorithms.NFT"
        )  # toy.yaml's GRPO replaced, NFT defaults added
        assert algorithm["init_args"]["beta"] == 2.0 and algorithm["init_args"]["train_timesteps"] == 1
        assert "clip_eps" not in algorithm["init_args"]
        assert config["model"]["optim"]["betas"] == [0.5, 1.0e-5]
        logger = config["trainer"]["logger"]["init_args"]
        assert logger["name"] == "" and logger["version"] is None and logger["save_dir"] == "runs"


def test_expanded_config_is_what_mtflow_fit_resolves(tmp_path, capsys):
    """A run of configs/sweeps/toy_G_T.yaml: its config.yaml is what `mtflow fit --print_config` prints for the
    same config stack and --key=value arguments (written out here by hand), and feeding it back to `mtflow fit`
    resolves to itself."""
    plan = expand_grid(REPO / "configs" / "sweeps" / "toy_G_T.yaml", tmp_path / "sweep")
    assert [r.axes for r in plan.runs] == [
        {"model.rollout.group_size": g, "model.rollout.num_steps": t, "seed_everything": 0}
        for g in (4, 8)
        for t in (4, 6)
    ]
    run = plan.runs[2]  # G = 8, T = 4: B = 32 / 8 = 4
    assert run.derived == {"data.init_args.batch_size": 4}
    written = yaml.safe_load(run.config_path.read_text())
    folder = str(tmp_path / "sweep" / "runs" / "r002__group_size=8__num_steps=4__seed_everything=0")
    extra = (
        "--trainer.logger.init_args.name=",
        "--trainer.logger.init_args.version=",
        "--trainer.enable_progress_bar=false",
        "--model.rollout.group_size=8",
        "--model.rollout.num_steps=4",
        "--seed_everything=0",
        "--data.init_args.batch_size=4",
        f"--trainer.default_root_dir={folder}",
        f"--trainer.logger.init_args.save_dir={folder}",
    )
    assert written == printed_fit_config(capsys, "toy.yaml", extra=extra)
    assert written["model"]["rollout"]["group_size"] * written["data"]["init_args"]["batch_size"] == 32
    for run in plan.runs:
        assert printed_fit_config(capsys, str(run.config_path)) == yaml.safe_load(run.config_path.read_text())


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"axes": {"model.rollout.group_sze": [2, 4]}}, "--model.rollout.group_sze=2"),
        ({"overrides": {"trainer.max_stepz": 3}}, "--trainer.max_stepz=3"),
        ({"axes": {"model.rollout.num_steps": [2, "six"]}}, 'key "model.rollout.num_steps"'),
        ({"overrides": {"model.algorithm.init_args.clip_epz": 0.1}}, "Option 'clip_epz' is not accepted"),
    ],
)
def test_expand_refuses_an_invalid_grid_naming_the_key(tmp_path, capsys, change, named):
    from mtflow.cli import main as mtflow_main

    grid = _grid(tmp_path, **change)
    with pytest.raises(SystemExit) as exit_info:
        mtflow_main(["sweep", "expand", "--grid", str(grid), "--out", str(tmp_path / "sweep")])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("sweep: error: ") and "not a valid mtflow fit config" in error
    assert named in error and error.count("\n") == 1  # one line
    assert not (tmp_path / "sweep").exists()  # refused before anything was written


def test_reexpansion_is_idempotent_but_a_different_grid_is_refused(tmp_path):
    grid_path = _grid(tmp_path)
    expand_grid(grid_path, tmp_path / "sweep")
    RunStatus("completed", 1.0, 8).write(
        tmp_path / "sweep" / "runs" / load_plan(tmp_path / "sweep").runs[0].name
    )
    expand_grid(grid_path, tmp_path / "sweep")  # same plan: fine, run folders untouched
    assert RunStatus.read(load_plan(tmp_path / "sweep").runs[0].directory).status == "completed"
    other = _grid(tmp_path / "other", axes={"model.rollout.group_size": [8]})
    with pytest.raises(SweepError, match="already holds a different sweep"):
        expand_grid(other, tmp_path / "sweep")
    assert len(expand_grid(other, tmp_path / "sweep", overwrite=True).runs) == 1


def test_cost_matching_holds_batch_times_group_constant(tmp_path):
    grid = load_grid(
        _grid(
            tmp_path,
            cost_match={"key": "data.batch_size", "total": 8, "group_key": "model.rollout.group_size"},
        )
    )
    plan = expand_grid(grid, tmp_path / "sweep")
    for run in plan.runs:
        config = yaml.safe_load(run.config_path.read_text())
        g = run.axes["model.rollout.group_size"]
        assert config["model"]["rollout"]["group_size"] == g
        assert config["data"]["init_args"]["batch_size"] == {2: 4, 4: 2}[g]
        assert run.derived == {"data.batch_size": {2: 4, 4: 2}[g]}
    # G not an axis: read from the resolved config (toy.yaml: G = 8) -> B = 16 / 8 = 2; the default group_key
    from_base = _grid(
        tmp_path / "base",
        axes={"seed_everything": [0, 1]},
        cost_match={"key": "data.batch_size", "total": 16},
    )
    for run in expand_grid(from_base, tmp_path / "base_sweep").runs:
        assert run.derived == {"data.batch_size": 2}
        assert yaml.safe_load(run.config_path.read_text())["data"]["init_args"]["batch_size"] == 2
    bad = _grid(tmp_path / "bad", cost_match={"key": "data.batch_size", "total": 6})
    with pytest.raises(SweepError, match=r"total 6 is not divisible by model.rollout.group_size = 4"):
        expand_grid(bad, tmp_path / "bad_sweep")
    assert not (tmp_path / "bad_sweep").exists()
    clash = _grid(tmp_path / "clash", cost_match={"key": "model.rollout.group_size", "total": 8})
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
    """The paper grids in configs/sweeps, expanded on the paper configs they stack on (parsed, not loaded)."""
    grid = yaml.safe_load((REPO / "configs" / "sweeps" / name).read_text())
    plan = expand_grid(REPO / "configs" / "sweeps" / name, tmp_path / "sweep")
    assert len(plan.runs) == num_runs
    for run in plan.runs:
        config = yaml.safe_load(run.config_path.read_text())
        assert config["trainer"]["default_root_dir"] == str(run.directory)
        assert config["trainer"]["logger"]["init_args"]["save_dir"] == str(run.directory)
        assert (
            config["trainer"]["devices"] == 8
            and config["model"]["algorithm"]["init_args"]["clip_eps"] == 1e-4
        )
        g = config["model"]["rollout"]["group_size"]
        assert (g, config["model"]["rollout"]["num_steps"]) == (
            run.axes["model.rollout.group_size"],
            run.axes["model.rollout.num_steps"],
        )
        batch = config["data"]["init_args"]["batch_size"]
        assert batch == (16 // g if "cost_match" in grid else 1)


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
    g, t = config["model"]["rollout"]["group_size"], config["model"]["rollout"]["num_steps"]
    seed = config["seed_everything"]
    if config["trainer"]["logger"]["init_args"]["prefix"] == "fail":
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
        "completed", wall_clock_s=10.0 * g + t, samples_seen=5 * g * config["data"]["init_args"]["batch_size"]
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
            result.axes["model.rollout.group_size"],
            result.axes["model.rollout.num_steps"],
            result.axes["seed_everything"],
        )
        assert (result.group_size, result.num_steps) == (g, t)
        assert result.final_overall == pytest.approx(_expected_overall(g, t, s))
        assert result.final_reward == pytest.approx(_expected_reward(g, t, s))
        assert result.samples_seen == 5 * g * 4 and result.wall_clock_s == 10.0 * g + t  # toy.yaml: B = 4
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
    assert row["model.rollout.group_size"] == "4" and row["samples_seen"] == "80"
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
    from mtflow.cli import main as mtflow_main

    with pytest.raises(SystemExit) as exit_info:  # the `mtflow sweep` command exits non-zero too
        mtflow_main(["sweep", "collect", str(tmp_path / "sweep")])
    assert exit_info.value.code == 1


def test_in_process_failures_are_recorded(tmp_path):
    axes = {
        "model.rollout.group_size": [2],
        "model.rollout.num_steps": [2],
        "seed_everything": [0],
        MODE: ["ok", "fail"],
    }
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
mode = config["trainer"]["logger"]["init_args"]["prefix"]
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
    plan = expand_grid(_grid(tmp_path, axes={MODE: ["ok", "crash", "silent"]}), tmp_path / "sweep")
    outcomes = run_local(plan, lambda run: [sys.executable, str(script), str(run.config_path)])
    by_mode = {o.run.axes[MODE]: o for o in outcomes}
    assert by_mode["ok"].status == RunStatus("completed", 1.5, 12)
    crash = by_mode["crash"]
    assert crash.returncode == 3 and crash.status.status == "failed"
    assert "command exited with code 3" in crash.status.error and "CUDA out of memory" in crash.status.error
    assert "training crash" in (crash.run.directory / "log.txt").read_text()
    assert RunStatus.read(crash.run.directory).status == "failed"
    silent = by_mode["silent"].status
    assert silent.status == "failed" and "recorded status 'running'" in silent.error
    assert silent.wall_clock_s > 0


def test_slurm_array_script_runs_a_task_and_records_its_failure(tmp_path, monkeypatch):
    plan = expand_grid(_grid(tmp_path, axes={MODE: ["ok", "crash"]}), tmp_path / "sweep")
    srun = tmp_path / "bin" / "srun"  # Slurm's launcher stands in as "run the command once"
    srun.parent.mkdir()
    srun.write_text('#!/bin/bash\nexec "$@"\n')
    srun.chmod(0o755)
    script = write_slurm_array(
        plan,
        command_builder=lambda run: [
            sys.executable,
            "-c",
            "import sys; sys.exit(0 if 'r000' in sys.argv[1] else 7)",
            run.name,
        ],
        partition="gpu",
        max_parallel=1,
        setup_lines=["export MTFLOW_TEST=1"],
        python=sys.executable,
    )
    text = script.read_text()
    assert "#SBATCH --array=0-1%1" in text and "#SBATCH --partition=gpu" in text
    assert "#SBATCH --ntasks-per-node=1" in text and "--gpus-per-node" not in text  # toy.yaml: 1 CPU device
    assert "export MTFLOW_TEST=1" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {
        **os.environ,
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_JOB_ID": "42",
        "PATH": f"{srun.parent}:{os.environ['PATH']}",
    }
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
    assert axes["parameters"]["model.rollout.group_size"] == {"values": [2, 4]}
    assert axes["parameters"]["trainer.log_every_n_steps"] == {"value": 5}
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


def test_the_trainer_writes_status_json_through_the_one_run_status(tmp_path):
    """The RunStatusWriter callback writes status.json in RunStatus's format (what runners and collect read), with
    the module's own counters (the values its checkpoints hold)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from mtflow.training.callbacks import RunStatusWriter

    trainer = SimpleNamespace(_mtflow_run_dir=tmp_path / "run", is_global_zero=True, world_size=2)
    module = SimpleNamespace(iteration=3, samples_seen=48)
    writer = RunStatusWriter()
    writer.on_fit_start(trainer, module)
    running = RunStatus.read(tmp_path / "run")
    assert (running.status, running.samples_seen, running.iteration, running.error) == (
        "running",
        48,
        3,
        None,
    )
    module.iteration, module.samples_seen = 4, 64
    writer.on_train_batch_end(trainer, module, None, None, 0)
    writer.on_exception(trainer, module, RuntimeError("judge unreachable"))
    status = RunStatus.read(tmp_path / "run")
    assert (status.status, status.samples_seen, status.iteration) == ("failed", 64, 4)
    assert status.error == "RuntimeError: judge unreachable"
    data = json.loads((tmp_path / "run" / "status.json").read_text())
    assert list(data) == ["status", "wall_clock_s", "samples_seen", "iteration", "error"]
    writer.on_exception(trainer, module, SIGTERMException())
    assert "stopped by SIGTERM after iteration 4" in RunStatus.read(tmp_path / "run").error
