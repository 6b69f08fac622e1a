"""Triton kernels against their torch references, run by Triton's CPU interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from mtflow import losses, sampling
from mtflow.losses import GRPOConfig, NFTConfig

pytest.importorskip("triton")

# Shapes [N, ...]: a single element, odd sizes, and rows longer than one 1024-wide block (several partial sums).
SHAPES = [(1, 1), (3, 7, 5), (2, 1500), (5, 3, 11)]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    """Switch the interpreter on before the kernel modules are (re)defined, and check that it really is in use."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime.interpreter import InterpretedFunction

    from mtflow.kernels import _triton_common, _triton_losses, _triton_sde

    for module in (_triton_common, _triton_sde, _triton_losses):  # common first: the others import from it
        importlib.reload(module)  # @triton.jit reads TRITON_INTERPRET when the kernel is defined
    for kernel in (_triton_sde.sde_forward_kernel, _triton_sde.block_sum, _triton_losses.nft_forward_kernel):
        assert isinstance(kernel, InterpretedFunction), kernel
    yield
    if previous is None:
        os.environ.pop("TRITON_INTERPRET")
    else:
        os.environ["TRITON_INTERPRET"] = previous


def sigmas_for(num: int):
    """Per-sample sigmas including the first grid step s = 1 (where g uses s' in its denominator)."""
    sigma = torch.linspace(1.0, 0.3, num)
    return sigma, sigma - 0.15


def random_state(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(shape, generator=gen).to(dtype),
        torch.randn(shape, generator=gen).to(dtype),
        torch.randn(shape, generator=gen),
    )


# ------------------------------------------------------------------------------------------------- backend


def test_auto_backend_uses_torch_on_cpu_and_forcing_is_checked(monkeypatch):
    from mtflow.kernels import use_triton

    cpu = torch.zeros(2)
    assert use_triton("auto", cpu) is False
    assert use_triton("torch", cpu) is False
    assert use_triton("triton", cpu) is True  # the interpreter is on in this module
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        use_triton("triton", cpu)
    with pytest.raises(ValueError, match="backend 'cuda'"):
        use_triton("cuda", cpu)


# ----------------------------------------------------------------------------------------------------- SDE


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("store_dtype", [None, torch.bfloat16, torch.float16])
def test_fused_sde_step_matches_reference(shape, dtype, store_dtype):
    from mtflow.kernels import sde_step, transition_log_prob

    x, velocity, noise = random_state(shape, dtype, seed=len(shape) + shape[-1])
    sigma, sigma_next = sigmas_for(shape[0])
    reference = sampling.sde_step(x, velocity, sigma, sigma_next, 0.9, noise=noise, store_dtype=store_dtype)
    fused = sde_step(
        x, velocity, sigma, sigma_next, 0.9, noise=noise, store_dtype=store_dtype, backend="triton"
    )
    # Same operation order in float32, and bf16 rounding done on the bits: mu and x' are bit-identical.
    assert fused.x_next.dtype == torch.float32 and fused.mean.dtype == torch.float32
    torch.testing.assert_close(fused.mean, reference.mean, rtol=0, atol=0)
    torch.testing.assert_close(fused.x_next, reference.x_next, rtol=0, atol=0)
    torch.testing.assert_close(fused.std, reference.std, rtol=0, atol=0)
    # log p is assembled from the per-sample sum: equal to float32 rounding.
    torch.testing.assert_close(fused.log_prob, reference.log_prob, rtol=1e-5, atol=1e-5)
    # The fused recomputation of a recorded transition is bit-identical to the fused step (ratio exactly 1).
    log_prob, mean, std = transition_log_prob(
        x, velocity, fused.x_next.to(store_dtype or torch.float32), sigma, sigma_next, 0.9, backend="triton"
    )
    assert torch.equal(log_prob, fused.log_prob)
    assert torch.equal(mean, fused.mean)


