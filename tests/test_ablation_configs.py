"""The ablation study's grids (configs/sweeps/ablations/) expand through LightningCLI's own parser into the runs the
study needs: 3 seeds per cell, the reference's settings everywhere except the ablated knob, the exact toy judge for
every evaluation, compute-matched cells where the grid says so."""

from __future__ import annotations

from math import prod
from pathlib import Path

import pytest

from mtflow.sweeps import config_value, expand_grid, load_grid

GRIDS = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "ablations"
NAMES = sorted(p.stem for p in GRIDS.glob("*.yaml") if p.stem != "reference")


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablations")
    return {name: expand_grid(GRIDS / f"{name}.yaml", root / name) for name in NAMES}


def _config(plan, index: int = 0) -> dict:
    import yaml

    return yaml.safe_load(plan.runs[index].config_path.read_text())


def test_every_grid_expands_into_three_seeds_per_cell(plans):
    assert {"ref", "single_turn", "broadcast_turn", "nft", "judge_noise", "lambda_cc", "beta_kl"} <= set(
        plans
    )
    for name, plan in plans.items():
        grid = load_grid(GRIDS / f"{name}.yaml")
        assert grid.axes["seed_everything"] == [0, 1, 2], name
        assert len(plan.runs) == prod(len(v) for v in grid.axes.values()), name
        for run in plan.runs:
            config = _config(plan, run.index)
            assert config_value(config, "model.eval_scorer")["class_path"] == "mtflow.toy.judge.ToyJudge", (
                name
            )
            assert config_value(config, "model.evaluation.num_steps") == 10  # every cell evaluates alike


def test_cells_differ_from_the_reference_only_in_their_knob(plans):
    ref = _config(plans["ref"])
    assert ref["model"]["advantage"]["broadcast"] == "trajectory"  # the paper's method
    assert ref["model"]["algorithm"]["class_path"] == "mtflow.algorithms.GRPO"
    single = _config(plans["single_turn"])
    assert (
        single["data"]["init_args"]["train_num_turns"] == 1
        and single["data"]["init_args"]["batch_size"] == 12
    )
    # compute-matched: 12 chains x 8 x 1 turn = 4 chains x 8 x 3 turns trajectory-turns per iteration
    assert 12 * 8 * 1 == ref["data"]["init_args"]["batch_size"] * ref["model"]["rollout"]["group_size"] * 3
    for name, key, value in (
        ("broadcast_turn", ("model", "advantage", "broadcast"), "turn"),
        ("fusion_reward", ("model", "advantage", "fusion"), "reward"),
        ("last_step", ("model", "algorithm", "init_args", "deterministic_last_step"), True),
        ("binary", ("model", "scorer", "init_args", "binary_threshold"), 4.0),
    ):
        config = _config(plans[name])
        node = config
        for part in key:
            node = node[part]
        assert node == value, name
        for group in ("rollout", "optim"):
            assert config["model"][group] == ref["model"][group], (name, group)
        assert config["model"]["max_iterations"] == ref["model"]["max_iterations"] == 30
    noisy = _config(plans["judge_noise"])
    assert noisy["model"]["scorer"]["class_path"] == "mtflow.toy.perturbed.PerturbedJudge"
    assert noisy["model"]["scorer"]["init_args"]["judge"]["class_path"] == "mtflow.toy.judge.ToyJudge"
    assert noisy["model"]["scorer"]["init_args"]["noise_std"] == 0.5
    assert _config(plans["nft"])["model"]["algorithm"]["class_path"] == "mtflow.algorithms.NFT"


def test_group_size_and_step_cells_keep_the_reference_cost(plans):
    for name, key, budget in (
        ("group_size", "model.rollout.group_size", 32),
        ("num_steps", "model.rollout.num_steps", 24),
    ):
        for run in plans[name].runs:
            config = _config(plans[name], run.index)
            assert config_value(config, "data.init_args.batch_size") * config_value(config, key) == budget
