"""GRPO and NFT losses: gradients against closed forms, clipping, KL, masking, toy problems, averaging rules."""

from __future__ import annotations

import math

import pytest
import torch

from mtflow.advantage import AdvantageConfig, compute_advantages
from mtflow.losses import (
    GRPOConfig,
    NFTConfig,
    ema_update_,
    gaussian_mean_kl,
    grpo_loss,
    nft_loss,
    old_adapter_decay,
    soft_update_,
)

# --------------------------------------------------------------------------------------------------- GRPO


def test_grpo_gradient_at_ratio_one_is_minus_advantage_over_count():
    old = torch.tensor([-1.3, 0.2, 4.0, -0.7])
    advantages = torch.tensor([1.5, -0.5, 0.0, 2.0])
    log_prob = old.clone().requires_grad_()
    loss, stats = grpo_loss(log_prob, old, advantages, GRPOConfig())
    loss.backward()
    torch.testing.assert_close(log_prob.grad, -advantages / 4)
    assert float(loss.detach()) == pytest.approx(-float(advantages.mean()))
    assert float(stats["policy/ratio_mean"]) == 1.0
    assert float(stats["policy/clip_frac"]) == 0.0
    assert float(stats["policy/approx_kl"]) == 0.0


def test_grpo_weights_average_over_included_samples():
    old = torch.zeros(4)
    advantages = torch.tensor([1.0, -2.0, 3.0, 4.0])
    weight = torch.tensor([1.0, 1.0, 0.0, 2.0])
    log_prob = old.clone().requires_grad_()
    loss, _ = grpo_loss(log_prob, old, advantages, GRPOConfig(), weight=weight)
    loss.backward()
    torch.testing.assert_close(log_prob.grad, -advantages * weight / 4.0)
    assert float(loss.detach()) == pytest.approx(-(1.0 - 2.0 + 8.0) / 4.0)


def test_grpo_clipping_stops_gradient_only_in_the_pushed_direction():
    eps = 0.1
    # ratios e^0.3 > 1 + eps and e^-0.3 < 1 - eps, each with both advantage signs.
    log_ratio = torch.tensor([0.3, 0.3, -0.3, -0.3, 0.05])
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    old = torch.tensor([0.5, -0.2, 1.0, 0.0, 0.3])
    log_prob = (old + log_ratio).requires_grad_()
    loss, stats = grpo_loss(log_prob, old, advantages, GRPOConfig(clip_eps=eps))
    loss.backward()
    rho = log_ratio.exp()
    # d/dlogp of -rho*A/M is -A*rho/M where the unclipped branch is the minimum; 0 where the clip is active.
    expected = torch.tensor([0.0, rho[1] / 5, -rho[2] / 5, 0.0, -rho[4] / 5])
    torch.testing.assert_close(log_prob.grad, expected)
    clipped = torch.clamp(rho, 1 - eps, 1 + eps)
    objective = torch.minimum(rho * advantages, clipped * advantages)
    assert float(loss.detach()) == pytest.approx(-float(objective.mean()), rel=1e-6)
    assert float(stats["policy/clip_frac"]) == pytest.approx(4 / 5)
    assert float(stats["policy/clip_frac_active"]) == pytest.approx(2 / 5)
    k3 = (rho - 1 - log_ratio).mean()
    assert float(stats["policy/approx_kl"]) == pytest.approx(float(k3), rel=1e-5)
    assert float(stats["policy/ratio_mean"]) == pytest.approx(float(rho.mean()), rel=1e-6)


def test_gaussian_mean_kl_matches_float64_gaussian_kl():
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 5, 4, generator=gen)
    ref = torch.randn(3, 5, 4, generator=gen)
    std = torch.tensor([0.3, 1.2, 0.05])
    assert torch.equal(gaussian_mean_kl(mean, mean.clone(), std), torch.zeros(3))
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean.double(), std.double()[:, None, None]),
        torch.distributions.Normal(ref.double(), std.double()[:, None, None]),
    ).mean(dim=(1, 2))
    torch.testing.assert_close(gaussian_mean_kl(mean, ref, std), reference.float())
    # The std the sampler returns ([N, 1, 1]) and a python scalar are accepted too.
    torch.testing.assert_close(gaussian_mean_kl(mean, ref, std[:, None, None]), reference.float())
    scalar = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean.double(), 0.5), torch.distributions.Normal(ref.double(), 0.5)
    ).mean(dim=(1, 2))
    torch.testing.assert_close(gaussian_mean_kl(mean, ref, 0.5), scalar.float())