def test_fused_sde_step_with_scalar_sigmas_and_generator_noise():
    from mtflow.kernels import sde_step

    x, velocity, _ = random_state((4, 9), torch.float32, seed=3)
    reference = sampling.sde_step(x, velocity, 0.7, 0.55, 0.7, generator=torch.Generator().manual_seed(11))
    fused = sde_step(
        x, velocity, 0.7, 0.55, 0.7, generator=torch.Generator().manual_seed(11), backend="triton"
    )
    assert fused.std.ndim == 0
    torch.testing.assert_close(fused.x_next, reference.x_next, rtol=0, atol=0)
    torch.testing.assert_close(fused.log_prob, reference.log_prob, rtol=1e-5, atol=1e-5)
    # a = 0 is the deterministic Euler step, whatever the backend.
    euler = sde_step(x, velocity, 0.7, 0.55, 0.0, backend="triton")
    torch.testing.assert_close(euler.x_next, sampling.euler_step(x, velocity, 0.7, 0.55), rtol=0, atol=0)
    assert torch.equal(euler.log_prob, torch.zeros(4))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_transition_log_prob_gradient_matches_reference(shape, dtype):
    from mtflow.kernels import transition_log_prob

    x, velocity, noise = random_state(shape, dtype, seed=shape[-1])
    sigma, sigma_next = sigmas_for(shape[0])
    x_next = sampling.sde_step(x, velocity.float() + 0.1, sigma, sigma_next, 0.9, noise=noise).x_next
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    weights = torch.linspace(-1.0, 2.0, shape[0])
    grads = {}
    for backend in ("torch", "triton"):
        v = velocity.clone().requires_grad_()
        log_prob, mean, _ = transition_log_prob(x, v, x_next, sigma, sigma_next, 0.9, backend=backend)
        ((log_prob * weights).sum() + (mean * upstream).sum()).backward()
        grads[backend] = (log_prob.detach(), v.grad)
    assert grads["triton"][1].dtype == dtype
    torch.testing.assert_close(grads["triton"][0], grads["torch"][0], rtol=1e-5, atol=1e-5)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(grads["triton"][1], grads["torch"][1], **tolerance)


# -------------------------------------------------------------------------------------------------- losses


def nft_inputs(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=gen)
    noise = torch.randn(shape, generator=gen)
    sigma = torch.rand(shape[0], generator=gen) * 0.9 + 0.05
    s = sigma.reshape(-1, *([1] * (len(shape) - 1)))
    x_t = (1 - s) * x0 + s * noise
    v_old = noise - x0 + 0.3 * torch.randn(shape, generator=gen)
    v_theta = v_old + 0.1 * torch.randn(shape, generator=gen)
    v_ref = v_old + 0.2 * torch.randn(shape, generator=gen)
    advantages = torch.randn(shape[0], generator=gen) * 3
    cast = [t.to(dtype) for t in (v_theta, v_old, x_t, x0, v_ref)]
    return (*cast, sigma, advantages)


def assert_stats_close(fused, reference, **tolerance):
    assert fused.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(fused[key], reference[key], equal_nan=True, msg=key, **tolerance)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_ref", [True, False])
def test_fused_nft_loss_matches_reference(shape, dtype, with_ref):
    from mtflow.kernels import nft_loss

    v_theta, v_old, x_t, x0, v_ref, sigma, advantages = nft_inputs(shape, dtype, seed=shape[-1])
    config = NFTConfig(beta=0.7, beta_ref=0.05 if with_ref else 0.0)
    weight = torch.ones(shape[0])
    weight[-1] = 0.0 if shape[0] > 1 else 1.0  # an excluded sample when there is more than one
    results = {}
    for backend in ("torch", "triton"):
        v = v_theta.clone().requires_grad_()
        loss, stats = nft_loss(
            v, v_old, x_t, x0, sigma, advantages, config, v_ref if with_ref else None, weight, backend=backend
        )
        loss.backward()
        results[backend] = (loss.detach(), stats, v.grad)
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    assert_stats_close(results["triton"][1], results["torch"][1], rtol=1e-5, atol=1e-6)
    assert results["triton"][2].dtype == dtype
    tolerance = {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-4}
    torch.testing.assert_close(results["triton"][2], results["torch"][2], **tolerance)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_gaussian_mean_kl_matches_reference(shape, dtype):
    from mtflow.kernels import gaussian_mean_kl

    gen = torch.Generator().manual_seed(shape[-1])
    mean0 = torch.randn(shape, generator=gen).to(dtype)
    ref = torch.randn(shape, generator=gen).to(dtype)
    std = torch.rand(shape[0], generator=gen) + 0.1
    upstream = torch.randn(shape[0], generator=gen)
    results = {}
    for backend in ("torch", "triton"):
        mean = mean0.clone().requires_grad_()
        kl = gaussian_mean_kl(mean, ref, std, backend=backend)
        (kl * upstream).sum().backward()
        results[backend] = (kl.detach(), mean.grad)
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-3}
    torch.testing.assert_close(results["triton"][1], results["torch"][1], **tolerance)


