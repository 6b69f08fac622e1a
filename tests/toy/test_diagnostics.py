"""Exposure-bias diagnostics: hand-computed pass-quality splits, the source-noise hook, and agreement with the
prior's own held-out evaluation on the same chains."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtflow.toy.diagnostics import (
    ExposureBiasSettings,
    diagnose_exposure_bias,
    estimated_displacement,
    format_diagnosis,
    marginal_change_decomposition,
    marginal_change_intervals,
    next_turn_success_by_pass_quality,
    noisy_source_latents,
    output_displacement,
    paired_turn_gap,
    pass_quality,
    success_by_group,
    vae_colour_snap,
    vae_round_trip_drift,
)
from mtflow.toy.prior import HeldOutSettings, evaluate_prior, load_prior_policy, render_uint8, shifted_labels
from mtflow.toy.world import ToyWorld

# six chains, three turns; pass = IF >= 4, near-perfect = IF >= 4.75
IF = np.array(
    [
        [5.0, 5.0, 5.0],
        [4.2, 5.0, 1.0],
        [5.0, 1.0, 5.0],
        [4.5, 4.5, 4.0],
        [1.0, 5.0, 5.0],
        [5.0, 4.8, 1.0],
    ]
)
CC = np.array(
    [
        [5.0, 5.0, 5.0],
        [4.0, 4.5, 3.0],
        [4.6, 2.0, 4.0],
        [3.0, 4.0, 4.0],
        [5.0, 5.0, 5.0],
        [5.0, 5.0, 2.0],
    ]
)


def test_next_turn_success_split_by_pass_quality_by_hand():
    rows = next_turn_success_by_pass_quality(IF, threshold=4.0, perfect_if=4.75)
    # turn 2: alive = chains 0, 1, 2, 3, 5; near-perfect turn 1 = 0, 2, 5 (turn 2 passes: 0, 5); imperfect = 1, 3
    assert rows[0]["turn"] == 2
    assert (rows[0]["num_perfect"], rows[0]["num_imperfect"]) == (3, 2)
    assert rows[0]["after_perfect"] == pytest.approx(200 / 3) and rows[0]["after_imperfect"] == 100.0
    # turn 3: alive = 0, 1, 3, 5; near-perfect turn 2 = 0, 1, 5 (turn 3 passes: 0); imperfect = 3 (passes)
    assert (rows[1]["num_perfect"], rows[1]["num_imperfect"]) == (3, 1)
    assert rows[1]["after_perfect"] == pytest.approx(100 / 3) and rows[1]["after_imperfect"] == 100.0


def test_pass_quality_by_hand():
    rows = pass_quality(IF, CC, threshold=4.0, perfect_if=4.75)
    # turn 1 passes: chains 0, 1, 2, 3, 5 -> near-perfect 0, 2, 5; their CC 5, 4, 4.6, 3, 5 -> median 4.6
    assert rows[0] == {"turn": 1, "num_passed": 5, "perfect_share": 60.0, "median_cc": 4.6}
    # turn 2 passes: 0, 1, 3, 4, 5 (IF 5, 5, 4.5, 5, 4.8) -> near-perfect 4 of 5; CC 5, 4.5, 4, 5, 5 -> median 5
    assert rows[1] == {"turn": 2, "num_passed": 5, "perfect_share": 80.0, "median_cc": 5.0}
    # turn 3 passes: 0, 2, 3, 4 (IF 5, 5, 4, 5); CC 5, 4, 4, 5 -> median 4.5
    assert rows[2] == {"turn": 3, "num_passed": 4, "perfect_share": 75.0, "median_cc": 4.5}


def test_empty_groups_are_nan_and_bad_shapes_raise():
    failed_everywhere = np.ones((3, 2))
    row = next_turn_success_by_pass_quality(failed_everywhere, 4.0, 4.75)[0]
    assert row["num_perfect"] == row["num_imperfect"] == 0
    assert math.isnan(row["after_perfect"]) and math.isnan(row["after_imperfect"])
    assert math.isnan(pass_quality(failed_everywhere, failed_everywhere, 4.0, 4.75)[0]["median_cc"])
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        next_turn_success_by_pass_quality(np.ones(3), 4.0, 4.75)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        pass_quality(np.ones((2, 3)), np.ones((3, 2)), 4.0, 4.75)


@pytest.fixture(scope="module")
def prior():
    return load_prior_policy()


def test_success_by_group_by_hand():
    success = np.array([[1, 0, 1], [0, 0, 1], [1, 1, math.nan], [1, 1, 0]], dtype=float)
    groups = success_by_group(success, [2, 1, 2, 2])
    assert list(groups) == ["1", "2"]
    assert groups["1"] == {"num_chains": 1, "success": [0.0, 0.0, 100.0]}
    assert groups["2"]["num_chains"] == 3
    assert groups["2"]["success"] == pytest.approx([100.0, 200 / 3, 50.0])  # the NaN turn is left out
    with pytest.raises(ValueError, match="group labels"):
        success_by_group(success, [1, 2])


def test_faded_rendering_by_hand():
    world = ToyWorld()
    scene = world.chain(0, "heldout").scenes[0]
    labels = world.spec.render_labels(scene)
    exact, faded = render_uint8(world, [scene])[0], render_uint8(world, [scene], fade=0.25)[0]
    label = int(labels[0, 0])
    colour = world.spec.palette[label].astype(float)
    expected = np.rint(colour + 0.25 * (128 - colour))  # e.g. white 245 -> 245 - 0.25 * 117 = 215.75 -> 216
    assert exact[:, 0, 0].tolist() == colour.tolist()
    assert faded[:, 0, 0].tolist() == expected.tolist()
    assert torch.equal(render_uint8(world, [scene], fade=0.0), render_uint8(world, [scene]))


def test_the_shipped_vae_snaps_drifted_colours_back_onto_the_palette(prior):
    """A property of the shipped VAE docs/toy-world.md relies on: a rendering whose colours drifted 20-30 % toward gray
    comes back from encode + decode far closer to the exact rendering than it went in."""
    rows = vae_colour_snap(prior, ToyWorld(), fades=(0.0, 0.2, 0.3), num_scenes=16)
    assert [r["fade"] for r in rows] == [0.0, 0.2, 0.3]
    assert rows[0]["input_error"] == 0.0 and rows[0]["output_error"] < 5.0
    for row in rows[1:]:
        assert row["input_error"] > 25.0  # the drift is real: off the palette by more than half the tolerance
        assert row["output_error"] < row["input_error"] / 3


def test_vae_round_trip_drift_against_a_direct_diffusers_loop(prior):
    """The repeated hand-off, recomputed with the AutoencoderKL alone (no packing, no scaling, which cancel) and a
    brute-force nearest-colour labelling; then the property docs/toy-world.md relies on: on the shipped VAE the error
    compounds pass after pass but stays far below what the judge's 75 % edit-region test could notice."""
    world = ToyWorld()
    rows = vae_round_trip_drift(prior, world, passes=3, num_scenes=8, colour_tolerance=48.0)
    scenes = [world.chain(i, "heldout").scenes[0] for i in range(8)]
    truth = np.stack([world.spec.render_labels(s) for s in scenes])
    palette = torch.tensor(world.spec.palette, dtype=torch.float64)
    exact = render_uint8(world, scenes)
    images = exact
    vae = prior.vae
    for row, n in zip(rows, (1, 2, 3)):
        with torch.no_grad():
            z = vae.encode(images.float() / 127.5 - 1.0).latent_dist.mode()
            decoded = vae.decode(z).sample
        images = ((decoded / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        rgb = images.permute(0, 2, 3, 1).double()
        distance = (rgb[..., None, :] - palette).norm(dim=-1)  # [N, H, W, P]
        nearest, label = distance.min(dim=-1)
        label[nearest > 48.0] = -1
        expected = 100.0 * (label.numpy() != truth).mean()
        assert row["pass"] == n
        assert row["label_error"] == pytest.approx(expected, abs=0.05)  # a pixel or two may round differently
        assert row["rgb_error"] == pytest.approx(
            float((images.float() - exact.float()).norm(dim=1).mean()), abs=0.5
        )
    errors = [r["label_error"] for r in rows]
    assert 0.0 < errors[0] < errors[2] < 1.0
    assert rows[0]["rgb_error"] < rows[2]["rgb_error"]


def test_noisy_source_latents_adds_seeded_noise_and_restores_the_method(prior):
    world = ToyWorld()
    pixels = prior.images_to_pixels([world.pair(i, "heldout").to_edit_chain().source for i in range(3)])
    clean = prior.encode_reference(pixels)
    with noisy_source_latents(prior, 0.0, torch.Generator().manual_seed(1)):
        assert torch.equal(prior.encode_reference(pixels), clean)
    with noisy_source_latents(prior, 0.5, torch.Generator().manual_seed(1)):
        noisy = prior.encode_reference(pixels)
    expected = clean + 0.5 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(noisy, expected)
    assert "encode_reference" not in vars(prior)  # the class's method again
    assert torch.equal(prior.encode_reference(pixels), clean)


def test_diagnosis_agrees_with_the_prior_evaluation_on_the_same_chains(prior):
    """Through pixels the diagnosis is the prior's own held-out evaluation; through latents turn 1 is the same
    rollout (only the hand-off differs); noise 0 is the plain single-turn evaluation."""
    world = ToyWorld()
    settings = ExposureBiasSettings(
        num_chains=12,
        num_pairs=12,
        source_noise=(0.0, 0.8),
        num_steps=4,
        batch_size=12,
        num_bootstrap=10,
        round_trip_passes=2,
    )
    diagnosis = diagnose_exposure_bias(prior, world, settings)
    recorded = evaluate_prior(
        prior,
        world,
        HeldOutSettings(num_pairs=12, num_chains=12, num_steps=4, batch_size=12, num_bootstrap=10),
    )
    pixels, latents = diagnosis["own_output_through_pixels"], diagnosis["own_output_through_latents"]
    multi = recorded["multi_turn"]
    for key in ("per_turn_success", "cumulative_success", "marginal_success", "consistency"):
        assert pixels[key] == multi[key], key
    assert diagnosis["teacher_forced_success"] == multi["teacher_forced_success"]
    # teacher-forced turn 1 is the chained turn 1 (same source, instruction and noise): a gap of exactly zero
    for mode in ("pixels", "latents"):
        first = diagnosis[f"own_output_through_{mode}"]["paired_with_teacher_forced"][0]
        assert (
            first["num_chains"] == 12
            and first["gap"] == 0.0
            and first["own"] == pixels["per_turn_success"][0]
        )
    assert latents["per_turn_success"][0] == pixels["per_turn_success"][0]
    assert latents["consistency"][0] == pixels["consistency"][0]
    robustness = diagnosis["source_noise_robustness"]
    assert [r["sigma"] for r in robustness] == [0.0, 0.8]
    assert robustness[0]["success"] == recorded["single_turn"]["success"]
    assert robustness[0]["mean_if"] == recorded["single_turn"]["mean_if"]
    assert robustness[0]["consistency"] == recorded["single_turn"]["consistency"]
    # the noise reaches the rollout: a large perturbation changes the edits
    assert (robustness[1]["mean_if"], robustness[1]["consistency"]) != (
        robustness[0]["mean_if"],
        robustness[0]["consistency"],
    )
    assert len(pixels["pass_quality"]) == 3 and len(pixels["next_turn"]) == 2
    # the decomposition explains the reported M_k exactly
    for mode in ("pixels", "latents"):
        condition = diagnosis[f"own_output_through_{mode}"]
        marginal = condition["marginal_success"]
        for part in condition["marginal_change"]:
            k = part["turn"] - 1
            assert part["marginal_change"] == pytest.approx(marginal[k] - marginal[0], abs=1e-9)
            parts = part["turn_difficulty"] + part["survivorship"] + part["exposure"]
            assert parts == pytest.approx(part["marginal_change"], abs=1e-9)
    table = format_diagnosis(diagnosis)
    assert "own output through latents" in table and "sigma 0.8" in table and "survivorship" in table
    assert [r["fade"] for r in diagnosis["vae_colour_snap"]] == [0.1, 0.2, 0.3] and "VAE hand-off" in table
    assert [r["pass"] for r in diagnosis["vae_round_trip_drift"]] == [
        1,
        2,
    ] and "VAE hand-off repeated" in table
    groups = diagnosis["teacher_forced_by_source_shapes"]
    assert sum(g["num_chains"] for g in groups.values()) == 12 and "by shapes in the source" in table


def test_paired_turn_gap_by_hand():
    nan = math.nan
    own = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]], dtype=float)
    forced = np.array([[1, 1, 1], [0, 1, 1], [1, 1, 0], [1, nan, 1]], dtype=float)
    rows = paired_turn_gap(own, forced, num_bootstrap=200, seed=0)
    # turn 1: all 4 chains; own 3/4, forced 3/4, paired differences 0, +1, -1, 0
    assert rows[0]["num_chains"] == 4 and rows[0]["own"] == 75.0 and rows[0]["forced"] == 75.0
    assert rows[0]["gap"] == 0.0 and rows[0]["gap_ci_low"] < 0.0 < rows[0]["gap_ci_high"]
    # turn 2: alive = own turn 1 passed (0, 1, 3), chain 3's forced turn unscored -> chains 0, 1: own 1/2, forced 2/2
    assert rows[1]["num_chains"] == 2 and rows[1]["own"] == 50.0 and rows[1]["forced"] == 100.0
    assert rows[1]["gap"] == -50.0
    # turn 3: alive = own turns 1, 2 passed (0, 3): own 0, 1; forced 1, 1 -> gap -50
    assert rows[2]["num_chains"] == 2 and rows[2]["gap"] == -50.0
    assert -100.0 <= rows[2]["gap_ci_low"] <= -50.0 <= rows[2]["gap_ci_high"] <= 0.0
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        paired_turn_gap(own, forced[:, :2])


