"""Triton kernels of the SDE step (imported lazily: only when the Triton backend runs).

Layout: every per-sample tensor is a contiguous [N, D] row; the grid is (N, cdiv(D, BLOCK)); each program handles
one block of one row and keeps all arithmetic in float32 (reductions: see _triton_common).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton_common import block_sum


@triton.jit
def _round_through(value, ROUND: tl.constexpr):
    # Round to nearest even, exactly as torch's .to() does. bf16 is done on the bits: Triton's interpreter rounds
    # fp32 -> bf16 casts half-up without carrying into the exponent, so a cast would test something else than
    # the GPU runs.
    if ROUND == 1:
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        value = tl.where(value != value, value, bits.to(tl.float32, bitcast=True))
    elif ROUND == 2:
        value = value.to(tl.float16, fp_downcast_rounding="rtne").to(tl.float32)
    return value


@triton.jit
def sde_forward_kernel(
    x_ptr,
    v_ptr,
    noise_ptr,
    next_ptr,
    mean_ptr,
    partial_ptr,
    delta_ptr,
    k_ptr,
    one_minus_s_ptr,
    std_ptr,
    D,
    NUM_BLOCKS,
    SAMPLE: tl.constexpr,
    STORE_MEAN: tl.constexpr,
    ROUND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """mu = x - delta v - k (x + (1 - s) v); SAMPLE: x' = round(mu + std z) stored, else x' loaded;
    partial[row, block] = sum over the block of (x' - mu)^2."""
    row = tl.program_id(0)
    block = tl.program_id(1)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < D
    pointers = row.to(tl.int64) * D + offsets
    x = tl.load(x_ptr + pointers, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + pointers, mask=mask, other=0.0).to(tl.float32)
    delta = tl.load(delta_ptr + row)
    k = tl.load(k_ptr + row)
    one_minus_s = tl.load(one_minus_s_ptr + row)
    # Same operation order as mtflow.sampling.sde_mean_std.
    mean = (x - delta * v) - k * (x + one_minus_s * v)
    if SAMPLE:
        std = tl.load(std_ptr + row)
        noise = tl.load(noise_ptr + pointers, mask=mask, other=0.0).to(tl.float32)
        x_next = _round_through(mean + std * noise, ROUND)
        tl.store(next_ptr + pointers, x_next, mask=mask)
    else:
        x_next = tl.load(next_ptr + pointers, mask=mask, other=0.0).to(tl.float32)
    if STORE_MEAN:
        tl.store(mean_ptr + pointers, mean, mask=mask)
    diff = tl.where(mask, x_next - mean, 0.0)
    tl.store(partial_ptr + row * NUM_BLOCKS + block, block_sum(diff * diff))


@triton.jit
def transition_backward_kernel(
    x_ptr,
    v_ptr,
    next_ptr,
    grad_mean_ptr,
    grad_v_ptr,
    delta_ptr,
    k_ptr,
    one_minus_s_ptr,
    log_prob_coef_ptr,
    mean_dv_ptr,
    D,
    HAS_GRAD_MEAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """grad_v = (grad_mean + c_i (x' - mu)) * dmu/dv with c_i = grad_logp_i / (std_i^2 D), dmu/dv = -(delta + k (1 - s));
    mu is recomputed from x and v instead of being stored by the forward."""
    row = tl.program_id(0)
    block = tl.program_id(1)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < D
    pointers = row.to(tl.int64) * D + offsets
    x = tl.load(x_ptr + pointers, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + pointers, mask=mask, other=0.0).to(tl.float32)
    x_next = tl.load(next_ptr + pointers, mask=mask, other=0.0).to(tl.float32)
    delta = tl.load(delta_ptr + row)
    k = tl.load(k_ptr + row)
    one_minus_s = tl.load(one_minus_s_ptr + row)
    mean = (x - delta * v) - k * (x + one_minus_s * v)
    grad_mean = tl.load(log_prob_coef_ptr + row) * (x_next - mean)
    if HAS_GRAD_MEAN:
        grad_mean += tl.load(grad_mean_ptr + pointers, mask=mask, other=0.0).to(tl.float32)
    grad_v = grad_mean * tl.load(mean_dv_ptr + row)
    tl.store(grad_v_ptr + pointers, grad_v.to(grad_v_ptr.dtype.element_ty), mask=mask)
