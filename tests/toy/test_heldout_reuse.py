"""The toy job's before-RL held-out numbers: reused from the prior's recorded ``heldout.json`` only when every
evaluation setting matches (field by field), evaluated otherwise; and the reused numbers are the ones a fresh
evaluation produces."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mtflow.cli import main
from mtflow.models.kontext import KontextPolicy, resolve_pretrained
from mtflow.testing.fixtures import REPO_CONFIGS, torch_threads, write_config
from mtflow.toy.judge import ToyJudge
from mtflow.toy.module import ToyDataModule
from mtflow.toy.prior import PRIOR_ASSET
from mtflow.toy.recorded import match_recorded
from mtflow.toy.world import ToyWorld

TOY_EVALUATION = dict(
    num_chains=200,
    num_steps=10,
    seed=0,
    batch_size=100,
    forward_batch_size=100,
    threshold=4.0,
    num_bootstrap=200,
)


def _toy_policy(**overrides) -> KontextPolicy:
    args = dict(pretrained=PRIOR_ASSET, dtype="float32", resolution=32, max_sequence_length=12, lora_rank=8)
    return KontextPolicy(**{**args, **overrides})


def _heldout(world: ToyWorld | None = None, **overrides):
    return ToyDataModule(world=world, **overrides).build_sources()["val"]


def test_the_toy_job_settings_match_the_shipped_record_and_every_changed_field_is_named(capsys):
    from mtflow.testing.fixtures import printed_fit_config

    toy = printed_fit_config(capsys, "toy.yaml")  # what `mtflow fit --config configs/toy.yaml` runs
    heldout, model = toy["heldout"], toy["model"]
    evaluation = dict(
        num_chains=heldout["num_chains"],
        num_steps=model["evaluation"]["num_steps"],
        seed=toy["seed_everything"],
        batch_size=heldout["batch_size"],
        forward_batch_size=heldout["forward_batch_size"],
        threshold=model["evaluation"]["threshold"],
        num_bootstrap=200,
    )
    assert evaluation == TOY_EVALUATION
    policy = _toy_policy(
        **{k: v for k, v in model["policy"]["init_args"].items() if k == "lora_feed_forward"}
    )
    report, why = match_recorded(policy, ToyJudge(), _heldout(num_heldout_chains=200), evaluation)
    recorded = json.loads((Path(resolve_pretrained(PRIOR_ASSET)) / "heldout.json").read_text())
    assert report == recorded["multi_turn"]["report"] and why.startswith("recorded in")

    changed = {
        "settings.num_steps: run 6, recorded 10": dict(evaluation=dict(TOY_EVALUATION, num_steps=6)),
        "settings.seed: run 1": dict(evaluation=dict(TOY_EVALUATION, seed=1)),
        "settings.num_chains: run 50": dict(evaluation=dict(TOY_EVALUATION, num_chains=50)),
        "settings.forward_batch_size: run 64": dict(evaluation=dict(TOY_EVALUATION, forward_batch_size=64)),
        "settings.num_bootstrap: run 1000": dict(evaluation=dict(TOY_EVALUATION, num_bootstrap=1000)),
        "judge.protect_earlier_edits: run True": dict(judge=ToyJudge(protect_earlier_edits=True)),
        "judge.colour_tolerance: run 30.0": dict(judge=ToyJudge(colour_tolerance=30.0)),
        "world.position_jitter: run 2": dict(source=_heldout(ToyWorld(position_jitter=2))),
        "world.seed: run 5": dict(source=_heldout(ToyWorld(seed=5))),
        "chains.num_turns: run 2": dict(source=_heldout(num_turns=2)),
        "policy.lora_weights: run 'lora.safetensors'": dict(
            policy=_toy_policy(lora_weights="lora.safetensors")
        ),
        "policy.resolution: run 64": dict(policy=_toy_policy(resolution=64)),
        "policy.max_sequence_length: run 16": dict(policy=_toy_policy(max_sequence_length=16)),
    }
    for field, change in changed.items():
        arguments = dict(policy=policy, scorer=ToyJudge(), source=_heldout(), evaluation=TOY_EVALUATION)
        arguments.update({"scorer" if k == "judge" else k: v for k, v in change.items()})
        report, why = match_recorded(**arguments)
        assert report is None and field in why, (field, why)


def _prior_copy_with_record(folder: Path, evaluation: dict) -> Path:
    """The toy prior (its files linked) with a ``heldout.json`` recorded here, as ``tools/train_toy_prior.py``
    records one (``evaluate_chains`` of the bare prior, deterministic, exact judge), on 4 chains."""
    from mtflow.eval.evaluate import evaluate_chains
    from mtflow.toy.prior import evaluation_kwargs, load_prior_policy

    prior = Path(resolve_pretrained(PRIOR_ASSET))
    folder.mkdir()
    for entry in prior.iterdir():
        if entry.name != "heldout.json":
            os.symlink(entry, folder / entry.name)
    settings = type("Settings", (), evaluation)
    chains = [_heldout(num_heldout_chains=4)[i] for i in range(evaluation["num_chains"])]
    with torch_threads(1):
        report, _ = evaluate_chains(
            load_prior_policy(folder), ToyJudge(), chains, **evaluation_kwargs(settings, None)
        )
    record = {
        "settings": evaluation,
        "judge": {"class": "ToyJudge", "protect_earlier_edits": False},
        "world": {},
        "pretrained": str(folder),
        "max_sequence_length": 12,
        "multi_turn": {"num_turns": 3, "report": report.to_dict()},
    }
    (folder / "heldout.json").write_text(json.dumps(record))
    return folder


def _fit_before(tmp_path: Path, pretrained: Path, name: str, **heldout) -> tuple[dict, str]:
    overlay = {
        "trainer": {
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path), "name": name},
            },
        },
        "model": {
            "policy": {"init_args": {"pretrained": str(pretrained)}},
            "max_iterations": 1,
            "rollout": {"group_size": 2, "num_steps": 2},
            "evaluation": {"num_steps": 2},
        },
        "data": {"init_args": {"num_train_chains": 4, "num_heldout_chains": 4, "batch_size": 1}},
        "heldout": {"num_chains": 4, "batch_size": 4, "forward_batch_size": 8, **heldout},
        "image_logger": {"every_n_iterations": 0},
        "checkpoint": {"every_n_iterations": 0},
    }
    with torch_threads(1):
        cli = main(
            [
                "fit",
                "--config",
                str(REPO_CONFIGS / "toy.yaml"),
                "--config",
                str(write_config(overlay, tmp_path / f"{name}.yaml")),
            ]
        )
    callback = next(c for c in cli.trainer.callbacks if type(c).__name__ == "HeldOutEvaluation")
    return callback.before, callback.before_source


@pytest.mark.slow
def test_a_fit_reuses_a_matching_record_which_equals_a_fresh_evaluation_and_re_evaluates_a_changed_setting(
    tmp_path,
):
    evaluation = dict(TOY_EVALUATION, num_chains=4, num_steps=2, batch_size=4, forward_batch_size=8)
    prior = _prior_copy_with_record(tmp_path / "prior", evaluation)
    recorded = json.loads((prior / "heldout.json").read_text())["multi_turn"]["report"]

    reused, source = _fit_before(tmp_path, prior, "reused")
    assert source == f"recorded in {prior / 'heldout.json'}" and reused == recorded

    fresh, source = _fit_before(tmp_path, prior, "fresh", reuse_recorded=False)
    assert source == "evaluated"
    model = fresh["conditions"]["model"]
    assert model == recorded["conditions"]["model"]  # the recorded numbers are exactly what the fit measures

    changed, source = _fit_before(tmp_path, prior, "changed", forward_batch_size=4)  # one setting differs
    assert source == "evaluated"
    assert changed["conditions"]["model"]["num_chains"] == 4
