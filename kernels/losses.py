"""Fused per-element terms of the GRPO and NFT losses, with ``mtflow.losses`` as the reference.

Only the elementwise, memory-bound part is fused: the NFT errors of v+ and v- with their per-sample reductions,
the Gaussian-mean KL of GRPO, and the ratio / clipped objective / clip indicators of GRPO. Everything per-sample
(normalisation, r, weighting, stats) stays in ``mtflow.losses``, which the wrappers here call with the fused
functions plugged in, so there is one statement of the loss math.

Each fused function is a custom ``torch.autograd.Function`` whose backward is a second fused pass that recomputes
the elementwise terms instead of storing them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtflow import losses
from mtflow.losses import GRPOConfig, GRPOTerms, NFTConfig, NFTReductions

from .backend import Backend, flat_rows, per_sample, use_triton


def _kernels():
    from . import _triton_losses

    return _triton_losses


def _row_launch(num: int, width: int) -> tuple[int, tuple[int, int]]:
    from ._triton_common import row_launch

    return row_launch(num, width)


def _vector_launch(num: int) -> tuple[int, tuple[int]]:
    from ._triton_common import VECTOR_BLOCK, vector_grid

    return VECTOR_BLOCK, vector_grid(num)


# ------------------------------------------------------------------------------------------------------ GRPO


class _GRPOTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_ratio, advantages, clip_eps):
        kernels = _kernels()
        log_ratio = log_ratio.float().contiguous()
        advantages = advantages.float().contiguous()
        num = log_ratio.shape[0]
        objective, ratio = torch.empty_like(log_ratio), torch.empty_like(log_ratio)
        clipped = torch.empty(num, dtype=torch.int8, device=log_ratio.device)
        active = torch.empty_like(clipped)
        block, grid = _vector_launch(num)
        kernels.grpo_forward_kernel[grid](
            log_ratio, advantages, objective, ratio, clipped, active, num, float(clip_eps), BLOCK=block
        )
        ctx.save_for_backward(ratio, advantages, active)
        ctx.mark_non_differentiable(ratio, clipped, active)
        return objective, ratio, clipped, active

    @staticmethod
    def backward(ctx, grad_objective, _ratio, _clipped, _active):
        kernels = _kernels()
        ratio, advantages, active = ctx.saved_tensors
        num = ratio.shape[0]
        grad = torch.empty_like(ratio)
        block, grid = _vector_launch(num)
        kernels.grpo_backward_kernel[grid](
            grad_objective.float().contiguous(), ratio, advantages, active, grad, num, BLOCK=block
        )
        return grad, None, None


def fused_grpo_terms(log_ratio: Tensor, advantages: Tensor, clip_eps: float) -> GRPOTerms:
    """Triton version of ``mtflow.losses.grpo_terms`` (same arguments: [M] log-ratio and advantages)."""
    objective, ratio, clipped, active = _GRPOTerms.apply(log_ratio, advantages, clip_eps)
    return GRPOTerms(objective=objective, ratio=ratio, clipped=clipped.bool(), clip_active=active.bool())


class _GaussianMeanKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mean, ref_mean, std):
        kernels = _kernels()
        mean_rows, ref_rows = flat_rows(mean), flat_rows(ref_mean)
        num, width = mean_rows.shape
        block, grid = _row_launch(num, width)
        num_blocks = grid[1]
        partial = torch.empty((num, num_blocks), dtype=torch.float32, device=mean.device)
        kernels.kl_forward_kernel[grid](mean_rows, ref_rows, partial, width, num_blocks, BLOCK=block)
        ctx.save_for_backward(mean_rows, ref_rows, std)
        ctx.mean_shape, ctx.mean_dtype = mean.shape, mean.dtype
        return partial.sum(dim=1) / width / (2.0 * std.square())

    @staticmethod
    def backward(ctx, grad_kl):
        kernels = _kernels()
        mean_rows, ref_rows, std = ctx.saved_tensors
        num, width = mean_rows.shape
        block, grid = _row_launch(num, width)
        coefficient = (grad_kl.float() / (std.square() * width)).contiguous()
        grad = torch.empty((num, width), dtype=ctx.mean_dtype, device=mean_rows.device)
        kernels.kl_backward_kernel[grid](mean_rows, ref_rows, coefficient, grad, width, BLOCK=block)
        return grad.view(ctx.mean_shape), None, None


def fused_gaussian_mean_kl(mean: Tensor, ref_mean: Tensor, std: Tensor | float) -> Tensor:
    """Triton version of ``mtflow.losses.gaussian_mean_kl`` (differentiable in ``mean``); [M, ...] -> [M]."""
    if mean.shape != ref_mean.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and ref_mean {tuple(ref_mean.shape)} differ in shape")
    if ref_mean.requires_grad:
        raise NotImplementedError("the fused KL differentiates the trained mean only; detach ref_mean")
    return _GaussianMeanKL.apply(mean, ref_mean, per_sample(std, mean.shape[0], mean.device))


def gaussian_mean_kl(
    mean: Tensor, ref_mean: Tensor, std: Tensor | float, backend: Backend = "auto"
) -> Tensor:
    """``mtflow.losses.gaussian_mean_kl`` with backend selection."""
    if use_triton(backend, mean, ref_mean):
        return fused_gaussian_mean_kl(mean, ref_mean, std)
    return losses.gaussian_mean_kl(mean, ref_mean, std)


def grpo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    config: GRPOConfig,
    weight: Tensor | None = None,
    mean: Tensor | None = None,
    ref_mean: Tensor | None = None,
    std: Tensor | float | None = None,
    backend: Backend = "auto",
) -> tuple[Tensor, dict[str, Tensor]]:
    """``mtflow.losses.grpo_loss`` (same arguments and result) with the fused terms and KL on the Triton path."""
    if use_triton(backend, log_prob, mean):
        return losses.grpo_loss(
            log_prob,
            old_log_prob,
            advantages,
            config,
            weight,
            mean,
            ref_mean,
            std,
            terms_fn=fused_grpo_terms,
            kl_fn=fused_gaussian_mean_kl,
        )
    return losses.grpo_loss(log_prob, old_log_prob, advantages, config, weight, mean, ref_mean, std)


# ------------------------------------------------------------------------------------------------------- NFT


class _NFTReductions(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v_theta, v_old, x_t, x0, sigma, v_ref, beta):
        kernels = _kernels()
        rows = [flat_rows(t) for t in (v_theta, v_old, x_t, x0)]
        ref_rows = flat_rows(v_ref) if v_ref is not None else rows[0]
        num, width = rows[0].shape
        block, grid = _row_launch(num, width)
        num_blocks = grid[1]
        partial = torch.zeros((6, num, num_blocks), dtype=torch.float32, device=v_theta.device)
        kernels.nft_forward_kernel[grid](
            *rows,
            ref_rows,
            sigma,
            partial,
            float(beta),
            num,
            width,
            num_blocks,
            HAS_REF=v_ref is not None,
            BLOCK=block,
        )
        means = partial.sum(dim=2) / width  # [6, N]
        ctx.save_for_backward(*rows, ref_rows, sigma)
        ctx.has_ref, ctx.beta, ctx.v_shape, ctx.v_dtype = (
            v_ref is not None,
            float(beta),
            v_theta.shape,
            v_theta.dtype,
        )
        pos_sq, pos_abs, neg_sq, neg_abs, ref_sq, old_sq = means.unbind(0)
        ctx.mark_non_differentiable(pos_abs, neg_abs, old_sq)
        return pos_sq, pos_abs, neg_sq, neg_abs, ref_sq, old_sq

    @staticmethod
    def backward(ctx, grad_pos_sq, _pos_abs, grad_neg_sq, _neg_abs, grad_ref_sq, _old_sq):
        kernels = _kernels()
        v, v_old, x_t, x0, v_ref, sigma = ctx.saved_tensors
        num, width = v.shape
        beta = ctx.beta

        def coefficient(grad: Tensor | None, scale: Tensor | float) -> Tensor:
            if grad is None:
                return torch.zeros(num, dtype=torch.float32, device=v.device)
            return (grad.float() * scale / width).contiguous()

        # d e+/dv = -sigma beta, d e-/dv = +sigma beta, d (v - v_ref)/dv = 1; the 2 is from the square.
        coef_pos = coefficient(grad_pos_sq, -2.0 * beta * sigma)
        coef_neg = coefficient(grad_neg_sq, 2.0 * beta * sigma)
        coef_ref = coefficient(grad_ref_sq if ctx.has_ref else None, 2.0)
        grad_v = torch.empty((num, width), dtype=ctx.v_dtype, device=v.device)
        block, grid = _row_launch(num, width)
        kernels.nft_backward_kernel[grid](
            v, v_old, x_t, x0, v_ref, sigma, coef_pos, coef_neg, coef_ref, grad_v, beta, width,
            HAS_REF=ctx.has_ref, BLOCK=block,
        )  # fmt: skip
        return grad_v.view(ctx.v_shape), None, None, None, None, None, None


def fused_nft_reductions(
    v_theta: Tensor,
    v_old: Tensor,
    x_t: Tensor,
    x0: Tensor,
    sigma: Tensor,
    beta: float,
    v_ref: Tensor | None = None,
) -> NFTReductions:
    """Triton version of ``mtflow.losses.nft_reductions`` (same arguments), differentiable in ``v_theta``."""
    for name, value in (("v_old", v_old), ("x_t", x_t), ("x0", x0), ("v_ref", v_ref)):
        if value is not None and value.requires_grad:
            raise NotImplementedError(f"the fused NFT terms differentiate v_theta only; detach {name}")
    sigma = per_sample(sigma.detach(), v_theta.shape[0], v_theta.device)
    pos_sq, pos_abs, neg_sq, neg_abs, ref_sq, old_sq = _NFTReductions.apply(
        v_theta, v_old, x_t, x0, sigma, v_ref, beta
    )
    return NFTReductions(
        pos_sq=pos_sq,
        pos_abs=pos_abs,
        neg_sq=neg_sq,
        neg_abs=neg_abs,
        ref_sq=ref_sq if v_ref is not None else None,
        old_sq=old_sq,
    )


def nft_loss(
    v_theta: Tensor,
    v_old: Tensor,
    x_t: Tensor,
    x0: Tensor,
    sigma: Tensor,
    advantages: Tensor,
    config: NFTConfig,
    v_ref: Tensor | None = None,
    weight: Tensor | None = None,
    backend: Backend = "auto",
) -> tuple[Tensor, dict[str, Tensor]]:
    """``mtflow.losses.nft_loss`` (same arguments and result) with the fused reductions on the Triton path."""
    if use_triton(backend, v_theta, v_old, x_t, x0):
        return losses.nft_loss(
            v_theta,
            v_old,
            x_t,
            x0,
            sigma,
            advantages,
            config,
            v_ref,
            weight,
            reductions_fn=fused_nft_reductions,
        )
    return losses.nft_loss(v_theta, v_old, x_t, x0, sigma, advantages, config, v_ref, weight)