def test_marginal_change_decomposition_by_hand():
    own = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]], dtype=float)
    forced = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=float)  # turn 1 = own turn 1
    paired = paired_turn_gap(own, forced, num_bootstrap=0)
    teacher_forced = [75.0, 50.0, 25.0]  # column means of `forced`
    turn2, turn3 = marginal_change_decomposition(paired, teacher_forced)
    # M_1 = 3/4; M_2 = C_2 / C_1 = (2/4) / (3/4); alive at turn 2 = chains 0, 1, 3: forced 0, 1, 1 -> 2/3
    assert turn2["turn"] == 2
    assert turn2["marginal_change"] == pytest.approx(200 / 3 - 75)
    assert turn2["turn_difficulty"] == pytest.approx(50 - 75)
    assert turn2["survivorship"] == pytest.approx(200 / 3 - 50)
    assert turn2["exposure"] == pytest.approx(0.0)
    # M_3 = C_3 / C_2 = (1/4) / (2/4); alive at turn 3 = chains 0, 3: own 0, 1 -> 1/2, forced 0, 0 -> 0
    assert turn3["marginal_change"] == pytest.approx(50 - 75)
    assert turn3["turn_difficulty"] == pytest.approx(25 - 75)
    assert turn3["survivorship"] == pytest.approx(0 - 25)
    assert turn3["exposure"] == pytest.approx(50 - 0)
    with pytest.raises(ValueError, match="teacher-forced"):
        marginal_change_decomposition(paired, teacher_forced[:2])


