"""Triton kernels of the per-element loss terms (imported lazily: only when the Triton backend runs).

Row kernels use the grid (N, cdiv(D, BLOCK)) and write per-(row, block) partial sums that the caller reduces with
a fixed-order torch sum (deterministic, no atomics; see _triton_common). All arithmetic is float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton_common import block_sum


@triton.jit
def grpo_forward_kernel(
    log_ratio_ptr,
    advantage_ptr,
    objective_ptr,
    ratio_ptr,
    clipped_ptr,
    active_ptr,
    M,
    clip_eps,
    BLOCK: tl.constexpr,
):
    """objective = min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = exp(log_ratio); clip indicators as int8."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < M
    log_ratio = tl.load(log_ratio_ptr + offsets, mask=mask, other=0.0)
    advantage = tl.load(advantage_ptr + offsets, mask=mask, other=0.0)
    ratio = tl.exp(log_ratio)
    clipped_ratio = tl.minimum(tl.maximum(ratio, 1.0 - clip_eps), 1.0 + clip_eps)
    objective = tl.minimum(ratio * advantage, clipped_ratio * advantage)
    active = ((advantage > 0) & (ratio > 1.0 + clip_eps)) | ((advantage < 0) & (ratio < 1.0 - clip_eps))
    clipped = tl.abs(ratio - 1.0) > clip_eps
    tl.store(objective_ptr + offsets, objective, mask=mask)
    tl.store(ratio_ptr + offsets, ratio, mask=mask)
    tl.store(clipped_ptr + offsets, clipped.to(tl.int8), mask=mask)
    tl.store(active_ptr + offsets, active.to(tl.int8), mask=mask)


@triton.jit
def grpo_backward_kernel(
    grad_ptr, ratio_ptr, advantage_ptr, active_ptr, grad_log_ratio_ptr, M, BLOCK: tl.constexpr
):
    """d objective / d log_ratio = A rho where the clip is not active, 0 where it is."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < M
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0)
    ratio = tl.load(ratio_ptr + offsets, mask=mask, other=0.0)
    advantage = tl.load(advantage_ptr + offsets, mask=mask, other=0.0)
    active = tl.load(active_ptr + offsets, mask=mask, other=0)
    tl.store(grad_log_ratio_ptr + offsets, tl.where(active != 0, 0.0, grad * advantage * ratio), mask=mask)


@triton.jit
def nft_forward_kernel(
    v_ptr,
    v_old_ptr,
    x_t_ptr,
    x0_ptr,
    v_ref_ptr,
    sigma_ptr,
    partial_ptr,
    beta,
    N,
    D,
    NUM_BLOCKS,
    HAS_REF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Partial sums over one block of e+^2, |e+|, e-^2, |e-|, (v - v_ref)^2, (v - v_old)^2 into partial[6, N, B],
    with e+- = x_t - sigma v+- - x0, v+ = beta v + (1 - beta) v_old, v- = (1 + beta) v_old - beta v."""
    row = tl.program_id(0)
    block = tl.program_id(1)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < D
    pointers = row.to(tl.int64) * D + offsets
    v = tl.load(v_ptr + pointers, mask=mask, other=0.0).to(tl.float32)
    v_old = tl.load(v_old_ptr + pointers, mask=mask, other=0.0).to(tl.float32)
    x_t = tl.load(x_t_ptr + pointers, mask=mask, other=0.0).to(tl.float32)
    x0 = tl.load(x0_ptr + pointers, mask=mask, other=0.0).to(tl.float32)
    sigma = tl.load(sigma_ptr + row)
    error_pos = x_t - sigma * (beta * v + (1.0 - beta) * v_old) - x0
    error_neg = x_t - sigma * ((1.0 + beta) * v_old - beta * v) - x0
    error_pos = tl.where(mask, error_pos, 0.0)
    error_neg = tl.where(mask, error_neg, 0.0)
    old_diff = tl.where(mask, v - v_old, 0.0)
    out = partial_ptr + row * NUM_BLOCKS + block
    stride = N * NUM_BLOCKS
    tl.store(out, block_sum(error_pos * error_pos))
    tl.store(out + stride, block_sum(tl.abs(error_pos)))
    tl.store(out + 2 * stride, block_sum(error_neg * error_neg))
    tl.store(out + 3 * stride, block_sum(tl.abs(error_neg)))
    if HAS_REF:
        v_ref = tl.load(v_ref_ptr + pointers, mask=mask, other=0.0).to(tl.float32)
        ref_diff = tl.where(mask, v - v_ref, 0.0)
        tl.store(out + 4 * stride, block_sum(ref_diff * ref_diff))
    tl.store(out + 5 * stride, block_sum(old_diff * old_diff))


