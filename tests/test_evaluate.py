"""``mtflow test``: deterministic evaluation of a checkpoint or an exported LoRA, with the model / base / merged
conditions, written as report.json + Markdown + plots + image grid, numbers checked against an independent run."""

from __future__ import annotations

import json

import pytest
import torch

from mtflow.cli import main
from mtflow.data.manifest import ManifestDataset
from mtflow.eval.evaluate import evaluate_chains, merged_chain
from mtflow.eval.metrics import compute_eval_metrics
from mtflow.models.kontext import KontextPolicy
from mtflow.testing.fixtures import tiny_fit_config, write_config, write_random_manifest
from mtflow.testing.scorers import BrightnessScorer


@pytest.fixture(scope="module")
def trained_run(tiny_kontext_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    manifest = write_random_manifest(root / "data", num_chains=6, num_turns=2)
    config = tiny_fit_config(
        tiny_kontext_path,
        manifest,
        root,
        name="trained",
        model={"optim": {"lr": 0.05}, "max_iterations": 2},
        data={"val_manifest": str(manifest), "val_batch_size": 4},
    )
    path = write_config(config, root / "trained.yaml")
    main(["fit", "--config", str(path)])
    return root, manifest, path, root / "trained" / "version_0" / "checkpoints" / "last.ckpt"


def _test(config_path, *extra):
    return main(["test", "--config", str(config_path), *extra])


def test_report_of_a_checkpoint_matches_an_independent_evaluation(tiny_kontext_path, trained_run, capsys):
    root, manifest, config_path, ckpt = trained_run
    cli = _test(config_path, "--ckpt_path", str(ckpt), "--model.evaluation.bootstrap=200")
    out = root / "trained" / "version_0" / "eval"  # test reuses the logger's folder (version 0)
    report = json.loads((out / "report.json").read_text())
    assert set(report["conditions"]) == {"model", "base", "merged"}
    assert (
        report["conditions"]["merged"]["num_turns"] == 1 and report["conditions"]["model"]["num_turns"] == 2
    )
    assert {"model-base", "model-merged"} <= set(report["comparisons"])
    for name in ("report.md", "turn_curves.png", "chains.png"):
        assert (out / name).stat().st_size > 0
    assert "| turn" in (out / "report.md").read_text() or "turn" in (out / "report.md").read_text()

    # independent: the base condition is a noise-free rollout with adapters disabled, scored by the same judge
    chains = [ManifestDataset(manifest, 2)[i] for i in range(6)]
    policy = cli.model.policy
    independent, _ = evaluate_chains(
        policy,
        BrightnessScorer(),
        chains,
        conditions=["model", "base"],
        model_adapter="default",
        num_steps=2,
        batch_size=4,
        forward_batch_size=4,
        seed=0,
        num_bootstrap=0,
        progress="independent run",  # a progress bar changes nothing but stderr
    )
    assert "independent run" in capsys.readouterr().err
    # Both paths run the same float32 network on the same chains and noise, but CPU BLAS (MKL picks kernels by CPU
    # and buffer alignment) may round differently, so a decoded pixel near a rounding boundary can land one grey
    # level away. One such pixel-channel moves CC_k (points, 100 * (1 - mean |out - src|)) by 100 / (255 * numel)
    # per chain, and O_k = sqrt(C_k * CC_k) by at most as much (dO/dCC = sqrt(C/CC) / 2 < 1 here). Allow 1 % of
    # the pixel-channels to flip: 100 * 0.01 / 255 = 0.0039 points; a wrong chain, adapter or noise moves them by
    # whole points.
    one_percent_of_pixels_off_by_one_level = 100 * 0.01 / 255
    for name in ("model", "base"):
        ours = report["conditions"][name]
        theirs = independent.conditions[name]
        for k in range(2):
            for key, value in (
                ("overall", theirs.overall[k].value),
                ("consistency", theirs.consistency[k].value),
            ):
                assert ours[key][k]["value"] == pytest.approx(
                    value, abs=one_percent_of_pixels_off_by_one_level
                )
    # the trained adapter really differs from the base on these chains
    assert report["conditions"]["model"]["mean_if"] != report["conditions"]["base"]["mean_if"]


def test_options_typed_for_test_win_over_the_checkpoint_hyperparameters(trained_run):
    root, _, config_path, ckpt = trained_run
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    evaluation = stored["evaluation"]
    assert (
        evaluation["conditions"] is None and evaluation["num_steps"] is None
    )  # what the checkpoint would impose
    cli = _test(
        config_path,
        "--ckpt_path",
        str(ckpt),
        "--model.evaluation.conditions=[model]",
        "--model.evaluation.num_steps",
        "3",
    )
    assert cli.model.eval_config.conditions == ["model"] and cli.model.eval_config.num_steps == 3
    report = json.loads((root / "trained" / "version_0" / "eval" / "report.json").read_text())
    assert set(report["conditions"]) == {"model"}


def test_exported_lora_evaluates_like_the_checkpoint(tiny_kontext_path, trained_run, tmp_path):
    root, manifest, config_path, ckpt = trained_run
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
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    checkpoint_policy = KontextPolicy(
        str(tiny_kontext_path),
        dtype="float32",
        resolution=32,
        max_sequence_length=32,
        lora_rank=4,
        lora_alpha=8,
    ).load()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    with torch.no_grad():
        for name, param in checkpoint_policy.adapter_named_parameters("default"):
            module, rest = name.rsplit(".lora_", 1)
            param.copy_(state[f"policy.transformer.{module}.lora_{rest.split('.')[0]}.default.weight"])
    # a policy configured with a different alpha still reproduces the exported update exactly
    exported_policy = KontextPolicy(
        str(tiny_kontext_path),
        dtype="float32",
        resolution=32,
        max_sequence_length=32,
        lora_rank=4,
        lora_alpha=4,
        lora_weights=str(lora),
    ).load()
    chains = [ManifestDataset(manifest, 2)[i] for i in range(3)]
    kwargs = dict(
        conditions=["model"], num_steps=2, batch_size=3, forward_batch_size=4, seed=0, num_bootstrap=0
    )
    a, raw_a = evaluate_chains(checkpoint_policy, BrightnessScorer(), chains, **kwargs)
    b, raw_b = evaluate_chains(exported_policy, BrightnessScorer(), chains, **kwargs)
    torch.testing.assert_close(
        raw_a["model"].scores.instruction_following,
        raw_b["model"].scores.instruction_following,
        atol=1e-5,
        rtol=0,
    )


def test_fit_prints_and_writes_the_before_after_heldout_table(tiny_kontext_path, trained_run):
    root, manifest, config_path, ckpt = trained_run
    folder = root / "trained" / "version_0" / "eval"
    data = json.loads((folder / "before_after.json").read_text())
    table = (folder / "before_after.md").read_text()
    assert "O_k before" in table and "exposure bias" in table
    after_report = json.loads((folder / "report.json").read_text())  # the run-folder contract sweeps read
    assert (
        after_report["conditions"]["model"]["num_chains"]
        == data["after"]["conditions"]["model"]["num_chains"]
    )
    # "before" is the prior: LoRA B starts at 0, so it equals the base model evaluated independently
    base = KontextPolicy(
        str(tiny_kontext_path), dtype="float32", resolution=32, max_sequence_length=32, lora_rank=4
    ).load()
    chains = [ManifestDataset(manifest, 2)[i] for i in range(6)]
    independent, _ = evaluate_chains(
        base,
        BrightnessScorer(),
        chains,
        conditions=["model"],
        model_adapter=None,
        num_steps=2,
        batch_size=32,
        forward_batch_size=4,
        seed=0,
        num_bootstrap=0,
    )
    before = data["before"]["conditions"]["model"]
    for k in range(2):
        assert before["overall"][k]["value"] == pytest.approx(
            independent.conditions["model"].overall[k].value
        )
    assert data["after"]["conditions"]["model"]["mean_if"] != before["mean_if"]


def test_merged_chain_joins_instructions():
    from PIL import Image

    from mtflow.data.records import EditChain

    chain = EditChain("c", Image.new("RGB", (8, 8)), ["make it red.", "add a circle", " remove the star "])
    merged = merged_chain(chain)
    assert merged.instructions == ["make it red. Then add a circle. Then remove the star."]
    assert merged.chain_id == "c" and merged.num_turns == 1


def test_grid_items_get_the_scores_of_their_own_rows():
    from PIL import Image

    from mtflow.eval.evaluate import ConditionScores
    from mtflow.eval.metrics import MULTI_TURN
    from mtflow.reward.base import ScoreBatch, ScoringItem

    def batch(first: float, rows: int) -> tuple[ScoreBatch, list[ScoringItem]]:
        values = torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2) + first
        scores = ScoreBatch(values, values + 100, torch.ones(rows, 2, dtype=torch.bool))
        image = Image.new("RGB", (4, 4))
        items = [
            ScoringItem(f"c{first + r}/g0", f"c{first + r}", image, [image, image], ["a", "b"])
            for r in range(rows)
        ]
        return scores, items

    condition = ConditionScores(kind=MULTI_TURN)
    assert condition.item_scores() is None
    for first, rows in ((0.0, 2), (10.0, 3)):  # 2 + 3 rows, 4 kept: both of batch 1, the first 2 of batch 2
        scores, items = batch(first, rows)
        condition.add([i.chain_id for i in items], scores, items, keep_items=4)
    kept = condition.item_scores()
    assert [i.chain_id for i in condition.items] == ["c0.0", "c1.0", "c10.0", "c11.0"]
    assert kept.instruction_following[:, 0].tolist() == [0.0, 2.0, 10.0, 12.0]  # row r of batch: first + 2 r
    assert kept.content_consistency[:, 1].tolist() == [101.0, 103.0, 111.0, 113.0]


