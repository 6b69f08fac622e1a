"""Fused SDE step and transition log-prob (docs/design.md section 3), with ``mtflow.sampling`` as the reference.

One pass over the latents produces mu, x' and the per-sample sum of (x' - mu)^2 that log p needs, instead of
the half-dozen elementwise passes (and float32 temporaries) the torch reference makes. ``transition_log_prob``
is differentiable in the velocity through a custom autograd function whose backward is a second fused pass that
recomputes mu instead of storing it.

Numerics: all arithmetic is float32; mu uses the reference's operation order. The log-prob is assembled as
-(sum (x' - mu)^2 / D) / (2 std^2) - log std - log sqrt(2 pi) rather than as the mean of per-element terms, so it
matches the reference to float32 rounding, not bit for bit. It *is* bit-identical between this module's
``sde_step`` and ``transition_log_prob`` (same kernel, same reduction order), which is what makes the recomputed
ratio exactly 1 on-policy: use one backend for both rollout and training.
"""

from __future__ import annotations

import torch

from mtflow import sampling
from mtflow.sampling import SDEStep

from .backend import Backend, flat_rows, per_sample, use_triton

_ROUND_CODES = {
    None: 0,
    torch.float32: 0,
    torch.bfloat16: 1,
    torch.float16: 2,
}  # the kernels' ROUND constexpr


def _step_coefficients(sigma, sigma_next, noise_level: float, num: int, device: torch.device):
    """Per-sample [N] float32 scalars of the step, computed with the same expressions as the reference:
    delta, k = delta g^2 / (2 s), 1 - s, std = g sqrt(delta)."""
    s = per_sample(sigma, num, device)
    s_next = per_sample(sigma_next, num, device)
    delta = s - s_next
    denominator = 1.0 - torch.where(s >= 1.0, s_next, s)
    g = noise_level * torch.sqrt(s / denominator)
    k = delta * g.square() / (2.0 * s)
    return delta.contiguous(), k.contiguous(), (1.0 - s).contiguous(), (g * torch.sqrt(delta)).contiguous()


def _std_like_reference(std: torch.Tensor, sigma, sigma_next, like: torch.Tensor) -> torch.Tensor:
    """The reference returns std 0-d for scalar sigmas and [N, 1, ..., 1] otherwise."""
    scalar = torch.as_tensor(sigma).ndim == 0 and torch.as_tensor(sigma_next).ndim == 0
    return std[0] if scalar else std.reshape(-1, *([1] * (like.ndim - 1)))


def _launch_forward(x, velocity, x_next, noise, std, delta, k, one_minus_s, sample: bool, round_code: int):
    from . import _triton_sde as kernels
    from ._triton_common import row_launch

    rows = flat_rows(x)
    num, width = rows.shape
    block, grid = row_launch(num, width)
    mean = torch.empty((num, width), dtype=torch.float32, device=x.device)
    partial = torch.empty((num, grid[1]), dtype=torch.float32, device=x.device)
    kernels.sde_forward_kernel[grid](
        rows,
        flat_rows(velocity),
        flat_rows(noise) if sample else rows,
        x_next,
        mean,
        partial,
        delta,
        k,
        one_minus_s,
        std,
        width,
        grid[1],
        SAMPLE=sample,
        STORE_MEAN=True,
        ROUND=round_code,
        BLOCK=block,
    )
    return mean, partial.sum(dim=1)


def _log_prob_from_sum(square_sum: torch.Tensor, std: torch.Tensor, width: int) -> torch.Tensor:
    return -(square_sum / width) / (2.0 * std.square()) - torch.log(std) - sampling.LOG_SQRT_2PI


def sde_step(
    x: torch.Tensor,
    velocity: torch.Tensor,
    sigma,
    sigma_next,
    noise_level: float,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    store_dtype: torch.dtype | None = None,
    backend: Backend = "auto",
) -> SDEStep:
    """``mtflow.sampling.sde_step`` with a fused Triton path (same arguments, same result type).

    Args:
        x, velocity: [N, ...] any float dtype (math in float32).
        sigma, sigma_next: scalars or [N].
        noise_level: a; 0 is the deterministic Euler step (always the torch reference: nothing to fuse).
        noise: optional z [N, ...]; otherwise drawn exactly as the reference draws it.
        generator: for the noise.
        store_dtype: x' is rounded through it before its log-prob (float32, bfloat16 or float16).
        backend: "auto", "torch" or "triton" (see ``mtflow.kernels.backend``).
    Returns:
        SDEStep with x_next [N, ...] float32, mean [N, ...] float32, std, log_prob [N] float32.
    """
    if noise_level == 0.0 or not use_triton(backend, x, velocity, noise):
        return sampling.sde_step(x, velocity, sigma, sigma_next, noise_level, noise, generator, store_dtype)
    if store_dtype not in _ROUND_CODES:
        raise ValueError(
            f"store_dtype must be float32, bfloat16 or float16 for the fused step, got {store_dtype}"
        )
    if velocity.shape != x.shape:
        raise ValueError(f"velocity {tuple(velocity.shape)} and x {tuple(x.shape)} differ in shape")
    num = x.shape[0]
    delta, k, one_minus_s, std = _step_coefficients(sigma, sigma_next, noise_level, num, x.device)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    elif noise.shape != x.shape:
        raise ValueError(f"noise {tuple(noise.shape)} and x {tuple(x.shape)} differ in shape")
    x_next = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    mean, square_sum = _launch_forward(
        x, velocity, x_next, noise, std, delta, k, one_minus_s, True, _ROUND_CODES[store_dtype]
    )
    log_prob = _log_prob_from_sum(square_sum, std, mean.shape[1])
    return SDEStep(
        x_next=x_next,
        mean=mean.view(x.shape),
        std=_std_like_reference(std, sigma, sigma_next, x),
        log_prob=log_prob,
    )