def test_grpo_kl_term_is_added_with_beta_and_differentiates_the_mean():
    gen = torch.Generator().manual_seed(1)
    mean = torch.randn(2, 6, generator=gen).requires_grad_()
    ref = torch.randn(2, 6, generator=gen)
    std = torch.tensor([0.5, 2.0])
    zeros = torch.zeros(2)
    loss, stats = grpo_loss(zeros, zeros, zeros, GRPOConfig(beta_kl=0.04), mean=mean, ref_mean=ref, std=std)
    expected_kl = ((mean.detach() - ref) ** 2 / (2 * std[:, None] ** 2)).mean(dim=1).mean()
    assert float(loss.detach()) == pytest.approx(0.04 * float(expected_kl), rel=1e-6)
    assert float(stats["loss/kl"]) == pytest.approx(float(expected_kl), rel=1e-6)
    loss.backward()
    torch.testing.assert_close(mean.grad, 0.04 * (mean.detach() - ref) / std[:, None] ** 2 / 6 / 2)
    # beta_kl = 0: the KL is logged but not in the loss.
    logged, stats0 = grpo_loss(zeros, zeros, zeros, GRPOConfig(), mean=mean, ref_mean=ref, std=std)
    assert float(logged.detach()) == 0.0 and float(stats0["loss/kl"]) == pytest.approx(
        float(expected_kl), rel=1e-6
    )
    with pytest.raises(ValueError, match="beta_kl > 0 needs mean"):
        grpo_loss(zeros, zeros, zeros, GRPOConfig(beta_kl=0.1))


def test_grpo_excluded_samples_contribute_nothing_even_when_garbage():
    log_prob = torch.tensor([0.0, math.nan, 500.0, 0.1]).requires_grad_()
    old = torch.tensor([0.0, 0.0, -500.0, 0.1])
    advantages = torch.tensor([1.0, math.nan, 3.0, -1.0])
    weight = torch.tensor([1.0, 0.0, 0.0, 1.0])
    loss, stats = grpo_loss(log_prob, old, advantages, GRPOConfig(), weight=weight)
    loss.backward()
    assert torch.isfinite(loss) and float(loss.detach()) == pytest.approx(0.0)  # -(1 - 1) / 2
    torch.testing.assert_close(log_prob.grad, torch.tensor([-0.5, 0.0, 0.0, 0.5]))
    assert math.isnan(float(stats.pop("loss/kl")))  # no means given: nothing to log
    assert all(torch.isfinite(v) for v in stats.values())
    # The KL path too: garbage means and a zero std in excluded rows leave the gradient finite and exact.
    mean = torch.tensor([[1.0, 2.0], [math.nan, math.inf], [3.0, 3.0], [0.0, 1.0]], requires_grad=True)
    ref = torch.tensor([[0.0, 2.0], [0.0, 0.0], [math.nan, 1.0], [0.0, 0.0]])
    std = torch.tensor([1.0, 0.0, 0.0, 0.5])
    zeros = torch.zeros(4)
    loss, stats = grpo_loss(zeros, zeros, zeros, GRPOConfig(beta_kl=1.0), weight, mean, ref, std)
    loss.backward()
    kl0, kl3 = (1.0 / 2) / 2, (1.0 / 0.5) / 2  # mean over 2 elements of diff^2 / (2 std^2)
    assert float(stats["loss/kl"]) == pytest.approx((kl0 + kl3) / 2)
    expected = torch.tensor([[0.5 / 2, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1.0 / 0.25 / 2 / 2]])
    torch.testing.assert_close(mean.grad, expected)


def test_grpo_all_excluded_is_a_connected_zero():
    log_prob = torch.randn(3).requires_grad_()
    loss, stats = grpo_loss(log_prob, torch.zeros(3), torch.ones(3), GRPOConfig(), weight=torch.zeros(3))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(log_prob.grad, torch.zeros(3))
    assert math.isnan(float(stats["policy/ratio_mean"]))