def test_metrics_drop_unscored_chains_in_evaluation(tiny_kontext_path, trained_run):
    root, manifest, config_path, ckpt = trained_run
    chains = [ManifestDataset(manifest, 2)[i] for i in range(4)]
    policy = KontextPolicy(
        str(tiny_kontext_path), dtype="float32", resolution=32, max_sequence_length=32, lora_rank=4
    ).load()
    report, raw = evaluate_chains(
        policy,
        BrightnessScorer(unscorable_suffixes=["chain0001/g0"]),
        chains,
        conditions=["model"],
        num_steps=2,
        batch_size=4,
        num_bootstrap=0,
    )
    metrics = report.conditions["model"]
    assert metrics.num_chains == 4 and metrics.num_dropped_chains == 1 and metrics.num_scored_chains == 3
    scores = raw["model"].scores
    expected = compute_eval_metrics(
        scores.instruction_following, scores.content_consistency, scores.scored, num_bootstrap=0
    )
    assert metrics.overall[1].value == pytest.approx(expected.overall[1].value)


def test_validate_logs_heldout_metrics_of_the_checkpoint(tiny_kontext_path, trained_run):
    root, manifest, config_path, ckpt = trained_run
    cli = main(["validate", "--config", str(config_path), "--ckpt_path", str(ckpt)])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert metrics["val/num_scored_chains"] == 6.0  # padded batches of 4 hold 6 distinct chains
    # same chains and noise as the held-out report written at the end of fit (same weights: the last checkpoint)
    after = json.loads((root / "trained" / "version_0" / "eval" / "before_after.json").read_text())["after"]
    for k in (1, 2):
        expected = after["conditions"]["model"]["overall"][k - 1]["value"]
        assert metrics[f"val/overall_turn{k}"] == pytest.approx(expected, abs=1e-4)