class _TransitionLogProb(torch.autograd.Function):
    """(x, velocity, x_next, per-sample coefficients) -> (log_prob [N], mean [N, D]); differentiable in velocity."""

    @staticmethod
    def forward(ctx, x, velocity, x_next, delta, k, one_minus_s, std):
        x_rows, v_rows, next_rows = flat_rows(x), flat_rows(velocity), flat_rows(x_next)
        mean, square_sum = _launch_forward(
            x_rows, v_rows, next_rows, None, std, delta, k, one_minus_s, False, 0
        )
        ctx.save_for_backward(x_rows, v_rows, next_rows, delta, k, one_minus_s, std)
        ctx.velocity_dtype = velocity.dtype
        ctx.velocity_shape = velocity.shape
        return _log_prob_from_sum(square_sum, std, mean.shape[1]), mean

    @staticmethod
    def backward(ctx, grad_log_prob, grad_mean):
        from . import _triton_sde as kernels
        from ._triton_common import row_launch

        x_rows, v_rows, next_rows, delta, k, one_minus_s, std = ctx.saved_tensors
        num, width = x_rows.shape
        if grad_log_prob is None:
            grad_log_prob = torch.zeros(num, dtype=torch.float32, device=x_rows.device)
        log_prob_coef = (grad_log_prob.float() / (std.square() * width)).contiguous()
        mean_dv = (-(delta + k * one_minus_s)).contiguous()
        grad_v = torch.empty((num, width), dtype=ctx.velocity_dtype, device=x_rows.device)
        block, grid = row_launch(num, width)
        kernels.transition_backward_kernel[grid](
            x_rows,
            v_rows,
            next_rows,
            grad_mean.contiguous() if grad_mean is not None else x_rows,
            grad_v,
            delta,
            k,
            one_minus_s,
            log_prob_coef,
            mean_dv,
            width,
            HAS_GRAD_MEAN=grad_mean is not None,
            BLOCK=block,
        )
        return None, grad_v.view(ctx.velocity_shape), None, None, None, None, None


def transition_log_prob(
    x: torch.Tensor,
    velocity: torch.Tensor,
    x_next: torch.Tensor,
    sigma,
    sigma_next,
    noise_level: float,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mtflow.sampling.transition_log_prob`` with a fused Triton path, differentiable in ``velocity``.

    Args:
        x, velocity, x_next: [N, ...]; sigma, sigma_next: scalars or [N]; noise_level > 0.
        backend: "auto", "torch" or "triton".
    Returns:
        log_prob [N] float32, mean [N, ...] float32 (differentiable in velocity), std (as the reference).
    Raises:
        NotImplementedError: on the Triton path when ``x`` or ``x_next`` requires grad (recorded states are
            constants in training; use backend="torch" to differentiate through them).
    """
    if not use_triton(backend, x, velocity, x_next):
        return sampling.transition_log_prob(x, velocity, x_next, sigma, sigma_next, noise_level)
    if noise_level <= 0.0:
        raise ValueError("transition_log_prob needs a stochastic step (noise_level > 0)")
    if x.requires_grad or x_next.requires_grad:
        raise NotImplementedError("the fused transition_log_prob differentiates the velocity only")
    if not x.shape == velocity.shape == x_next.shape:
        raise ValueError(
            f"x {tuple(x.shape)}, velocity {tuple(velocity.shape)} and x_next {tuple(x_next.shape)} must match"
        )
    delta, k, one_minus_s, std = _step_coefficients(sigma, sigma_next, noise_level, x.shape[0], x.device)
    log_prob, mean = _TransitionLogProb.apply(x, velocity, x_next, delta, k, one_minus_s, std)
    return log_prob, mean.view(x.shape), _std_like_reference(std, sigma, sigma_next, x)