def test_grpo_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="advantages must be"):
        grpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(2), GRPOConfig())
    with pytest.raises(ValueError, match="weight must be"):
        grpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), GRPOConfig(), weight=torch.ones(4))
    with pytest.raises(ValueError, match=">= 0"):
        grpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), GRPOConfig(), weight=-torch.ones(3))


# ---------------------------------------------------------------------------------------------------- NFT


def nft_case(num=4, shape=(3, 5), seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(num, *shape, generator=gen, dtype=dtype)
    noise = torch.randn(num, *shape, generator=gen, dtype=dtype)
    sigma = torch.rand(num, generator=gen, dtype=dtype) * 0.8 + 0.1
    s = sigma.reshape(-1, *([1] * len(shape)))
    x_t = (1 - s) * x0 + s * noise
    v_old = noise - x0 + 0.3 * torch.randn(num, *shape, generator=gen, dtype=dtype)
    v_ref = v_old + 0.2 * torch.randn(num, *shape, generator=gen, dtype=dtype)
    return x0, x_t, sigma, v_old, v_ref


@pytest.mark.parametrize(("beta", "a_max", "beta_ref"), [(1.0, 5.0, 0.0), (0.1, 5.0, 1e-4), (0.5, 1.0, 0.3)])
def test_nft_on_policy_gradient_matches_closed_form(beta, a_max, beta_ref):
    x0, x_t, sigma, v_old, v_ref = nft_case()
    advantages = torch.tensor([2.0, -0.7, 7.0, -9.0], dtype=torch.float64)  # the last two exceed a_max
    weight = torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64)
    v_theta = v_old.clone().requires_grad_()
    config = NFTConfig(beta=beta, a_max=a_max, beta_ref=beta_ref)
    loss, _ = nft_loss(v_theta, v_old, x_t, x0, sigma, advantages, config, v_ref=v_ref, weight=weight)
    loss.backward()

    # Closed form (derived in nft_loss's docstring), in float64.
    s = sigma[:, None, None]
    error = x_t - s * v_old - x0
    num_elements = error[0].numel()
    norm = error.abs().flatten(1).mean(1).clamp(min=1e-5)[:, None, None]
    w = (weight / weight.sum())[:, None, None]
    a_clip = advantages.clamp(-a_max, a_max)[:, None, None]
    expected = -w * 2 * s * a_clip * error / (num_elements * norm)
    expected = expected + beta_ref * w * 2 * (v_old - v_ref) / num_elements
    torch.testing.assert_close(v_theta.grad.double(), expected, rtol=1e-4, atol=1e-7)


def test_nft_zero_advantage_gives_no_policy_gradient_on_policy():
    x0, x_t, sigma, v_old, _ = nft_case(seed=3)
    v_theta = v_old.clone().requires_grad_()
    loss, stats = nft_loss(v_theta, v_old, x_t, x0, sigma, torch.zeros(4), NFTConfig(beta_ref=0.0))
    loss.backward()
    assert float(stats["policy/r_mean"]) == 0.5
    assert float(v_theta.grad.abs().max()) < 1e-6 * float(loss.detach())