def test_marginal_change_intervals_resample_chains():
    rng = np.random.default_rng(3)
    own = (rng.random((200, 3)) < 0.6).astype(float)
    forced = own.copy()
    forced[:, 1:] = (rng.random((200, 2)) < 0.6).astype(float)  # turn 1 is the same rollout
    rows = marginal_change_intervals(own, forced, num_bootstrap=300, seed=0)
    teacher_forced = [100 * forced[:, k].mean() for k in range(3)]
    expected = marginal_change_decomposition(paired_turn_gap(own, forced, num_bootstrap=0), teacher_forced)
    for row, point in zip(rows, expected):
        for part in ("marginal_change", "turn_difficulty", "survivorship", "exposure"):
            assert row[part] == pytest.approx(point[part])
            assert row[f"{part}_ci_low"] <= row[part] <= row[f"{part}_ci_high"]
            assert row[f"{part}_ci_low"] < row[f"{part}_ci_high"]
    # no exposure at all: own == forced on every chain -> every resample's exposure is exactly 0
    same = marginal_change_intervals(own, own, num_bootstrap=100, seed=0)
    assert all(r["exposure"] == r["exposure_ci_low"] == r["exposure_ci_high"] == 0.0 for r in same)
    assert math.isnan(marginal_change_intervals(own, forced, num_bootstrap=0)[0]["exposure_ci_low"])


