"""The default job learns: ``ToyDataModule`` serves disjoint, reproducible chains, ``configs/toy*.yaml`` build, and
a short GRPO run from the shipped prior raises the mean training reward on fixed chains, which a sign-flipped
update does not."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest

from mtflow.cli import DEFAULT_FIT_CONFIG, main
from mtflow.data.loader import ChainBatches
from mtflow.testing.fixtures import printed_fit_config, torch_threads
from mtflow.toy.module import ToyDataModule
from mtflow.toy.world import ToyWorld
from mtflow.training.module import FlowRLModule

CONFIGS = DEFAULT_FIT_CONFIG.parent

# The learning run: configs/toy.yaml on 2 fixed training chains of 2 turns, G = 8, T = 4. Measured here
# (reward/mean = IF + 0.3 CC, turn-averaged; first iteration 5.20): the second half of 12 iterations averages
# about +0.55 above the first iteration; with the advantage sign flipped about -1.6.
LEARNING_RUN = {"iterations": 12, "margin": 0.3}


def test_data_module_serves_train_and_held_out_chains_that_share_no_source():
    world = ToyWorld(num_turns=2)
    data = ToyDataModule(world=world, num_train_chains=12, num_heldout_chains=6, batch_size=3, seed=1)
    data.setup("fit")
    train, held_out = data.sources["train"], data.sources["val"]
    assert len(train) == 12 and len(held_out) == 6 and data.sources["test"] is held_out
    train_sources = {train[i].source.tobytes() for i in range(len(train))}
    held_sources = {held_out[i].source.tobytes() for i in range(len(held_out))}
    assert not train_sources & held_sources
    assert all(train[i].num_turns == 2 and train[i].metadata["toy"]["split"] == "train" for i in range(12))
    assert all(held_out[i].metadata["toy"]["split"] == "heldout" for i in range(6))
    # reproducible: a second module yields the same chains; batches hold whole chains
    again = ToyDataModule(world=ToyWorld(num_turns=2), num_train_chains=12, num_heldout_chains=6)
    again.setup("fit")
    assert [again.sources["train"][i].instructions for i in range(12)] == [
        train[i].instructions for i in range(12)
    ]
    loader = data.train_dataloader()
    assert isinstance(loader, ChainBatches) and len(loader) == 4
    assert sum(len(batch) for batch in loader) == 12
    with pytest.raises(ValueError, match="num_train_chains"):
        ToyDataModule(num_train_chains=0)


JOBS = {"grpo": ("toy.yaml",), "nft": ("toy.yaml", "toy_nft.yaml")}


@pytest.mark.parametrize("job", sorted(JOBS))
def test_toy_configs_describe_rl_from_the_shipped_prior_with_the_exact_judge(job, capsys):
    config = printed_fit_config(capsys, *JOBS[job])
    assert config["model"]["policy"]["init_args"]["pretrained"] == "mtflow-assets:toy/prior"
    assert config["model"]["scorer"]["class_path"] == "mtflow.toy.judge.ToyJudge"
    assert config["data"]["class_path"] == "mtflow.toy.module.ToyDataModule"
    assert config["model"]["algorithm"]["class_path"] == f"mtflow.algorithms.{job.upper()}"
    assert DEFAULT_FIT_CONFIG.name == "toy.yaml"  # what `mtflow fit` without --config runs


@pytest.mark.parametrize("job", sorted(JOBS))
def test_drift_overlay_pairs_the_drift_prior_with_the_world_it_was_trained_on(job, capsys):
    """configs/toy_drift.yaml stacked on either job: the resolved config passes LightningCLI's validation and its
    data world is exactly the drift prior's recorded world (a held-out table on another world would mean nothing)."""
    from mtflow.toy.prior import prior_world

    printed = printed_fit_config(capsys, *JOBS[job], "toy_drift.yaml")
    pretrained = printed["model"]["policy"]["init_args"]["pretrained"]
    assert pretrained == "mtflow-assets:toy/prior_drift"
    algorithm = printed["model"]["algorithm"]["class_path"]
    assert algorithm == f"mtflow.algorithms.{job.upper()}"  # the overlay keeps the job
    world = printed["data"]["init_args"]["world"]["init_args"]
    assert vars(ToyWorld(**world)) == vars(prior_world(pretrained))


def test_long_overlay_doubles_the_default_job_and_evaluates_an_ema_adapter(capsys):
    """configs/toy_long.yaml stacked on configs/toy.yaml (the benchmark's long GRPO row): the same job, prior and
    world, with 60 iterations and an EMA adapter, validated by LightningCLI."""
    base = printed_fit_config(capsys, "toy.yaml")
    long = printed_fit_config(capsys, "toy.yaml", "toy_long.yaml")
    assert (long["model"]["max_iterations"], long["model"]["ema_decay"]) == (60, 0.9)
    assert base["model"]["ema_decay"] is None and base["model"]["max_iterations"] == 30
    for printed_config in (base, long):
        del printed_config["model"]["max_iterations"], printed_config["model"]["ema_decay"]
    assert long == base  # nothing else differs: same loss, prior, world, judge and evaluation


def _reward_curve(run: Path) -> list[float]:
    with open(run / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("reward/mean")]
    return [float(r["reward/mean"]) for r in rows]


def _learning_run(tmp_path: Path, name: str) -> list[float]:
    args = [
        "fit",
        "--config",
        str(CONFIGS / "toy.yaml"),
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--trainer.logger.init_args.name={name}",
        "--trainer.logger.init_args.version=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--model.max_iterations={LEARNING_RUN['iterations']}",
        "--model.rollout.group_size=8",
        "--model.rollout.num_steps=4",
        "--model.algorithm.stochastic=all",
        "--model.seed=0",
        "--data.init_args.num_train_chains=2",
        "--data.init_args.batch_size=2",
        "--data.init_args.num_turns=2",
        "--data.init_args.seed=0",
        "--heldout.enabled=false",
        "--image_logger.every_n_iterations=0",
        "--checkpoint.every_n_iterations=0",
    ]
    main(args)
    return _reward_curve(tmp_path / name / "version_0")


def test_short_grpo_run_raises_the_training_reward_and_a_sign_flip_does_not(tmp_path, monkeypatch):
    """Fixed seeds, one torch thread (the curves were measured so); the flipped run negates every advantage."""
    with torch_threads(1):
        learned = _learning_run(tmp_path, "learn")
        original = FlowRLModule.compute_advantages

        def flipped(self, scores, result):
            advantages, stats = original(self, scores, result)
            return dataclasses.replace(advantages, advantages=-advantages.advantages), stats

        monkeypatch.setattr(FlowRLModule, "compute_advantages", flipped)
        broken = _learning_run(tmp_path, "flipped")
    n = LEARNING_RUN["iterations"]
    assert len(learned) == len(broken) == n
    assert learned[0] == pytest.approx(broken[0])  # same start: the first rollout precedes any update

    def gain(curve: list[float]) -> float:  # mean of the second half minus the starting reward
        return sum(curve[n // 2 :]) / (n - n // 2) - curve[0]

    assert gain(learned) >= LEARNING_RUN["margin"], (learned, broken)
    assert gain(broken) < LEARNING_RUN["margin"], (learned, broken)