@pytest.mark.parametrize("num", [1, 5, 37])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_grpo_loss_matches_reference(num, dtype):
    from mtflow.kernels import grpo_loss

    gen = torch.Generator().manual_seed(num)
    old = torch.randn(num, generator=gen)
    # Ratios inside and outside the clip range, both advantage signs, some exactly on-policy.
    log_ratio = torch.randn(num, generator=gen) * 0.2
    log_ratio[::3] = 0.0
    advantages = torch.randn(num, generator=gen)
    log_ratio[0], advantages[0] = 0.3, 1.0  # rho > 1 + eps pushed further: the clip stops this gradient
    weight = (torch.rand(num, generator=gen) > 0.2).float()
    weight[0] = 1.0
    mean0 = torch.randn(num, 3, 7, generator=gen).to(dtype)
    ref = torch.randn(num, 3, 7, generator=gen).to(dtype)
    std = torch.rand(num, 1, 1, generator=gen) + 0.2
    config = GRPOConfig(clip_eps=0.1, beta_kl=0.04)
    results = {}
    for backend in ("torch", "triton"):
        log_prob = (old + log_ratio).requires_grad_()
        mean = mean0.clone().requires_grad_()
        loss, stats = grpo_loss(log_prob, old, advantages, config, weight, mean, ref, std, backend=backend)
        loss.backward()
        results[backend] = (loss.detach(), stats, log_prob.grad, mean.grad)
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    assert_stats_close(results["triton"][1], results["torch"][1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["triton"][2], results["torch"][2], rtol=1e-6, atol=1e-7)
    tolerance = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-5}
    torch.testing.assert_close(results["triton"][3], results["torch"][3], **tolerance)
    assert float(results["torch"][1]["policy/clip_frac_active"]) > 0  # the clip branch was exercised


def test_fused_grpo_terms_match_reference_terms_and_gradient():
    from mtflow.kernels import fused_grpo_terms

    log_ratio0 = torch.tensor([0.3, 0.3, -0.3, -0.3, 0.05, 0.0, -0.12])
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 2.0, 1.0])
    upstream = torch.arange(1.0, 8.0)
    out = {}
    for name, fn in (("torch", losses.grpo_terms), ("triton", fused_grpo_terms)):
        log_ratio = log_ratio0.clone().requires_grad_()
        terms = fn(log_ratio, advantages, 0.1)
        (terms.objective * upstream).sum().backward()
        out[name] = (terms, log_ratio.grad)
    torch.testing.assert_close(out["triton"][0].objective.detach(), out["torch"][0].objective.detach())
    torch.testing.assert_close(out["triton"][0].ratio, out["torch"][0].ratio)
    assert torch.equal(out["triton"][0].clipped, out["torch"][0].clipped)
    assert torch.equal(out["triton"][0].clip_active, out["torch"][0].clip_active)
    torch.testing.assert_close(out["triton"][1], out["torch"][1])


def test_fused_grpo_terms_over_several_blocks():
    from mtflow.kernels import fused_grpo_terms

    gen = torch.Generator().manual_seed(0)
    log_ratio0 = torch.randn(1030, generator=gen) * 0.2  # 1030 > one 1024-wide block
    advantages = torch.randn(1030, generator=gen)
    upstream = torch.randn(1030, generator=gen)
    # Keep away from the clip boundary, where torch's and numpy's exp may round to different sides.
    ratio = log_ratio0.exp()
    log_ratio0 = torch.where(((ratio - 1).abs() - 0.1).abs() < 1e-4, torch.zeros_like(log_ratio0), log_ratio0)
    out = {}
    for name, fn in (("torch", losses.grpo_terms), ("triton", fused_grpo_terms)):
        log_ratio = log_ratio0.clone().requires_grad_()
        terms = fn(log_ratio, advantages, 0.1)
        (terms.objective * upstream).sum().backward()
        out[name] = (terms, log_ratio.grad)
    torch.testing.assert_close(out["triton"][0].objective.detach(), out["torch"][0].objective.detach())
    assert torch.equal(out["triton"][0].clip_active, out["torch"][0].clip_active)
    assert 0 < int(out["torch"][0].clip_active.sum()) < 1030
    torch.testing.assert_close(out["triton"][1], out["torch"][1])