def test_nft_adaptive_weights_carry_no_gradient():
    # Off-policy, so the positive and negative errors differ; the gradient must treat both normalisers as
    # constants. A version that differentiates through them is computed too, to show the check is sensitive.
    x0, x_t, sigma, v_old, _ = nft_case(seed=5)
    v_theta = v_old + 0.4 * torch.randn(
        v_old.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64
    )
    advantages = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    beta, a_max = 0.7, 5.0
    v = v_theta.clone().requires_grad_()
    loss, _ = nft_loss(v, v_old, x_t, x0, sigma, advantages, NFTConfig(beta=beta, a_max=a_max, beta_ref=0.0))
    loss.backward()

    s = sigma[:, None, None]
    r = (0.5 + advantages / (2 * a_max))[:, None, None]
    num, num_elements = v_theta.shape[0], v_theta[0].numel()
    e_pos = x_t - s * (beta * v_theta + (1 - beta) * v_old) - x0
    e_neg = x_t - s * ((1 + beta) * v_old - beta * v_theta) - x0
    n_pos = e_pos.abs().flatten(1).mean(1)[:, None, None]
    n_neg = e_neg.abs().flatten(1).mean(1)[:, None, None]
    # d/dv of (x_t - s v+ - x0)^2 = 2 e+ * (-s beta); of (x_t - s v- - x0)^2 = 2 e- * (s beta).
    grad_pos = 2 * e_pos * (-s * beta) / (num_elements * n_pos)
    grad_neg = 2 * e_neg * (s * beta) / (num_elements * n_neg)
    expected = a_max / beta * (r * grad_pos + (1 - r) * grad_neg) / num
    torch.testing.assert_close(v.grad.double(), expected, rtol=1e-4, atol=1e-8)

    leaky = v_theta.clone().requires_grad_()
    e_p = x_t - s * (beta * leaky + (1 - beta) * v_old) - x0
    e_n = x_t - s * ((1 + beta) * v_old - beta * leaky) - x0
    per = r[:, 0, 0] * (e_p**2).flatten(1).mean(1) / e_p.abs().flatten(1).mean(1)
    per = per + (1 - r[:, 0, 0]) * (e_n**2).flatten(1).mean(1) / e_n.abs().flatten(1).mean(1)
    (a_max / beta * per.mean()).backward()
    assert float((leaky.grad - expected).abs().max()) > 1e-3 * float(expected.abs().max())


