"""A checkpoint written by mtflow v0.1 (``tests/data/v0_1``, flat module hyperparameters: ``loss``, ``group_size``,
``clip_eps``, ``eval_num_steps``, ...) still works with ``mtflow export`` and ``mtflow test``: its hyperparameters
are migrated to the typed groups on load, the exports equal v0.1's exports tensor for tensor, and the evaluation
report equals v0.1's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtflow.cli import main
from mtflow.testing.fixtures import REPO_CONFIGS
from mtflow.training.migrate import is_v01, migrate_hparams

FIXTURE = Path(__file__).parent / "data" / "v0_1"
CKPT = FIXTURE / "toy_grpo_ema.ckpt"
# the LoRA settings the fixture was trained with (its README); option names of this version
LORA = [
    "--model.policy.init_args.lora_rank=2",
    "--model.policy.init_args.lora_alpha=4",
    "--model.policy.init_args.lora_feed_forward=false",
    "--model.ema_decay=0.5",
]


def _stored_hparams() -> dict:
    return torch.load(CKPT, map_location="cpu", weights_only=True)["hyper_parameters"]


def test_v01_hyperparameters_migrate_to_the_typed_groups():
    stored = _stored_hparams()
    assert is_v01(stored) and stored["loss"] == "grpo" and "nft_beta" in stored  # v0.1 saved every argument
    migrated = migrate_hparams(stored)
    assert migrated["algorithm"] == {
        "class_path": "mtflow.algorithms.GRPO",
        "init_args": {
            "noise_level": 0.9,
            "stochastic": "all",
            "window_size": 2,
            "clip_eps": 0.001,
            "beta_kl": 0.0,
        },
    }  # the NFT-only values of a GRPO run are dropped, not carried into GRPO
    assert migrated["rollout"] == {
        "group_size": 2,
        "num_steps": 3,
        "forward_batch_size": 64,
        "store_dtype": "float32",
        "kernels": "auto",
    }
    assert migrated["advantage"]["a_max"] == stored["adv_clip"] == 5.0
    assert migrated["advantage"]["broadcast"] == "turn"
    assert migrated["optim"] == {
        "lr": 0.003,
        "weight_decay": 1e-4,
        "betas": [0.9, 0.999],
        "max_grad_norm": 1.0,
        "updates_per_rollout": 2,
        "max_nonfinite_skips": 3,
    }
    assert migrated["evaluation"] == {
        "threshold": 4.0,
        "num_steps": 10,
        "conditions": None,
        "bootstrap": 1000,
    }
    assert (migrated["ema_decay"], migrated["max_iterations"]) == (0.5, 2)
    assert migrate_hparams(migrated) == migrated  # already current: unchanged


def test_v01_nft_hyperparameters_migrate_including_the_stochastic_rollout_flag():
    flat = {"loss": "nft", "nft_beta": 0.5, "nft_train_timesteps": 3, "noise_level": 0.7, "clip_eps": 1e-4}
    assert migrate_hparams({**flat, "nft_stochastic_rollout": False})["algorithm"] == {
        "class_path": "mtflow.algorithms.NFT",
        "init_args": {"beta": 0.5, "train_timesteps": 3, "rollout_noise_level": 0.0},
    }
    stochastic = migrate_hparams({**flat, "nft_stochastic_rollout": True})["algorithm"]["init_args"]
    assert stochastic["rollout_noise_level"] == 0.7  # v0.1 sampled NFT rollouts with the shared noise level
    with pytest.raises(ValueError, match="unknown loss 'ppo'"):
        migrate_hparams({"loss": "ppo"})
    with pytest.raises(ValueError, match=r"does not know: \['mystery'\]"):
        migrate_hparams({"loss": "grpo", "mystery": 1})


@pytest.mark.parametrize("adapter", ["default", "ema"])
def test_v01_checkpoint_exports_the_same_tensors(tmp_path, adapter):
    main(
        [
            "export",
            "--config",
            str(REPO_CONFIGS / "toy.yaml"),
            *LORA,
            "--ckpt_path",
            str(CKPT),
            "--output_dir",
            str(tmp_path),
            "--adapter",
            adapter,
        ]
    )
    ours = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    theirs = load_file(FIXTURE / f"export_{adapter}.safetensors")
    assert ours.keys() == theirs.keys() and len(ours) > 0
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


def test_v01_checkpoint_evaluates_to_v01_report(tmp_path):
    main(
        [
            "test",
            "--config",
            str(REPO_CONFIGS / "toy.yaml"),
            *LORA,
            "--ckpt_path",
            str(CKPT),
            "--data.init_args.num_heldout_chains=8",
            "--data.init_args.val_batch_size=8",
            "--model.evaluation.conditions=[model,base,merged]",
            "--model.evaluation.num_steps=4",
            "--model.evaluation.bootstrap=50",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.logger.init_args.name=v01",
            "--trainer.enable_progress_bar=false",
        ]
    )
    ours = json.loads((tmp_path / "v01" / "version_0" / "eval" / "report.json").read_text())
    theirs = json.loads((FIXTURE / "test_report.json").read_text())
    assert ours["info"] == theirs["info"]  # the EMA adapter at iteration 2, 4 steps, the toy judge
    assert set(ours["conditions"]) == set(theirs["conditions"]) == {"model", "base", "merged"}
    # The same deterministic rollouts; only CPU rounding may move a decoded pixel by one grey level, which cannot
    # change a toy-judge success at these margins but moves CC_k by 100 / (255 * 32 * 32 * 3) per pixel-channel and
    # chain: allow 1 % of the pixel-channels (tests/test_evaluate.py explains the bound).
    tolerance = 100 * 0.01 / 255
    for name, condition in theirs["conditions"].items():
        mine = ours["conditions"][name]
        for key in ("cumulative_success", "success_rate", "marginal_success"):
            assert [e["value"] for e in mine[key]] == [e["value"] for e in condition[key]], (name, key)
        for key in ("consistency", "overall"):
            for a, b in zip(mine[key], condition[key]):
                assert (math.isnan(a["value"]) and math.isnan(b["value"])) or a["value"] == pytest.approx(
                    b["value"], abs=tolerance
                ), (name, key)