def test_paired_generators_start_where_the_chained_turn_started(prior):
    from mtflow.eval.evaluate import eval_generators, paired_eval_generators

    chain = ToyWorld().chain(0, "heldout").to_edit_chain()
    own = eval_generators([chain], seed=3, device="cpu")[0]
    turn_noise = [prior.initial_noise(1, own) for _ in range(3)]
    for turn in range(3):
        paired = paired_eval_generators(prior, [(chain.chain_id, turn)], seed=3)[0]
        assert torch.equal(prior.initial_noise(1, paired), turn_noise[turn])
    assert not torch.equal(turn_noise[0], turn_noise[1])


def test_the_tool_loads_a_checkpoints_adapter_with_its_rank_alpha_and_targets(tmp_path):
    """tools/diagnose_exposure_bias.py --checkpoint: the policy it builds carries exactly the checkpoint's LoRA."""
    import importlib.util
    from pathlib import Path

    tool = Path(__file__).resolve().parents[2] / "tools" / "diagnose_exposure_bias.py"
    spec = importlib.util.spec_from_file_location("diagnose_exposure_bias", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    targets = ["to_q", "to_v", "ff.net.2"]
    trained = load_prior_policy(lora_rank=4, lora_alpha=2.0, lora_targets=targets)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, param in trained.adapter_named_parameters("default"):
            param.copy_(torch.randn(param.shape, generator=generator))
    state = {
        f"policy.transformer.{k}": v for k, v in trained.transformer.state_dict().items() if "lora_" in k
    }
    info = {"adapters": ["default"], "lora": {"rank": 4, "alpha": 2.0, "targets": targets}}
    torch.save(
        {"mtflow": {**info, "pretrained": "mtflow-assets:toy/prior"}, "state_dict": state},
        tmp_path / "a.ckpt",
    )

    loaded, adapter = module.load_policy("unused", tmp_path / "a.ckpt", "default")
    assert adapter == "default" and loaded.lora_rank == 4 and loaded.lora_alpha == 2.0
    expected = dict(trained.adapter_named_parameters("default"))
    got = dict(loaded.adapter_named_parameters("default"))
    assert expected.keys() == got.keys() and len(got) > 0
    for name, param in got.items():
        assert torch.equal(param, expected[name]), name
    bare, none = module.load_policy("mtflow-assets:toy/prior", None, "default")
    assert none is None and bare.lora_rank == 0
    with pytest.raises(FileNotFoundError):
        module.load_policy("unused", tmp_path / "missing.ckpt", "default")


def test_estimated_displacement_finds_a_hand_made_shift():
    world = ToyWorld()
    spec = world.spec
    chain = world.chain(4, "heldout")
    truth = spec.render_labels(chain.scenes[1])
    fill = spec.label(chain.scenes[1].background)
    assert estimated_displacement(truth, truth, 4) == (0, 0)
    assert estimated_displacement(shifted_labels(truth, 1, fill), truth, 4) == (1, 1)
    assert estimated_displacement(shifted_labels(truth, 3, fill), truth, 4) == (3, 3)
    up_left = np.full_like(truth, fill)
    up_left[:-2, :] = truth[2:, :]  # content moved 2 px up
    assert estimated_displacement(up_left, truth, 4) == (-2, 0)
    assert estimated_displacement(truth, np.full_like(truth, fill), 4) is None  # flat truth: nothing to align


def test_output_displacement_per_turn_of_exact_and_drifting_outputs():
    from PIL import Image

    from mtflow.reward.base import ScoringItem

    world = ToyWorld()
    spec = world.spec
    chains = [world.chain(i, "heldout") for i in range(12)]

    def items(shift_per_turn: int) -> list:
        out = []
        for c in chains:
            images = [
                Image.fromarray(
                    spec.palette[
                        shifted_labels(spec.render_labels(s), shift_per_turn * k, spec.label(s.background))
                    ]
                )
                for k, s in enumerate(c.scenes[1:], start=1)
            ]
            out.append(
                ScoringItem(
                    c.chain_id, c.chain_id, world.render(c.scenes[0]), images, c.instructions, c.metadata()
                )
            )
        return out

    exact = output_displacement(items(0), colour_tolerance=48.0)
    assert [r["turn"] for r in exact] == [1, 2, 3]
    assert all(r["aligned_share"] == 100.0 and r["mean_dy"] == r["mean_dx"] == 0.0 for r in exact)
    drifting = output_displacement(items(1), colour_tolerance=48.0)  # turn k moved k px down and right
    for k, row in enumerate(drifting, start=1):
        assert row["mean_dy"] == row["mean_dx"] == float(k) and row["aligned_share"] == 0.0
        assert row["num_outputs"] == len(chains)  # no flat ground truth among these chains
