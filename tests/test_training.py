"""``mtflow fit`` in-process on the tiny Kontext model: GRPO and NFT learn only LoRA, log the documented metrics,
resume exactly, exclude unscored trajectories, and stop cleanly on a dead judge or non-finite updates."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtflow.cli import main
from mtflow.models.kontext import KontextPolicy
from mtflow.testing.fixtures import algorithm, tiny_fit_config, write_config, write_random_manifest


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_random_manifest(tmp_path_factory.mktemp("data"), num_chains=8, num_turns=2)


def _fit(config: dict, tmp_path: Path, *extra: str):
    path = write_config(config, tmp_path / f"{config['trainer']['logger']['init_args']['name']}.yaml")
    return main(["fit", "--config", str(path), *extra])


def _metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def _lora(cli) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in cli.model.named_parameters() if "lora_" in k}


def _base(cli) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone() for k, v in cli.model.policy.transformer.named_parameters() if "lora_" not in k
    }


@pytest.mark.parametrize("loss", ["grpo", "nft"])
def test_fit_updates_only_lora_and_logs_documented_metrics(tiny_kontext_path, manifest, tmp_path, loss):
    model = {"algorithm": algorithm("GRPO")}
    if loss == "nft":
        model = {"algorithm": algorithm("NFT", train_timesteps=2), "ema_decay": 0.5}
    config = tiny_fit_config(tiny_kontext_path, manifest, tmp_path, model=model, name=loss)
    reference = KontextPolicy(str(tiny_kontext_path), dtype="float32", resolution=32, lora_rank=4).load()
    base_before = {k: v.clone() for k, v in reference.transformer.named_parameters() if "lora_" not in k}

    cli = _fit(config, tmp_path)
    run = tmp_path / loss / "version_0"
    assert cli.model.iteration == 2
    # LoRA moved (B starts at zero), the base did not
    trained = cli.model.policy.adapter_parameters("default")
    assert any(
        float(p.abs().sum()) > 0 for n, p in cli.model.policy.adapter_named_parameters() if "lora_B" in n
    )
    assert all(p.requires_grad for p in trained)
    for key, value in _base(cli).items():
        assert torch.equal(value, base_before[key]), key
    rows = _metrics(run)
    assert len(rows) == 2
    names = set(rows[0])
    expected = {
        "reward/if_turn1",
        "reward/if_turn2",
        "reward/cc_turn1",
        "reward/cc_turn2",
        "reward/mean",
        "adv/std",
        "adv/mean",
        "perf/rollout_s",
        "perf/judge_s",
        "perf/update_s",
        "perf/iteration_s",
        "train/iteration",
    }
    expected |= (
        {"policy/clip_frac", "policy/approx_kl", "loss/policy"}
        if loss == "grpo"
        else {"loss/policy", "loss/kl", "loss/nft_positive", "policy/r_mean"}
    )
    assert expected <= names, expected - names
    assert [float(r["train/iteration"]) for r in rows] == [1.0, 2.0]
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "completed" and status["samples_seen"] == 2 * 2 * 2
    assert sorted(p.name for p in (run / "images").glob("*.png")) == [  # the captioned grids
        "rollout_iter000001.png",
        "rollout_iter000002.png",
    ]
    if loss == "nft":
        # the old adapter trails the trained one (eta = min(0.001 * it, 0.5) > 0 after the first iteration)
        old = cli.model.policy.adapter_parameters("old")
        ema = cli.model.policy.adapter_parameters("ema")
        assert any(not torch.equal(a, b) for a, b in zip(old, trained))
        assert any(not torch.equal(a, b) for a, b in zip(ema, trained))


@pytest.mark.parametrize("loss", ["grpo", "nft"])
def test_resume_reproduces_an_uninterrupted_run_exactly(tiny_kontext_path, manifest, tmp_path, loss):
    # NFT also carries the old adapter and the EMA adapter through the checkpoint
    extra = (
        {"algorithm": algorithm("GRPO")}
        if loss == "grpo"
        else {"algorithm": algorithm("NFT", train_timesteps=2), "ema_decay": 0.5}
    )

    def config(name: str, iterations: int) -> dict:
        return tiny_fit_config(
            tiny_kontext_path, manifest, tmp_path, model={**extra, "max_iterations": iterations}, name=name
        )

    full_cli = _fit(config("full", 4), tmp_path)
    _fit(config("first", 2), tmp_path)
    ckpt = tmp_path / "first" / "version_0" / "checkpoints" / "last.ckpt"
    # the checkpoint holds adapters and optimiser state only: no base weight
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["state_dict"] and all("lora_" in k for k in state["state_dict"])
    adapters = {k.split(".")[-2] for k in state["state_dict"]}
    assert adapters == ({"default"} if loss == "grpo" else {"default", "old", "ema"})
    assert ckpt.stat().st_size < 200_000
    base_bytes = sum(v.numel() * v.element_size() for v in full_cli.model.policy.transformer.parameters())
    assert ckpt.stat().st_size < base_bytes / 2
    resumed = _fit(config("resumed", 4), tmp_path, "--ckpt_path", str(ckpt))
    assert resumed.model.iteration == 4
    for key, value in _lora(full_cli).items():  # trained, old and EMA adapters
        assert torch.equal(value, _lora(resumed)[key]), key
    full_rows = {r["train/iteration"]: r for r in _metrics(tmp_path / "full" / "version_0")}
    resumed_rows = {r["train/iteration"]: r for r in _metrics(tmp_path / "resumed" / "version_0")}
    assert set(resumed_rows) == {"3.0", "4.0"}
    keys = [
        "reward/mean",
        "loss/policy",
        "adv/std",
        "policy/approx_kl" if loss == "grpo" else "policy/r_mean",
    ]
    for it in ("3.0", "4.0"):
        for key in keys:
            assert full_rows[it][key] == resumed_rows[it][key], (it, key)


def test_unscored_trajectories_get_no_gradient(tiny_kontext_path, manifest, tmp_path):
    # every member g1 is refused by the judge: groups of 2 keep 1 valid member, so nothing may be learned
    model = {
        "scorer": {
            "class_path": "mtflow.testing.scorers.BrightnessScorer",
            "init_args": {"unscorable_suffixes": ["/g1"]},
        },
        "max_iterations": 1,
    }
    cli = _fit(tiny_fit_config(tiny_kontext_path, manifest, tmp_path, model=model, name="unscored"), tmp_path)
    assert all(
        float(p.abs().sum()) == 0 for n, p in cli.model.policy.adapter_named_parameters() if "lora_B" in n
    )
    row = _metrics(tmp_path / "unscored" / "version_0")[0]
    assert float(row["reward/num_unscored"]) == 2 and float(row["train/skipped_update"]) == 1.0
    assert float(row["reward/frac_unscored"]) == 0.5


def test_dead_judge_stops_training_with_a_clear_error_and_keeps_the_checkpoint(
    tiny_kontext_path, manifest, tmp_path
):
    first = tiny_fit_config(tiny_kontext_path, manifest, tmp_path, model={"max_iterations": 1}, name="alive")
    _fit(first, tmp_path)
    ckpt = tmp_path / "alive" / "version_0" / "checkpoints" / "last.ckpt"
    before = ckpt.read_bytes()
    model = {
        "scorer": {
            "class_path": "mtflow.reward.client.RemoteScorer",
            "init_args": {"url": "http://127.0.0.1:9", "deadline_s": 2.0, "max_retries": 1},
        },
        "max_iterations": 3,
    }
    config = tiny_fit_config(tiny_kontext_path, manifest, tmp_path, model=model, name="dead")
    config["checkpoint"] = {"every_n_iterations": 1, "dirpath": str(ckpt.parent)}
    with pytest.raises(Exception, match="127.0.0.1:9"):
        _fit(config, tmp_path, "--ckpt_path", str(ckpt))
    assert ckpt.read_bytes() == before
    status = json.loads((tmp_path / "dead" / "version_0" / "status.json").read_text())
    assert status["status"] == "failed" and "127.0.0.1:9" in status["error"]


def test_non_finite_updates_are_skipped_then_abort(tiny_kontext_path, manifest, tmp_path):
    model = {
        "optim": {"lr": 1e30, "max_grad_norm": 0.0, "max_nonfinite_skips": 2, "updates_per_rollout": 1},
        "max_iterations": 8,
    }
    config = tiny_fit_config(tiny_kontext_path, manifest, tmp_path, model=model, name="nan")
    # lr = 1e30 makes the first step blow the LoRA weights up; from then on every loss is non-finite and skipped
    with pytest.raises(FloatingPointError, match="consecutive non-finite"):
        _fit(config, tmp_path)


def test_export_round_trip_into_a_stock_pipeline(tiny_kontext_path, manifest, tmp_path):
    from diffusers import FluxKontextPipeline

    from mtflow.data.records import EditChain
    from mtflow.rollout import RolloutConfig, rollout

    config = tiny_fit_config(
        tiny_kontext_path, manifest, tmp_path, model={"optim": {"lr": 0.05}}, name="export"
    )
    cli = _fit(config, tmp_path)
    ckpt = tmp_path / "export" / "version_0" / "checkpoints" / "last.ckpt"
    config_path = tmp_path / "export.yaml"
    main(
        [
            "export",
            "--config",
            str(config_path),
            "--ckpt_path",
            str(ckpt),
            "--output_dir",
            str(tmp_path / "lora"),
        ]
    )
    lora_file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    tensors = load_file(lora_file)
    alphas = [k for k in tensors if k.endswith(".alpha")]
    assert alphas and all(float(tensors[k]) == 8.0 for k in alphas)  # alpha 8 != rank 4
    assert all(k.startswith("transformer.") for k in tensors)

    policy = cli.model.policy
    chain = EditChain(
        "c",
        policy_source := __import__("PIL.Image").Image.open(manifest.parent / "src_0000.png"),
        ["make it red"],
    )
    ours = rollout(
        policy,
        [chain],
        RolloutConfig(group_size=1, num_steps=3),
        generator=torch.Generator().manual_seed(0),
    )
    pipe = FluxKontextPipeline.from_pretrained(tiny_kontext_path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    call = dict(
        image=policy_source,
        prompt="make it red",
        num_inference_steps=3,
        guidance_scale=2.5,
        height=32,
        width=32,
        max_area=32 * 32,
        _auto_resize=False,
        max_sequence_length=32,
        output_type="latent",
    )
    pipe.load_lora_weights(str(lora_file))
    theirs = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(ours.final_latents[:, 0], theirs, atol=1e-5, rtol=1e-5)
    pipe.unload_lora_weights()
    base = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert (base - theirs).abs().max() > 1e-3  # the LoRA really changes the output


def test_export_refuses_missing_corrupt_and_foreign_checkpoints(tmp_path):
    from mtflow.export import checkpoint_adapter

    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        checkpoint_adapter(tmp_path / "missing.ckpt")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    truncated = tmp_path / "truncated.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(64)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    for path in (garbage, truncated):
        with pytest.raises(ValueError, match="not a readable mtflow checkpoint"):
            checkpoint_adapter(path)
    listed = tmp_path / "list.ckpt"
    torch.save([1, 2], listed)
    with pytest.raises(ValueError, match="holds a list"):
        checkpoint_adapter(listed)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="not written by mtflow fit"):
        checkpoint_adapter(foreign)
    other_adapter = tmp_path / "nft.ckpt"
    torch.save({"state_dict": {}, "mtflow": {"adapters": ["default"], "lora": {"alpha": 8}}}, other_adapter)
    with pytest.raises(ValueError, match=r"has adapters \['default'\], not 'ema'"):
        checkpoint_adapter(other_adapter, "ema")


def test_resuming_with_other_lora_settings_or_adapters_is_refused_in_one_message(
    tiny_kontext_path, manifest, tmp_path
):
    _fit(
        tiny_fit_config(tiny_kontext_path, manifest, tmp_path, model={"max_iterations": 1}, name="r8"),
        tmp_path,
    )
    ckpt = str(tmp_path / "r8" / "version_0" / "checkpoints" / "last.ckpt")
    rank = torch.load(ckpt, map_location="cpu", weights_only=True)["mtflow"]["lora"]["rank"]
    other = tiny_fit_config(tiny_kontext_path, manifest, tmp_path, model={"max_iterations": 2}, name="other")
    other["model"]["policy"]["init_args"]["lora_rank"] = rank * 2
    with pytest.raises(ValueError, match=rf"LoRA rank {rank} in the checkpoint, {rank * 2} in this run"):
        _fit(other, tmp_path, "--ckpt_path", ckpt)
    nft = tiny_fit_config(
        tiny_kontext_path,
        manifest,
        tmp_path,
        model={"max_iterations": 2, "algorithm": algorithm("NFT")},
        name="nft",
    )
    with pytest.raises(ValueError, match=r"this run \(NFT\) also needs \['old'\]"):
        _fit(nft, tmp_path, "--ckpt_path", ckpt)


def test_seed_everything_alone_seeds_the_rollouts_and_the_data_order(tiny_kontext_path, manifest, tmp_path):
    # A sweep's seed axis sets only seed_everything; with model.seed / data seed pinned at 0 two "seeds" shared all
    # rollout noise and the training order and differed only in the LoRA initialisation.
    config = tiny_fit_config(tiny_kontext_path, manifest, tmp_path, name="seeded")
    cli = _fit(config, tmp_path, "--seed_everything=5", "--model.max_iterations=1")
    assert cli.model.seed == 5 and cli.model.hparams.seed == 5
    assert cli.datamodule.seed == 5
    checkpoint = torch.load(
        next((tmp_path / "seeded" / "version_0" / "checkpoints").glob("*.ckpt")), weights_only=False
    )
    assert checkpoint["hyper_parameters"]["seed"] == 5  # the resolved value, so a resumed run draws the same


def test_an_explicit_seed_wins_over_seed_everything():
    import lightning

    from mtflow.seeding import resolve_seed
    from mtflow.toy.module import ToyDataModule

    assert resolve_seed(None) == 0  # no seed_everything in this process (conftest clears it)
    lightning.seed_everything(7)
    assert resolve_seed(None) == 7 and ToyDataModule().seed == 7
    assert resolve_seed(2) == 2 and ToyDataModule(seed=2).seed == 2


def test_grpo_ema_adapter_follows_its_recurrence_and_is_what_gets_evaluated(
    tiny_kontext_path, manifest, tmp_path
):
    """ema_decay on GRPO (configs/toy_long.yaml): after every iteration the EMA adapter is
    decay * EMA + (1 - decay) * trained, rollouts still sample the trained adapter, and evaluation uses the EMA."""
    decay = 0.5
    config = tiny_fit_config(
        tiny_kontext_path,
        manifest,
        tmp_path,
        model={"algorithm": algorithm("GRPO"), "ema_decay": decay, "max_iterations": 3},
    )
    config["checkpoint"] = {"every_n_iterations": 1, "save_top_k": -1}
    cli = _fit(config, tmp_path)
    assert cli.model.algorithm.sampling_adapter == "default" and cli.model.eval_adapter == "ema"
    folder = tmp_path / "run" / "version_0" / "checkpoints"
    states = [
        torch.load(folder / f"iter_{n:06d}.ckpt", map_location="cpu", weights_only=True)["state_dict"]
        for n in (1, 2, 3)
    ]

    def adapter(state: dict, name: str) -> dict[str, torch.Tensor]:
        return {k.replace(f".{name}.", "."): v for k, v in state.items() if f".{name}." in k}

    first_trained, first_ema = adapter(states[0], "default"), adapter(states[0], "ema")
    assert first_trained.keys() == first_ema.keys() and first_trained
    for key, value in first_trained.items():
        if "lora_B" in key:  # B starts at zero in both adapters
            torch.testing.assert_close(first_ema[key], (1 - decay) * value, rtol=0, atol=1e-7)
    for previous, current in zip(states, states[1:]):
        ema_before, trained, ema = (
            adapter(previous, "ema"),
            adapter(current, "default"),
            adapter(current, "ema"),
        )
        moved = False
        for key, value in trained.items():
            torch.testing.assert_close(
                ema[key], decay * ema_before[key] + (1 - decay) * value, rtol=0, atol=1e-7
            )
            moved |= not torch.equal(ema[key], value)
        assert moved  # the EMA lags the trained adapter
    final = adapter(cli.model.state_dict(), "ema")  # the last checkpoint holds the adapter the run ended with
    last = adapter(states[-1], "ema")
    assert final.keys() == last.keys()
    for key, value in final.items():
        assert torch.equal(value, last[key]), key


def test_eval_scorer_judges_the_heldout_table_and_per_chain_scores_are_written(
    tiny_kontext_path, manifest, tmp_path
):
    """``model.eval_scorer``: training is rewarded by ``scorer``, the held-out before/after table by
    ``eval_scorer`` (here one that cannot score chain0001, so only the evaluation loses it); ``heldout_scores.json``
    holds every chain's per-turn scores, and they reproduce the table's cumulative success exactly."""
    model = {
        "eval_scorer": {
            "class_path": "mtflow.testing.scorers.BrightnessScorer",
            "init_args": {"unscorable_suffixes": ["chain0001/g0"]},  # evaluation items are "<chain>/g0"
        },
        "evaluation": {"threshold": 3.0},  # random images score IF ~ 3 here: some turns pass, some fail
        "max_iterations": 1,
    }
    config = tiny_fit_config(
        tiny_kontext_path,
        manifest,
        tmp_path,
        model=model,
        name="evaljudge",
        data={"val_manifest": str(manifest)},
    )
    config["heldout"] = {"num_chains": 4, "batch_size": 4}
    _fit(config, tmp_path)
    run = tmp_path / "evaljudge" / "version_0"
    (trained,) = [row for row in _metrics(run) if row.get("reward/num_unscored")]  # the iteration's row
    assert float(trained["reward/num_unscored"]) == 0  # the training judge scored every trajectory
    scores = json.loads((run / "eval" / "heldout_scores.json").read_text())
    report = json.loads((run / "eval" / "before_after.json").read_text())
    for when in ("before", "after"):
        ids, if_rows = scores[when]["chain_ids"], scores[when]["if"]
        assert ids == ["chain0000", "chain0001", "chain0002", "chain0003"]
        assert if_rows[1] == [None, None] and all(None not in row for i, row in enumerate(if_rows) if i != 1)
        kept = [row for row in if_rows if None not in row]
        for k in range(2):
            passed = sum(all(v >= 3.0 for v in row[: k + 1]) for row in kept)
            expected = 100.0 * passed / len(kept)
            assert report[when]["conditions"]["model"]["cumulative_success"][k]["value"] == pytest.approx(
                expected
            )
        assert report[when]["conditions"]["model"]["num_dropped_chains"] == 1
