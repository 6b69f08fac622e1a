"""The sampler against independent references: diffusers' scheduler, a float64 Gaussian, hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift as diffusers_calculate_shift

from mtflow.sampling import (
    build_timestep_grid,
    calculate_shift,
    euler_step,
    gaussian_log_prob,
    sde_mean_std,
    sde_step,
    stochastic_steps,
    transition_log_prob,
)


def _scheduler():
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)


@pytest.mark.parametrize("num_steps,seq_len", [(1, 64), (4, 64), (12, 1024), (28, 4096)])
def test_grid_matches_the_pipeline_construction(num_steps, seq_len):
    grid = build_timestep_grid(_scheduler(), num_steps, seq_len)
    reference = _scheduler()
    mu = diffusers_calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    assert torch.equal(grid.sigmas, reference.sigmas)
    assert torch.equal(grid.model_timesteps, reference.timesteps / 1000)
    assert grid.sigmas[0] == 1.0 and grid.sigmas[-1] == 0.0
    assert torch.all(grid.sigmas[1:] < grid.sigmas[:-1])
    assert calculate_shift(seq_len, 256, 4096, 0.5, 1.15) == pytest.approx(mu, abs=1e-12)


def test_grid_does_not_mutate_the_scheduler():
    scheduler = _scheduler()
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.5, 3), mu=0.7)
    before = scheduler.sigmas.clone()
    build_timestep_grid(scheduler, 10, 256)
    assert torch.equal(scheduler.sigmas, before)


def test_zero_noise_is_exactly_the_scheduler_euler_step():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 4, generator=gen)
    v = torch.randn(3, 8, 4, generator=gen)
    scheduler = _scheduler()
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=0.6)
    for i in range(4):
        scheduler._step_index = i
        expected = scheduler.step(v, scheduler.timesteps[i], x, return_dict=False)[0]
        s, s_next = scheduler.sigmas[i], scheduler.sigmas[i + 1]
        assert torch.equal(euler_step(x, v, s, s_next), expected)
        step = sde_step(x, v, s, s_next, noise_level=0.0, generator=gen)
        assert torch.equal(step.x_next, expected)
        assert torch.equal(step.log_prob, torch.zeros(3))
        # The SDE mean with a = 0 collapses to the same update.
        mean, std = sde_mean_std(x, v, s, s_next, 0.0)
        assert torch.allclose(mean, expected, atol=0, rtol=0) and float(std) == 0.0


def test_sde_mean_and_std_by_hand():
    # s = 0.5, s' = 0.25, a = 0.5: g = 0.5 * sqrt(0.5 / 0.5) = 0.5, Delta = 0.25.
    x = torch.tensor([[2.0]])
    v = torch.tensor([[1.0]])
    mean, std = sde_mean_std(x, v, 0.5, 0.25, 0.5)
    # mu = 2 - 0.25*1 - 0.25*0.25/(2*0.5) * (2 + 0.5*1) = 1.75 - 0.0625*2.5 = 1.59375
    assert mean.item() == pytest.approx(1.59375, abs=1e-7)
    assert float(std) == pytest.approx(0.5 * math.sqrt(0.25), abs=1e-7)


def test_sde_at_sigma_one_uses_the_next_grid_value():
    x = torch.tensor([[0.3]])
    v = torch.tensor([[-0.2]])
    mean, std = sde_mean_std(x, v, 1.0, 0.8, 0.9)
    g = 0.9 * math.sqrt(1.0 / (1.0 - 0.8))
    assert float(std) == pytest.approx(g * math.sqrt(0.2), rel=1e-6)
    expected = 0.3 - 0.2 * (-0.2) - 0.2 * g**2 / 2.0 * (0.3 + 0.0)
    assert mean.item() == pytest.approx(expected, rel=1e-6)
    assert torch.isfinite(mean).all()


def test_log_prob_equals_float64_gaussian_density():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 16, 8, generator=gen)
    v = torch.randn(4, 16, 8, generator=gen)
    sigma = torch.tensor([0.9, 0.7, 0.5, 0.3])
    sigma_next = torch.tensor([0.8, 0.6, 0.2, 0.0])
    step = sde_step(x, v, sigma, sigma_next, 0.7, generator=gen)
    # Independent float64 computation: per-sample g, Delta and a torch.distributions.Normal.
    x64, v64, xn64 = x.double(), v.double(), step.x_next.double()
    for n in range(4):
        s, sn = float(sigma[n]), float(sigma_next[n])
        delta = s - sn
        g = 0.7 * math.sqrt(s / (1 - s))
        mu = x64[n] - delta * v64[n] - delta * g * g / (2 * s) * (x64[n] + (1 - s) * v64[n])
        density = torch.distributions.Normal(mu, g * math.sqrt(delta)).log_prob(xn64[n]).mean()
        assert step.log_prob[n].item() == pytest.approx(density.item(), abs=1e-5)
        assert torch.allclose(step.mean[n].double(), mu, atol=1e-5)


def test_recorded_transition_recomputes_to_the_same_log_prob_and_is_differentiable():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 3, generator=gen)
    v = torch.randn(2, 5, 3, generator=gen, requires_grad=True)
    step = sde_step(x, v.detach(), 0.6, 0.4, 0.9, generator=gen)
    log_prob, mean, _ = transition_log_prob(x, v, step.x_next, 0.6, 0.4, 0.9)
    assert torch.equal(log_prob, step.log_prob)
    log_prob.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="stochastic"):
        transition_log_prob(x, v, step.x_next, 0.6, 0.4, 0.0)


def test_bf16_storage_keeps_the_log_prob_exact():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 4, generator=gen)
    v = torch.randn(2, 6, 4, generator=gen)
    step = sde_step(x, v, 0.7, 0.5, 0.9, generator=gen, store_dtype=torch.bfloat16)
    stored = step.x_next.to(torch.bfloat16)
    assert torch.equal(stored.float(), step.x_next)
    recomputed, _, _ = transition_log_prob(x, v, stored, 0.7, 0.5, 0.9)
    assert torch.equal(recomputed, step.log_prob)


def test_gaussian_log_prob_at_the_mean():
    mean = torch.zeros(1, 10)
    std = torch.tensor(0.5)
    expected = -math.log(0.5) - 0.5 * math.log(2 * math.pi)
    assert gaussian_log_prob(mean, mean, std).item() == pytest.approx(expected, abs=1e-6)


def test_stochastic_step_selection():
    assert stochastic_steps(5, "all") == [0, 1, 2, 3, 4]
    assert stochastic_steps(5, "none") == []
    starts = set()
    for seed in range(50):
        window = stochastic_steps(6, "window", 2, torch.Generator().manual_seed(seed))
        assert len(window) == 2 and window[1] == window[0] + 1 and 0 <= window[0] <= 4
        starts.add(window[0])
    assert starts == {0, 1, 2, 3, 4}  # every position is reachable
    a = stochastic_steps(12, "window", 3, torch.Generator().manual_seed(7))
    b = stochastic_steps(12, "window", 3, torch.Generator().manual_seed(7))
    assert a == b
    with pytest.raises(ValueError):
        stochastic_steps(3, "window", 4)
    with pytest.raises(ValueError):
        stochastic_steps(3, "bogus")  # type: ignore[arg-type]
