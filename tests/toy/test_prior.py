"""The toy editor prior: flow-matching math, latent cache, save / load, a short training run, and the shipped prior
(loads as the real classes, reproduces its recorded held-out numbers, shows exposure bias)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mtflow.models.kontext import KontextPolicy
from mtflow.testing.fixtures import torch_threads
from mtflow.toy.prior import (
    PRIOR_ASSET,
    SHIPPED_PRIOR,
    SHIPPED_VAE,
    HeldOutSettings,
    PriorTrainConfig,
    SceneLatentCache,
    ToyPriorSpec,
    build_toy_prior_components,
    evaluate_prior,
    flow_matching_loss,
    json_ready,
    load_prior_policy,
    logit_normal_sigmas,
    noised,
    pair_samples,
    prior_world,
    render_uint8,
    save_toy_prior,
    shifted_labels,
    train_prior,
    warmup_cosine,
)
from mtflow.toy.world import ToyWorld

TINY = ToyPriorSpec(
    num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6)
)


@pytest.fixture(scope="module")
def world():
    return ToyWorld()


@pytest.fixture(scope="module")
def tiny_prior_path(tmp_path_factory, world):
    path = tmp_path_factory.mktemp("prior") / "tiny-prior"
    return save_toy_prior(build_toy_prior_components(world, TINY, seed=0), path)


@pytest.fixture(scope="module")
def recorded():
    return json.loads((SHIPPED_PRIOR / "heldout.json").read_text())


# ---------------------------------------------------------------------------------------------- math
def test_flow_matching_loss_matches_a_float64_reference():
    gen = torch.Generator().manual_seed(0)
    v, x0, eps = (torch.randn(3, 5, 4, generator=gen) for _ in range(3))
    loss, stats = flow_matching_loss(v, x0, eps)
    reference = ((v.double() - (eps.double() - x0.double())) ** 2).mean(dim=(1, 2))
    assert torch.allclose(stats["loss/flow_per_sample"].double(), reference, atol=1e-6)
    assert loss.item() == pytest.approx(reference.mean().item(), abs=1e-6)
    # the exact velocity has zero loss
    assert flow_matching_loss(eps - x0, x0, eps)[0].item() == 0.0


def test_noised_interpolates_between_data_and_noise():
    x0, eps = torch.full((3, 2, 2), 2.0), torch.full((3, 2, 2), -1.0)
    x = noised(x0, eps, torch.tensor([0.0, 0.25, 1.0]))
    assert torch.equal(x[0], x0[0]) and torch.equal(x[2], eps[2])
    assert torch.allclose(x[1], torch.full((2, 2), 0.75 * 2.0 - 0.25))


def test_logit_normal_sigmas_are_sigmoids_of_seeded_normals():
    sigma = logit_normal_sigmas(1000, 0.5, 2.0, torch.Generator().manual_seed(3))
    normals = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(sigma, torch.sigmoid(0.5 + 2.0 * normals))
    assert 0 < float(sigma.min()) and float(sigma.max()) < 1
    assert float(torch.logit(sigma).mean()) == pytest.approx(0.5, abs=0.15)


def test_warmup_cosine_schedule_by_hand():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)  # half way through the decay
    assert warmup_cosine(100, 100, 10, final_fraction=0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 100, 10) == pytest.approx(0.0)


def test_json_ready_writes_nan_as_null():
    data = json_ready({"a": [1.0, math.nan], "b": {"c": math.inf}, "d": "x"})
    assert data == {"a": [1.0, None], "b": {"c": None}, "d": "x"}


# ---------------------------------------------------------------------------------------------- building, data
def test_built_prior_uses_the_shipped_vae_and_a_tokenizer_of_the_world(tiny_prior_path, world):
    policy = load_prior_policy(tiny_prior_path)
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    assert isinstance(policy.transformer, FluxTransformer2DModel)
    assert isinstance(policy.vae, AutoencoderKL)
    shipped = AutoencoderKL.from_pretrained(SHIPPED_VAE)
    for (name, a), (_, b) in zip(policy.vae.state_dict().items(), shipped.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert policy.vae.config.scaling_factor == shipped.config.scaling_factor
    t5 = policy._pipeline.tokenizer_2
    for word in world.vocabulary():  # one piece per word (+ </s>), so no word is spelled out in characters
        assert len(t5(word).input_ids) == 2, word


def test_latent_cache_matches_the_policy_path_and_encodes_each_scene_once(tiny_prior_path, world):
    policy = load_prior_policy(tiny_prior_path)
    cache = SceneLatentCache(policy, world)
    samples = pair_samples(world, 0, 6)
    scenes = [s.scenes[0] for s in samples] + [s.scenes[0] for s in samples[:3]]
    latents = cache.latents(scenes)
    reference = policy.encode_reference(policy.images_to_pixels([world.render(s) for s in scenes]))
    assert latents.shape == (9, policy.image_seq_len, 4 * policy.latent_channels)
    assert torch.allclose(latents, reference, atol=1e-4)  # conv kernels differ slightly with the batch size
    assert cache.encoded == len({s.key() for s in scenes}) == len(cache)
    cache.latents(scenes[:2])
    assert cache.encoded == len(cache)  # nothing re-encoded


def test_shifted_labels_by_hand():
    labels = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    assert shifted_labels(labels, 1, fill=0).tolist() == [[0, 0, 0], [0, 1, 2], [0, 4, 5]]
    assert shifted_labels(labels, 0, fill=0) is labels


def test_misaligned_targets_reach_the_cache_and_the_training_loss(tiny_prior_path, world):
    """``target_shift`` (the drift experiment): targets are the scenes moved one pixel, sources are not."""
    policy = load_prior_policy(tiny_prior_path)
    scenes = [s.scenes[1] for s in pair_samples(world, 0, 4)]
    moved = render_uint8(world, scenes, shift=1)
    assert torch.equal(moved[:, :, 1:, 1:], render_uint8(world, scenes)[:, :, :-1, :-1])
    cache = SceneLatentCache(policy, world)
    latents = cache.latents(scenes, shift=1)
    assert torch.allclose(latents, policy.encode_reference(policy.uint8_to_pixels(moved)), atol=1e-4)
    assert not torch.allclose(latents, cache.latents(scenes), atol=1e-2)

    def first_loss(shift: int) -> float:
        torch.manual_seed(0)  # the text encoders train with dropout, drawn from the global generator
        fresh = load_prior_policy(tiny_prior_path)
        config = PriorTrainConfig(steps=1, batch_size=4, warmup=1, target_shift=shift)
        return train_prior(fresh, world, config, log=None).first_loss

    aligned = first_loss(0)
    assert first_loss(0) == aligned  # same seed, same batch: the loss is reproducible
    assert first_loss(1) != aligned  # so a different first loss means the targets moved


def test_bfloat16_storage_loads_back_as_float32(tmp_path, world):
    components = build_toy_prior_components(world, TINY, seed=1)
    original = {k: v.clone() for k, v in components["transformer"].state_dict().items()}
    save_toy_prior(components, tmp_path / "bf16", transformer_dtype="bfloat16")
    assert components["transformer"].dtype == torch.float32  # the caller's model is left in float32
    policy = KontextPolicy(str(tmp_path / "bf16"), dtype="float32", resolution=32, lora_rank=0).load()
    assert policy.transformer.dtype == torch.float32
    for name, value in policy.transformer.state_dict().items():
        assert torch.equal(value, original[name].to(torch.bfloat16).float()), name


def test_training_lowers_the_held_out_flow_matching_loss(tiny_prior_path, world):
    torch.manual_seed(0)
    policy = load_prior_policy(tiny_prior_path)
    cache = SceneLatentCache(policy, world)
    held_out = pair_samples(world, 0, 32, split="heldout")
    reference = cache.latents([s.scenes[0] for s in held_out])
    x0 = cache.latents([s.scenes[1] for s in held_out])
    gen = torch.Generator().manual_seed(7)
    eps, sigma = torch.randn(x0.shape, generator=gen), torch.rand(32, generator=gen) * 0.8 + 0.1
    instructions = [s.instructions[0] for s in held_out]

    def held_out_loss() -> float:
        with torch.no_grad():
            text = policy.encode_text(instructions)
            v = policy.velocity(noised(x0, eps, sigma), sigma, reference, text, text.index_of(instructions))
            return flow_matching_loss(v, x0, eps)[0].item()

    before = held_out_loss()
    policy.clear_text_cache()
    stats = train_prior(policy, world, PriorTrainConfig(steps=40, batch_size=16, lr=3e-3, warmup=5), log=None)
    policy.clear_text_cache()
    after = held_out_loss()
    assert stats.steps == 40 and len(stats.losses) == 40
    assert after < 0.7 * before, (before, after)
    # training leaves the model frozen again, ready for LoRA RL
    assert not any(p.requires_grad for p in policy.transformer.parameters())
    assert not any(p.requires_grad for p in policy.text_encoder_2.parameters())


# ---------------------------------------------------------------------------------------------- the shipped prior
def test_shipped_prior_loads_through_the_package_asset_name(world, recorded):
    from diffusers import FluxTransformer2DModel

    policy = KontextPolicy(PRIOR_ASSET, dtype="float32", resolution=32, max_sequence_length=12, lora_rank=4)
    policy.load()
    assert isinstance(policy.transformer, FluxTransformer2DModel)
    assert policy.transformer.dtype == torch.float32
    assert policy.transformer.config.guidance_embeds
    assert policy.image_seq_len == 64
    stats = json.loads((SHIPPED_PRIOR / "training_stats.json").read_text())
    assert recorded["world"] == stats["world"]
    assert stats["world"]["edit_types"] == list(world.edit_types)


def _subset_settings(recorded) -> HeldOutSettings:
    return HeldOutSettings(**recorded["test_subset"]["settings"])


# Success is a count of turns over a threshold: it reproduces exactly. The continuous metrics (mean IF, CC, O) may
# move by a pixel's worth when another CPU or library release rounds one decoded pixel across a palette boundary
# (seen: CC_2 83.220 -> 83.239 on a new machine); a wrong or corrupted prior moves them by whole points.
_CONTINUOUS = {"mean_if": 0.02, "consistency": 0.25, "overall": 0.25}


@pytest.mark.parametrize("name", ["prior", "prior_drift"])
def test_shipped_prior_reproduces_its_recorded_held_out_numbers(name):
    """Deterministic rollouts + exact judge: the same successes exactly and the same continuous judge metrics to
    within a pixel's worth (a recorded small subset, on the prior's own world; the thread count it was recorded
    with is restored, since CPU matmuls may block differently per thread count)."""
    recorded = json.loads((SHIPPED_PRIOR.parent / name / "heldout.json").read_text())
    assert recorded["pretrained"] == f"mtflow-assets:toy/{name}"
    subset = recorded["test_subset"]
    with torch_threads(subset["torch_threads"]):
        policy = load_prior_policy(
            recorded["pretrained"], max_sequence_length=recorded["max_sequence_length"]
        )
        world = prior_world(recorded["pretrained"])
        assert world.position_jitter == recorded["world"].get("position_jitter", 0)
        result = evaluate_prior(policy, world, _subset_settings(recorded))
    for section, keys in (
        ("single_turn", ("success", "mean_if", "consistency", "success_by_type", "count_by_type")),
        (
            "multi_turn",
            (
                "per_turn_success",
                "cumulative_success",
                "consistency",
                "overall",
                "marginal_success",
                "teacher_forced_success",
            ),
        ),
    ):
        for key in keys:
            got, want = json_ready(result[section][key]), subset[section][key]
            if key in _CONTINUOUS:
                assert got == pytest.approx(want, abs=_CONTINUOUS[key]), (section, key)
            else:
                assert got == want, (section, key)


def test_shipped_prior_drifts_on_its_own_outputs(recorded):
    """On its own outputs the prior's consistency with the source drifts down turn after turn (recorded full
    evaluation, 200 chains; the subset test above ties the record to the weights).

    Marginal success M_k does *not* fall for this prior (57.5 / 59.1 / 57.4 %, exposure bias 0.1 points, 95 % CI
    about -13 to +14 at 200 chains), and teacher forcing with the same noise does no better (57.5 / 59.5 / 60.0 %):
    the turns that pass are nearly all pixel-exact, so they hand the next turn an input as easy as the ground
    truth, and the chains that survive are easier ones; ``tools/diagnose_exposure_bias.py`` measures why (docs/toy-world.md,
    "Exposure bias"). What carries over is damage outside the edit regions, which CC_k measures."""
    multi = recorded["multi_turn"]
    assert multi["num_chains"] >= 200 and recorded["single_turn"]["num_pairs"] >= 600
    consistency = multi["consistency"]
    assert consistency[0] - consistency[1] >= 3.0 and consistency[1] - consistency[2] >= 3.0, consistency
    cumulative = multi["cumulative_success"]
    assert cumulative[0] > cumulative[1] > cumulative[2]
    marginal = multi["marginal_success"]
    assert np.isclose(multi["exposure_bias"], marginal[0] - marginal[2])
    # teacher-forced turn 1 is chained turn 1 (same source, instruction and noise)
    assert multi["teacher_forced_success"][0] == multi["per_turn_success"][0]
    # the editor is decent on clean sources: every edit type succeeds sometimes, background changes always
    by_type = recorded["single_turn"]["success_by_type"]
    assert recorded["single_turn"]["success"] >= 50.0 and min(by_type.values()) >= 20.0


def test_prior_world_rebuilds_the_world_a_prior_was_trained_on(tmp_path):
    shipped = prior_world()
    assert (shipped.min_shapes, shipped.max_shapes, shipped.position_jitter) == (1, 3, 0)
    assert (
        prior_world(PRIOR_ASSET).chain(3, "heldout").instructions
        == ToyWorld().chain(3, "heldout").instructions
    )
    (tmp_path / "training_stats.json").write_text(
        json.dumps({"world": {"position_jitter": 2, "num_turns": 4}})
    )
    world = prior_world(tmp_path, num_turns=2)  # the record, with the caller's overrides on top
    assert (world.position_jitter, world.num_turns) == (2, 2)
    assert prior_world(tmp_path / "missing").position_jitter == 0  # a foreign editor: the default world


def test_drift_prior_shows_exposure_bias_on_its_own_outputs():
    """The drift prior (jittered world, trained on pairs misaligned by one pixel: each turn moves the picture) fails
    more on its own outputs than on ground-truth inputs: marginal success M_k falls turn after turn while
    teacher-forced success (same chains, same noise, ground-truth input) stays near turn 1's (recorded full
    evaluation, 200 chains; the subset test ties the record to the weights; docs/toy-world.md, exposure bias)."""
    recorded = json.loads((SHIPPED_PRIOR.parent / "prior_drift" / "heldout.json").read_text())
    multi = recorded["multi_turn"]
    assert multi["num_chains"] >= 200 and recorded["world"]["position_jitter"] == 2
    marginal, forced = multi["marginal_success"], multi["teacher_forced_success"]
    assert marginal[0] > marginal[1] > marginal[2] and multi["exposure_bias"] >= 5.0, marginal
    assert np.isclose(multi["exposure_bias"], marginal[0] - marginal[2])
    # own output loses more from turn 1 to turn 3 than a ground-truth input does
    assert forced[0] - forced[2] < marginal[0] - marginal[2]
    stats = json.loads((SHIPPED_PRIOR.parent / "prior_drift" / "training_stats.json").read_text())
    assert stats["args"]["target_shift"] == 1 and stats["world"] == recorded["world"]
    assert recorded["single_turn"]["success"] >= 50.0  # it edits clean sources decently