def test_nft_loss_value_hand_computed():
    # One sample, two elements, beta = 1, sigma = 0.5, A = 2.5 with a_max = 5 -> r = 0.75.
    x0 = torch.tensor([[1.0, -1.0]])
    x_t = torch.tensor([[0.5, 0.0]])
    v_theta = torch.tensor([[-0.6, 1.6]])
    v_old = torch.tensor([[-1.0, 2.0]])
    v_ref = torch.tensor([[0.0, 2.0]])
    # x0_hat(v+) = x_t - 0.5 v_theta = [0.8, -0.8]: errors [-0.2, 0.2], n = 0.2, L+ = 0.04 / 0.2 = 0.2.
    # v- = 2 v_old - v_theta = [-1.4, 2.4]; x0_hat = [1.2, -1.2]: errors [0.2, -0.2], L- = 0.2.
    # L = 5 * (0.75 * 0.2 + 0.25 * 0.2) / 1 = 1.0; ref: mean([0.36, 0.16]) = 0.26, times 0.1.
    loss, stats = nft_loss(
        v_theta,
        v_old,
        x_t,
        x0,
        torch.tensor([0.5]),
        torch.tensor([2.5]),
        NFTConfig(beta_ref=0.1),
        v_ref=v_ref,
    )
    assert float(stats["loss/policy"]) == pytest.approx(1.0, rel=1e-5)
    assert float(stats["loss/kl"]) == pytest.approx(0.26, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(1.026, rel=1e-5)
    assert float(stats["policy/r_mean"]) == pytest.approx(0.75)
    assert float(stats["loss/nft_positive"]) == pytest.approx(0.2, rel=1e-5)


def test_nft_norm_floor_bounds_the_normaliser():
    x0 = torch.zeros(1, 4)
    x_t = torch.full((1, 4), 1e-7)  # sigma * v = 0 -> x0_hat - x0 = 1e-7 everywhere, mean |e| = 1e-7 < 1e-5
    v = torch.zeros(1, 4)
    loss, _ = nft_loss(v, v, x_t, x0, torch.tensor([0.5]), torch.tensor([0.0]), NFTConfig(beta_ref=0.0))
    assert float(loss.detach()) == pytest.approx(5 * 1e-14 / 1e-5, rel=1e-4)


def test_nft_excluded_samples_contribute_nothing():
    x0, x_t, sigma, v_old, v_ref = nft_case(num=3, dtype=torch.float32)
    x0[1] = math.nan
    sigma[1] = math.inf
    v_theta = v_old.clone().requires_grad_()
    weight = torch.tensor([1.0, 0.0, 1.0])
    loss, stats = nft_loss(
        v_theta, v_old, x_t, x0, sigma, torch.tensor([1.0, 2.0, -1.0]), NFTConfig(), v_ref, weight
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.equal(v_theta.grad[1], torch.zeros_like(v_theta.grad[1]))
    assert torch.isfinite(v_theta.grad).all()
    assert all(torch.isfinite(v) for v in stats.values())
    # Same as the loss over the two included samples alone.
    keep = torch.tensor([0, 2])
    alone, _ = nft_loss(
        v_old[keep],
        v_old[keep],
        x_t[keep],
        x0[keep],
        sigma[keep],
        torch.tensor([1.0, -1.0]),
        NFTConfig(),
        v_ref[keep],
    )
    torch.testing.assert_close(loss, alone)
    with pytest.raises(ValueError, match="beta_ref > 0 needs v_ref"):
        nft_loss(v_theta, v_old, x_t, x0, sigma, torch.zeros(3), NFTConfig())
    with pytest.raises(ValueError, match="x0 has shape"):
        nft_loss(v_theta, v_old, x_t, x0[:, :2], sigma, torch.zeros(3), NFTConfig(beta_ref=0.0))


# ------------------------------------------------------------------------------- toy problems (sign errors)


def test_grpo_toy_moves_toward_positive_sample_and_away_from_negative():
    # 1-D Gaussian policy N(mu, 0.5^2); fixed samples +1 (A = +1) and -1 (A = -1); a fresh rollout per step
    # (old log-prob = current), as on the first micro-batch of every iteration.
    mu = torch.zeros((), requires_grad=True)
    samples = torch.tensor([1.0, -1.0])
    advantages = torch.tensor([1.0, -1.0])
    optimiser = torch.optim.SGD([mu], lr=2e-4)
    for _ in range(300):
        log_prob = torch.distributions.Normal(mu, 0.5).log_prob(samples)
        loss, _ = grpo_loss(log_prob, log_prob.detach(), advantages, GRPOConfig())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert abs(float(mu.detach()) - 1.0) < 0.9 and abs(float(mu.detach()) + 1.0) > 1.1


def test_grpo_toy_rl_loop_reaches_the_rewarded_region():
    # Samples from the policy, reward -|x - 2| turned into advantages by compute_advantages, GRPO update.
    gen = torch.Generator().manual_seed(0)
    mu = torch.zeros((), requires_grad=True)
    optimiser = torch.optim.Adam([mu], lr=0.05)
    for _ in range(150):
        with torch.no_grad():
            x = mu + 0.5 * torch.randn(4, 8, generator=gen)  # B = 4 groups of G = 8
        reward = -(x - 2.0).abs()
        result, _ = compute_advantages(
            reward[..., None], torch.zeros(4, 8, 1), torch.ones(4, 8, 1, dtype=torch.bool), AdvantageConfig()
        )
        log_prob = torch.distributions.Normal(mu, 0.5).log_prob(x.flatten())
        loss, _ = grpo_loss(log_prob, log_prob.detach(), result.advantages[..., 0].flatten(), GRPOConfig())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert abs(float(mu.detach()) - 2.0) < 0.3


def delta_velocity(m: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact rectified-flow velocity of the point mass at m: v = (x_t - m) / sigma, so x0_hat(v) = m."""
    return (x_t - m) / sigma[:, None]


def test_nft_toy_moves_toward_positive_sample_and_away_from_negative():
    # Policy = point mass at m (old policy frozen at 0); x0 = +1 with A = +1, x0 = -1 with A = -1.
    gen = torch.Generator().manual_seed(0)
    m = torch.zeros((), requires_grad=True)
    m_old = torch.zeros(())
    x0 = torch.tensor([[1.0], [-1.0]])
    advantages = torch.tensor([1.0, -1.0])
    optimiser = torch.optim.SGD([m], lr=0.01)
    for _ in range(300):
        sigma = torch.rand(2, generator=gen) * 0.8 + 0.1
        x_t = (1 - sigma[:, None]) * x0 + sigma[:, None] * torch.randn(2, 1, generator=gen)
        v_theta = delta_velocity(m, x_t, sigma)
        v_old = delta_velocity(m_old, x_t, sigma)
        loss, _ = nft_loss(v_theta, v_old, x_t, x0, sigma, advantages, NFTConfig(beta_ref=0.0))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert float(m.detach()) > 0.1
    assert abs(float(m.detach()) - 1.0) < 0.9 and abs(float(m.detach()) + 1.0) > 1.1


def test_nft_toy_rl_loop_with_old_policy_soft_update_reaches_the_rewarded_region():
    # Gaussian data model N(m, tau^2): x0_hat(x_t, s) = m + c(s) (x_t - (1 - s) m), the exact posterior mean,
    # and v = (x_t - x0_hat) / s. The old policy samples, the trained one learns, the old one follows with
    # old_adapter_decay; deterministic sampling of this flow gives N(m, tau^2), drawn here directly.
    gen = torch.Generator().manual_seed(0)
    tau = 0.5
    m = torch.zeros((), requires_grad=True)
    m_old = m.detach().clone()

    def velocity(mean, x_t, sigma):
        s = sigma[:, None]
        c = (1 - s) * tau**2 / ((1 - s) ** 2 * tau**2 + s**2)
        return (x_t - (mean + c * (x_t - (1 - s) * mean))) / s

    optimiser = torch.optim.Adam([m], lr=0.05)
    for iteration in range(150):
        x0 = m_old + tau * torch.randn(2, 8, generator=gen)
        result, _ = compute_advantages(
            -(x0 - 2.0).abs()[..., None],
            torch.zeros(2, 8, 1),
            torch.ones(2, 8, 1, dtype=torch.bool),
            AdvantageConfig(),
        )
        x0 = x0.reshape(16, 1)
        sigma = torch.rand(16, generator=gen) * 0.9 + 0.05
        x_t = (1 - sigma[:, None]) * x0 + sigma[:, None] * torch.randn(16, 1, generator=gen)
        loss, _ = nft_loss(
            velocity(m, x_t, sigma),
            velocity(m_old, x_t, sigma),
            x_t,
            x0,
            sigma,
            result.advantages[..., 0].flatten(),
            NFTConfig(beta_ref=0.0),
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        soft_update_([m_old], [m], old_adapter_decay(iteration))
    assert abs(float(m.detach()) - 2.0) < 0.3


# -------------------------------------------------------------------------------------- parameter averaging


def test_each_algorithm_samples_with_its_adapter_and_keeps_the_ones_it_needs():
    from mtflow.algorithms import GRPO, NFT
    from mtflow.models.base import OLD_ADAPTER, TRAINED_ADAPTER

    assert GRPO().sampling_adapter == TRAINED_ADAPTER and GRPO().extra_adapters == ()  # on-policy
    assert NFT().sampling_adapter == OLD_ADAPTER and NFT().extra_adapters == (OLD_ADAPTER,)


def test_old_adapter_decay_schedule():
    assert old_adapter_decay(0) == 0.0
    assert old_adapter_decay(100) == pytest.approx(0.1)
    assert old_adapter_decay(500) == pytest.approx(0.5)
    assert old_adapter_decay(10_000) == 0.5
    assert old_adapter_decay(10, rate=0.01, max_decay=0.9) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="iteration"):
        old_adapter_decay(-1)


def test_soft_update_and_ema_rules():
    target = [torch.tensor([1.0, 2.0]), torch.tensor([[4.0]])]
    source = [torch.tensor([3.0, -2.0], requires_grad=True), torch.tensor([[0.0]])]
    soft_update_(target, source, 0.25)
    torch.testing.assert_close(target[0], torch.tensor([0.25 * 1 + 0.75 * 3, 0.25 * 2 - 0.75 * 2]))
    torch.testing.assert_close(target[1], torch.tensor([[1.0]]))
    assert not target[0].requires_grad
    soft_update_(target, source, 0.0)  # eta = 0 copies
    assert torch.equal(target[0], source[0].detach())
    params = [torch.nn.Parameter(torch.tensor([10.0]))]
    ema = [torch.tensor([0.0])]
    ema_update_(ema, params)
    ema_update_(ema, params)
    torch.testing.assert_close(ema[0], torch.tensor([10.0 * (1 - 0.9**2)]))
    bf16 = [torch.zeros(2, dtype=torch.bfloat16)]
    soft_update_(bf16, [torch.tensor([1.0, 2.0])], 0.5)
    assert bf16[0].dtype == torch.bfloat16 and bf16[0].tolist() == [0.5, 1.0]
    with pytest.raises(ValueError, match="2 target tensors but 1"):
        soft_update_(target, source[:1], 0.5)
    with pytest.raises(ValueError, match="shape"):
        soft_update_([torch.zeros(3)], [torch.zeros(2)], 0.5)