@triton.jit
def nft_backward_kernel(
    v_ptr,
    v_old_ptr,
    x_t_ptr,
    x0_ptr,
    v_ref_ptr,
    sigma_ptr,
    coef_pos_ptr,
    coef_neg_ptr,
    coef_ref_ptr,
    grad_v_ptr,
    beta,
    D,
    HAS_REF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """grad_v = c+ e+ + c- e- + c_ref (v - v_ref), per-sample coefficients c from the caller; the errors are
    recomputed instead of stored."""
    row = tl.program_id(0)
    block = tl.program_id(1)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < D
    pointers = row.to(tl.int64) * D + offsets
    v = tl.load(v_ptr + pointers, mask=mask, other=0.0).to(tl.float32)
    v_old = tl.load(v_old_ptr + pointers, mask=mask, other=0.0).to(tl.float32)
    x_t = tl.load(x_t_ptr + pointers, mask=mask, other=0.0).to(tl.float32)
    x0 = tl.load(x0_ptr + pointers, mask=mask, other=0.0).to(tl.float32)
    sigma = tl.load(sigma_ptr + row)
    error_pos = x_t - sigma * (beta * v + (1.0 - beta) * v_old) - x0
    error_neg = x_t - sigma * ((1.0 + beta) * v_old - beta * v) - x0
    grad = tl.load(coef_pos_ptr + row) * error_pos + tl.load(coef_neg_ptr + row) * error_neg
    if HAS_REF:
        v_ref = tl.load(v_ref_ptr + pointers, mask=mask, other=0.0).to(tl.float32)
        grad += tl.load(coef_ref_ptr + row) * (v - v_ref)
    tl.store(grad_v_ptr + pointers, grad.to(grad_v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def kl_forward_kernel(mean_ptr, ref_ptr, partial_ptr, D, NUM_BLOCKS, BLOCK: tl.constexpr):
    """partial[row, block] = sum over the block of (mean - ref)^2."""
    row = tl.program_id(0)
    block = tl.program_id(1)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < D
    pointers = row.to(tl.int64) * D + offsets
    diff = tl.load(mean_ptr + pointers, mask=mask, other=0.0).to(tl.float32) - tl.load(
        ref_ptr + pointers, mask=mask, other=0.0
    ).to(tl.float32)
    tl.store(partial_ptr + row * NUM_BLOCKS + block, block_sum(diff * diff))


@triton.jit
def kl_backward_kernel(mean_ptr, ref_ptr, coef_ptr, grad_ptr, D, BLOCK: tl.constexpr):
    """grad_mean = c_i (mean - ref) with c_i = grad_i / (std_i^2 D)."""
    row = tl.program_id(0)
    block = tl.program_id(1)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < D
    pointers = row.to(tl.int64) * D + offsets
    diff = tl.load(mean_ptr + pointers, mask=mask, other=0.0).to(tl.float32) - tl.load(
        ref_ptr + pointers, mask=mask, other=0.0
    ).to(tl.float32)
    grad = tl.load(coef_ptr + row) * diff
    tl.store(grad_ptr + pointers, grad.to(grad_ptr.dtype.element_ty), mask=mask)
