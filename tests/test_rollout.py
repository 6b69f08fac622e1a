"""Multi-turn rollouts: chaining through each trajectory's own pixels, recorded log-probs, shapes and modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mtflow.data.records import EditChain
from mtflow.models.kontext import KontextPolicy
from mtflow.rollout import RolloutConfig, recompute_transition, rollout, transition_batches
from mtflow.sampling import SDEConfig

SDE = SDEConfig(noise_level=0.9, stochastic="all")

RES = 32


@pytest.fixture(scope="module")
def policy(tiny_kontext_path):
    policy = KontextPolicy(
        str(tiny_kontext_path), dtype="float32", resolution=RES, max_sequence_length=32, lora_rank=4
    )
    policy.load()
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():  # non-zero LoRA so that the trained adapter differs from the base
        for p in policy.adapter_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return policy


def _chains(num: int, turns: int = 3) -> list[EditChain]:
    rng = np.random.default_rng(0)
    words = ["make it red", "add a circle", "remove the square", "turn the background blue"]
    return [
        EditChain(
            f"chain{b}",
            Image.fromarray(
                rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            ),  # square: resized to 32 x 32 by the policy (other aspect ratios: tests/test_aspect_buckets.py)
            [words[(b + k) % len(words)] for k in range(turns)],
        )
        for b in range(num)
    ]


def test_shapes_and_layout(policy):
    config = RolloutConfig(group_size=3, num_steps=3, forward_batch_size=4)
    result = rollout(policy, _chains(2), config, generator=torch.Generator().manual_seed(0), sde=SDE)
    n, k, s, length, c = 6, 3, 3, policy.image_seq_len, 16
    assert result.images.shape == (n, k, 3, RES, RES) and result.images.dtype == torch.uint8
    assert result.source_images.shape == (2, 3, RES, RES)
    assert result.states.shape == (n, k, s, length, c) and result.next_states.shape == (n, k, s, length, c)
    assert result.log_probs.shape == (n, k, s) and torch.isfinite(result.log_probs).all()
    assert result.reference_latents.shape == (n, k, length, c) and result.final_latents.shape == (
        n,
        k,
        length,
        c,
    )
    assert result.step_indices.tolist() == [0, 1, 2]
    # consecutive recorded steps chain: x' of step i is x of step i + 1
    assert torch.equal(result.next_states[:, :, :-1], result.states[:, :, 1:])
    assert [result.chain_of(i) for i in range(n)] == [0, 0, 0, 1, 1, 1]
    # trajectories of a group differ (independent noise), groups share their source
    assert not torch.equal(result.images[0, 0], result.images[1, 0])
    assert torch.equal(result.reference_latents[0, 0], result.reference_latents[2, 0])


def test_turn_k_plus_1_edits_its_own_trajectory_output(policy):
    config = RolloutConfig(group_size=2, num_steps=2)
    result = rollout(policy, _chains(2), config, generator=torch.Generator().manual_seed(1), sde=SDE)
    for n in range(result.num_trajectories):
        for k in range(result.num_turns - 1):
            own = policy.encode_reference(policy.uint8_to_pixels(result.images[n : n + 1, k]))
            torch.testing.assert_close(result.reference_latents[n : n + 1, k + 1], own, atol=1e-5, rtol=0)
            other = policy.encode_reference(
                policy.uint8_to_pixels(result.images[(n + 1) % 4 : (n + 1) % 4 + 1, k])
            )
            assert (result.reference_latents[n, k + 1] - other[0]).abs().max() > 1e-3
            source = result.reference_latents[n, 0]
            assert (result.reference_latents[n, k + 1] - source).abs().max() > 1e-3
    # turn 1 is conditioned on the source of the trajectory's own chain
    src = policy.encode_reference(policy.images_to_pixels([c.source for c in result.chains]))
    torch.testing.assert_close(result.reference_latents[:, 0], src.repeat_interleave(2, 0), atol=1e-6, rtol=0)


def test_chaining_through_latents_conditions_on_the_previous_final_latent(policy):
    """chain_through="latents" skips the decode / re-encode: turn k+1's reference is turn k's final latent, bit
    for bit; turn 1 is unchanged; recomputation still gives ratio exactly 1."""
    results = {
        mode: rollout(
            policy,
            _chains(2),
            RolloutConfig(group_size=2, num_steps=2, chain_through=mode),
            generator=torch.Generator().manual_seed(4),
            sde=SDE,
        )
        for mode in ("pixels", "latents")
    }
    latents, pixels = results["latents"], results["pixels"]
    assert torch.equal(latents.reference_latents[:, 1:], latents.final_latents[:, :-1])
    assert torch.equal(latents.images[:, 0], pixels.images[:, 0])
    assert torch.equal(latents.reference_latents[:, 0], pixels.reference_latents[:, 0])
    # through pixels the VAE round trip changes the conditioning, which is what the diagnostic separates
    assert (pixels.reference_latents[:, 1] - pixels.final_latents[:, 0]).abs().max() > 1e-3
    for batch in transition_batches(latents, 4):
        log_prob = recompute_transition(policy, latents, batch)[0]
        ratio = torch.exp(log_prob - latents.log_probs[batch.trajectories, batch.turn, batch.step])
        assert torch.equal(ratio, torch.ones_like(ratio))
    with pytest.raises(ValueError, match="chain_through"):
        rollout(policy, _chains(1), RolloutConfig(group_size=1, num_steps=1, chain_through="latent"))


def test_recomputed_log_probs_give_ratio_exactly_one(policy):
    config = RolloutConfig(group_size=3, num_steps=3, forward_batch_size=4)
    result = rollout(policy, _chains(2), config, generator=torch.Generator().manual_seed(2), sde=SDE)
    batches = transition_batches(result, config.forward_batch_size)
    assert len(batches) == 3 * 3 * 2  # turns x steps x slices of 6 trajectories by 4
    for batch in batches:
        log_prob, _, _, velocity = recompute_transition(policy, result, batch)
        assert velocity.requires_grad
        ratio = torch.exp(log_prob - result.log_probs[batch.trajectories, batch.turn, batch.step])
        assert torch.equal(ratio, torch.ones_like(ratio))


def test_bf16_storage_still_recomputes_exactly(policy):
    config = RolloutConfig(group_size=2, num_steps=2, store_dtype="bfloat16")
    result = rollout(policy, _chains(1, turns=2), config, generator=torch.Generator().manual_seed(3), sde=SDE)
    assert result.states.dtype == torch.bfloat16
    for batch in transition_batches(result, config.forward_batch_size):
        log_prob, *_ = recompute_transition(policy, result, batch)
        assert torch.equal(log_prob, result.log_probs[batch.trajectories, batch.turn, batch.step])


def test_window_and_deterministic_modes(policy):
    config = RolloutConfig(group_size=2, num_steps=4)
    window = SDEConfig(noise_level=0.9, stochastic="window", window_size=2)
    result = rollout(
        policy, _chains(1, turns=2), config, generator=torch.Generator().manual_seed(4), sde=window
    )
    steps = result.step_indices.tolist()
    assert len(steps) == 2 and steps[1] == steps[0] + 1
    assert result.states.shape[2] == 2
    # Two trajectories that share everything up to the window start are identical there: steps before the window
    # are deterministic, so both trajectories start the window from their own noise but with ODE steps only.
    none = RolloutConfig(group_size=2, num_steps=3)  # no SDEConfig: deterministic
    det = rollout(policy, _chains(1, turns=2), none, generator=torch.Generator().manual_seed(5))
    assert det.states.shape[2] == 0 and det.log_probs.shape == (2, 2, 0) and det.noise_level == 0.0
    again = rollout(policy, _chains(1, turns=2), none, generator=torch.Generator().manual_seed(5))
    assert torch.equal(det.images, again.images)


def test_same_seed_same_rollout_and_adapter_matters(policy):
    config = RolloutConfig(group_size=2, num_steps=2)
    a = rollout(policy, _chains(1), config, generator=torch.Generator().manual_seed(6), sde=SDE)
    b = rollout(policy, _chains(1), config, generator=torch.Generator().manual_seed(6), sde=SDE)
    assert torch.equal(a.images, b.images) and torch.equal(a.log_probs, b.log_probs)
    base = rollout(
        policy, _chains(1), config, generator=torch.Generator().manual_seed(6), adapter=None, sde=SDE
    )
    assert not torch.equal(a.final_latents, base.final_latents)


@pytest.mark.parametrize(
    ("knob", "value"),
    [
        ("group_size", 0),
        ("num_steps", 0),
        ("forward_batch_size", 0),
        ("store_dtype", "float16"),
        ("kernels", "cuda"),
        ("chain_through", "latent"),
    ],
)
def test_rollout_config_refuses_a_bad_knob_when_built(knob, value):
    with pytest.raises(ValueError, match=f"RolloutConfig.{knob}"):
        RolloutConfig(**{knob: value})


@pytest.mark.parametrize(
    ("knob", "value"),
    [
        ("window_size", 0),
        ("noise_level", 0.0),
        ("noise_level", -0.5),
        ("noise_level", float("nan")),
        ("stochastic", "none"),
    ],
)
def test_sde_config_refuses_a_bad_knob_when_built(knob, value):
    with pytest.raises(ValueError, match=f"SDEConfig.{knob}"):
        SDEConfig(**{knob: value})


def test_rollout_checks_the_sde_window_against_the_steps(policy):
    with pytest.raises(ValueError, match=r"SDE window \(5 steps\) exceeds a turn's num_steps \(4\)"):
        RolloutConfig(num_steps=4).check_sde(SDEConfig(stochastic="window", window_size=5))
    with pytest.raises(ValueError, match="exceeds"):  # the rollout itself refuses it too
        rollout(
            policy,
            _chains(1),
            RolloutConfig(group_size=1, num_steps=4),
            sde=SDEConfig(stochastic="window", window_size=5),
        )
    RolloutConfig(num_steps=4).check_sde(
        SDEConfig(stochastic="window", window_size=4)
    )  # the whole turn is a window
    RolloutConfig(num_steps=4).check_sde(
        SDEConfig(stochastic="all", window_size=5)
    )  # unused outside window mode


def test_bad_batches_are_refused(policy):
    with pytest.raises(ValueError, match="same number of turns"):
        rollout(policy, _chains(1, turns=2) + _chains(1, turns=3), RolloutConfig(group_size=1, num_steps=1))
    with pytest.raises(ValueError, match="at least one chain"):
        rollout(policy, [], RolloutConfig())


def test_a_deterministic_last_step_is_an_euler_step_and_is_not_recorded(policy):
    """SDEConfig(deterministic_last_step=True): steps 0 .. T-2 are SDE steps (recorded, ratio exactly 1 on
    recomputation), the last one is the Euler step x + (sigma_T - sigma_{T-1}) v, so the next turn edits a
    noise-free image; a window is drawn among the first T - 1 steps."""
    config = RolloutConfig(group_size=2, num_steps=3, forward_batch_size=4)
    sde = SDEConfig(noise_level=0.9, deterministic_last_step=True)
    result = rollout(policy, _chains(1, turns=2), config, generator=torch.Generator().manual_seed(7), sde=sde)
    assert result.step_indices.tolist() == [0, 1] and result.log_probs.shape == (2, 2, 2)
    for k in range(2):
        before_last = result.next_states[
            :, k, -1
        ].float()  # x after the last recorded step = x before step T-1
        velocity = policy.velocity(
            before_last,
            result.model_timesteps[2],
            result.reference_latents[:, k],
            result.text,
            result.text_index[:, k],
        )
        euler = before_last + (result.sigmas[3] - result.sigmas[2]) * velocity
        torch.testing.assert_close(result.final_latents[:, k], euler, atol=1e-6, rtol=0)
    for batch in transition_batches(result, config.forward_batch_size):
        log_prob = recompute_transition(policy, result, batch)[0]
        assert torch.equal(log_prob, result.log_probs[batch.trajectories, batch.turn, batch.step])
    stochastic = rollout(
        policy, _chains(1, turns=2), config, generator=torch.Generator().manual_seed(7), sde=SDE
    )
    assert stochastic.step_indices.tolist() == [0, 1, 2]
    assert not torch.equal(
        stochastic.final_latents, result.final_latents
    )  # the last SDE step added noise there
    for seed in range(20):  # windows of 2 among the first 3 of 4 steps: start 0 or 1, never the last step
        window = SDEConfig(stochastic="window", window_size=2, deterministic_last_step=True)
        steps = window.recorded_steps(4, torch.Generator().manual_seed(seed))
        assert steps in ([0, 1], [1, 2])
    with pytest.raises(ValueError, match="no SDE step to train on"):
        RolloutConfig(num_steps=1).check_sde(SDEConfig(deterministic_last_step=True))
    with pytest.raises(ValueError, match="minus its deterministic last step"):
        RolloutConfig(num_steps=3).check_sde(
            SDEConfig(stochastic="window", window_size=3, deterministic_last_step=True)
        )
