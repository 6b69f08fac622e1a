"""The GRPO and NFT losses and the parameter-averaging rules (DESIGN.md sections 5-6).

Every loss takes M samples (one per trained transition for GRPO, one per noised clean output for NFT) with an
optional per-sample ``weight`` [M] >= 0. The loss is the weighted mean sum(w * l) / sum(w); a weight of 0
excludes a sample (its inputs may be anything finite or not: excluded samples are masked before any arithmetic
that could overflow, so they contribute exactly 0 to the loss and to every gradient). When every weight is 0
the loss is an exact 0 that is still connected to the graph, so every FSDP rank runs the same backward.

Stats are detached 0-d float32 tensors (weighted means over the included samples; NaN when none is included).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------------- helpers


def _check_per_sample(name: str, value: Tensor, num: int) -> None:
    if value.ndim != 1 or value.shape[0] != num:
        raise ValueError(f"{name} must be [M] with M = {num}, got shape {tuple(value.shape)}")


def _resolve_weight(weight: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """-> (weight [M] float32, include [M] bool, denominator 0-d float32 = sum(w), or 1 when it is 0)."""
    num = like.shape[0]
    if weight is None:
        weight = torch.ones(num, dtype=torch.float32, device=like.device)
    else:
        _check_per_sample("weight", weight, num)
        weight = weight.to(device=like.device, dtype=torch.float32)
        if bool((weight < 0).any()) or not bool(torch.isfinite(weight).all()):
            raise ValueError("weight must be finite and >= 0 (0 excludes a sample)")
    include = weight > 0
    total = weight.sum()
    denominator = torch.where(total > 0, total, torch.ones_like(total))
    return weight, include, denominator


def _weighted_mean(values: Tensor, weight: Tensor, include: Tensor, denominator: Tensor) -> Tensor:
    """sum(w * v) / sum(w) over [M] values; excluded entries are replaced by 0 first (no NaN * 0)."""
    values = torch.where(include, values, torch.zeros_like(values))
    return (values * weight).sum() / denominator


def _stat(values: Tensor, weight: Tensor, include: Tensor, denominator: Tensor) -> Tensor:
    with torch.no_grad():
        if not bool(include.any()):
            return torch.full((), float("nan"), device=values.device)
        return _weighted_mean(values.detach().float(), weight, include, denominator)


# ------------------------------------------------------------------------------------------------------- GRPO


@dataclass(frozen=True)
class GRPOConfig:
    """Flow-GRPO's clipped-ratio objective (DESIGN.md section 5).

    Attributes:
        clip_eps: the ratio is clipped to [1 - clip_eps, 1 + clip_eps] (Flow-GRPO 1e-4; window mode 1e-5).
        beta_kl: weight of the KL to the reference policy (0 for the FLUX family; 0.04 in Flow-GRPO's SD3 runs).
    """

    clip_eps: float = 1e-4
    beta_kl: float = 0.0

    def __post_init__(self) -> None:
        if not self.clip_eps > 0:
            raise ValueError(f"GRPOConfig.clip_eps must be > 0, got {self.clip_eps}")
        if not self.beta_kl >= 0:
            raise ValueError(f"GRPOConfig.beta_kl must be >= 0, got {self.beta_kl}")


def gaussian_mean_kl(mean: Tensor, ref_mean: Tensor, std: Tensor | float) -> Tensor:
    """KL between two Gaussian transitions with the same isotropic std, averaged like the log-prob.

    KL(N(mean, std^2 I) || N(ref_mean, std^2 I)) per element is (mean - ref_mean)^2 / (2 std^2); it is averaged
    over the non-batch dims, the same reduction ``log p`` gets (DESIGN.md section 3), so the two terms of the
    GRPO loss are on one scale. Unlike Flow-GRPO, ``std`` includes the sqrt(Delta) factor.

    Args:
        mean: [M, ...] the trained policy's transition mean (differentiable).
        ref_mean: [M, ...] the reference policy's mean at the same state.
        std: scalar, 0-d, [M] or [M, 1, ..., 1]: g * sqrt(Delta) of each sample.
    Returns:
        [M] float32.
    """
    if mean.shape != ref_mean.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and ref_mean {tuple(ref_mean.shape)} differ in shape")
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    if std.ndim > 0:
        if std.numel() != mean.shape[0]:
            raise ValueError(
                f"std must be a scalar or hold one value per sample ({mean.shape[0]}), got {tuple(std.shape)}"
            )
        std = std.reshape(-1, *([1] * (mean.ndim - 1)))
    diff = mean.float() - ref_mean.float()
    per_element = diff.square() / (2.0 * std.square())
    return per_element.flatten(1).mean(dim=1)


def grpo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    config: GRPOConfig,
    weight: Tensor | None = None,
    mean: Tensor | None = None,
    ref_mean: Tensor | None = None,
    std: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped policy-gradient loss of Flow-GRPO plus the optional Gaussian-mean KL.

    L = - wmean_i min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i) + beta_kl * wmean_i KL_i,
    rho_i = exp(log_prob_i - old_log_prob_i). At rho = 1 the gradient w.r.t. log_prob_i is -A_i w_i / sum(w).
    Outside [1 - eps, 1 + eps] the gradient is 0 on the side the advantage pushes towards (rho > 1 + eps with
    A > 0, rho < 1 - eps with A < 0) and unclipped on the other side (PPO's pessimistic bound).

    Args:
        log_prob: [M] log p_theta of the recorded transitions (differentiable).
        old_log_prob: [M] log-prob recorded at rollout (treated as a constant).
        advantages: [M] (already clipped by the advantage code).
        config: clip range and KL weight.
        weight: [M] >= 0 or None; 0 excludes the sample.
        mean, ref_mean, std: trained and reference transition means [M, ...] and std (see ``gaussian_mean_kl``).
            Required when ``beta_kl > 0``; when given with ``beta_kl = 0`` the KL is only logged.

    Returns:
        (loss 0-d float32, stats): ``loss/policy``, ``loss/kl`` (weighted mean KL; NaN when means not given),
        ``policy/clip_frac`` (share with |rho - 1| > eps, PPO's convention), ``policy/clip_frac_active`` (share
        whose gradient the clip stopped), ``policy/approx_kl`` (k3 estimator rho - 1 - log rho of
        KL(old || theta), unbiased under rollout samples), ``policy/ratio_mean``, ``policy/ratio_max``.
    """
    num = log_prob.shape[0] if log_prob.ndim == 1 else -1
    _check_per_sample("log_prob", log_prob, num)
    _check_per_sample("old_log_prob", old_log_prob, num)
    _check_per_sample("advantages", advantages, num)
    weight, include, denominator = _resolve_weight(weight, log_prob)

    log_ratio = log_prob.float() - old_log_prob.detach().float()
    # Masked before exp so that an excluded sample's garbage cannot overflow into an inf * 0 = NaN gradient.
    log_ratio = torch.where(include, log_ratio, torch.zeros_like(log_ratio))
    adv = torch.where(include, advantages.detach().float(), torch.zeros_like(log_ratio))
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1.0 - config.clip_eps, 1.0 + config.clip_eps)
    objective = torch.minimum(ratio * adv, clipped_ratio * adv)
    policy_loss = -_weighted_mean(objective, weight, include, denominator)

    has_means = mean is not None and ref_mean is not None and std is not None
    if config.beta_kl > 0 and not has_means:
        raise ValueError("grpo_loss: beta_kl > 0 needs mean, ref_mean and std (the reference policy's mean)")
    if has_means:
        if mean.ndim < 1 or mean.shape[0] != num:
            raise ValueError(f"mean must be [M, ...] with M = {num}, got shape {tuple(mean.shape)}")
        kl = gaussian_mean_kl(mean, ref_mean.detach(), std)
        kl_loss = _weighted_mean(kl, weight, include, denominator)
    else:
        kl = None
        kl_loss = torch.zeros((), device=log_prob.device)
    loss = policy_loss + config.beta_kl * kl_loss if config.beta_kl > 0 else policy_loss

    with torch.no_grad():
        nan = torch.full((), float("nan"), device=log_prob.device)
        active = ((adv > 0) & (ratio > 1.0 + config.clip_eps)) | ((adv < 0) & (ratio < 1.0 - config.clip_eps))
        stats = {
            "loss/policy": policy_loss.detach(),
            "loss/kl": kl_loss.detach() if kl is not None else nan,
            "policy/clip_frac": _stat(
                ((ratio - 1.0).abs() > config.clip_eps).float(), weight, include, denominator
            ),
            "policy/clip_frac_active": _stat(active.float(), weight, include, denominator),
            "policy/approx_kl": _stat(ratio - 1.0 - log_ratio, weight, include, denominator),
            "policy/ratio_mean": _stat(ratio, weight, include, denominator),
            "policy/ratio_max": ratio[include].max() if bool(include.any()) else nan,
        }
    return loss, stats


# -------------------------------------------------------------------------------------------------------- NFT


@dataclass(frozen=True)
class NFTConfig:
    """DiffusionNFT's negative-aware objective (DESIGN.md section 6).

    Attributes:
        beta: how far the implicit positive/negative policies sit from the old one (1; 0.1 for multi-reward runs).
        a_max: advantages are clipped to [-a_max, a_max] and mapped to r = 0.5 + A / (2 a_max); the loss is scaled
            by a_max.
        beta_ref: weight of the squared velocity distance to the reference (frozen base) policy.
        norm_floor: lower bound of the per-sample adaptive normaliser mean |x0_hat - x0|.
    """

    beta: float = 1.0
    a_max: float = 5.0
    beta_ref: float = 1e-4
    norm_floor: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("beta", "a_max", "norm_floor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"NFTConfig.{name} must be > 0, got {getattr(self, name)}")
        if not self.beta_ref >= 0:
            raise ValueError(f"NFTConfig.beta_ref must be >= 0, got {self.beta_ref}")


def nft_optimality(advantages: Tensor, a_max: float) -> Tensor:
    """r = 0.5 + clip(A, -a_max, a_max) / (2 a_max) in [0, 1]; [M] -> [M] float32 (no gradient)."""
    return 0.5 + advantages.detach().float().clamp(-a_max, a_max) / (2.0 * a_max)


def nft_x0_error(x0_hat: Tensor, x0: Tensor, norm_floor: float) -> tuple[Tensor, Tensor]:
    """Self-normalised x0-space error of DiffusionNFT.

    Args:
        x0_hat, x0: [M, ...] (float32).
    Returns:
        (loss [M] = mean over non-batch dims of (x0_hat - x0)^2 / n, n [M] = max(mean |x0_hat - x0|, floor)
        computed without gradient).
    """
    error = x0_hat - x0
    with torch.no_grad():
        norm = error.abs().flatten(1).mean(dim=1).clamp(min=norm_floor)
    per_sample = error.square().flatten(1).mean(dim=1) / norm
    return per_sample, norm


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
) -> tuple[Tensor, dict[str, Tensor]]:
    """DiffusionNFT's loss, as its authors implement it.

    With x0_hat(v) = x_t - sigma v:

        v+ = beta v_theta + (1 - beta) v_old            v- = (1 + beta) v_old - beta v_theta
        L+- = mean_elems (x0_hat(v+-) - x0)^2 / sg(max(mean_elems |x0_hat(v+-) - x0|, norm_floor))
        r   = 0.5 + clip(A, -a_max, a_max) / (2 a_max)
        L   = a_max * wmean_i (r L+ + (1 - r) L-) / beta  +  beta_ref * wmean_i mean_elems (v_theta - v_ref)^2

    Followed from DiffusionNFT's training script (``train_nft_sd3.py``: ``positive_prediction``,
    ``implicit_negative_prediction``, the no-grad ``weight_factor`` clipped at 1e-5, ``ori_policy_loss * adv_clip_max``
    and the KL as the per-element *mean* squared velocity difference times ``config.train.beta``). Two deliberate
    differences: the normaliser is accumulated in float32 (theirs in float64; the relative difference is at the
    float32 rounding level), and the mean over samples is weighted by ``weight``.

    On-policy gradient (v_theta = v_old = v as values, so v+ = v- = v and both errors equal
    e_i = x_t - sigma_i v - x0 with one normaliser n_i, D elements per sample). dv+/dv_theta = beta and
    dv-/dv_theta = -beta, so dL+-/dv_theta = -+ 2 beta sigma_i e_i / (D n_i) and

        dL/dv_theta_i = (w_i / W) a_max / beta * (2 beta sigma_i e_i / (D n_i)) * (-r_i + (1 - r_i))
                      = -(w_i / W) * 2 sigma_i * clip(A_i) * e_i / (D n_i)       (+ beta_ref term)

    using 1 - 2 r = -clip(A) / a_max, W = sum(w). It is independent of beta and a_max, zero for A = 0, and a
    descent step v <- v - lr * grad moves x0_hat = x_t - sigma v by -lr * 2 sigma^2 A e / (D n) (times w / W):
    toward x0 when A > 0, away from it when A < 0. The reference term adds 2 beta_ref (w_i / W) (v_theta - v_ref) / D.

    Args:
        v_theta: [M, ...] velocity of the trained policy (differentiable).
        v_old: [M, ...] velocity of the old (sampling) policy at the same input (constant).
        x_t: [M, ...] noised sample (1 - sigma) x0 + sigma eps.
        x0: [M, ...] the clean rollout output.
        sigma: [M] noise level of each sample.
        advantages: [M] trajectory advantages.
        config: beta, a_max, beta_ref, norm_floor.
        v_ref: [M, ...] velocity of the reference (frozen base) policy; required when ``beta_ref > 0``.
        weight: [M] >= 0 or None; 0 excludes the sample.

    Returns:
        (loss 0-d float32, stats): ``loss/policy``, ``loss/kl`` (weighted mean of mean (v_theta - v_ref)^2; NaN
        without v_ref), ``loss/nft_positive``, ``loss/nft_negative`` (weighted means of L+ and L-),
        ``policy/old_deviation`` (weighted mean of mean (v_theta - v_old)^2), ``policy/r_mean``.
    """
    shape = v_theta.shape
    for name, value in (("v_old", v_old), ("x_t", x_t), ("x0", x0)) + (
        (("v_ref", v_ref),) if v_ref is not None else ()
    ):
        if value.shape != shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected v_theta's {tuple(shape)}")
    if v_theta.ndim < 2:
        raise ValueError(f"v_theta must be [M, ...] with at least one non-batch dim, got {tuple(shape)}")
    num = shape[0]
    _check_per_sample("sigma", sigma, num)
    _check_per_sample("advantages", advantages, num)
    if config.beta_ref > 0 and v_ref is None:
        raise ValueError("nft_loss: beta_ref > 0 needs v_ref (the reference policy's velocity)")
    weight, include, denominator = _resolve_weight(weight, v_theta)

    def masked(value: Tensor) -> Tensor:
        # Excluded samples are zeroed so non-finite garbage cannot reach the loss or the gradient.
        keep = include.reshape(-1, *([1] * (value.ndim - 1)))
        return torch.where(keep, value.float(), torch.zeros((), device=value.device))

    v = masked(v_theta)
    v_old_f = masked(v_old.detach())
    x_t_f = masked(x_t.detach())
    x0_f = masked(x0.detach())
    s = torch.where(include, sigma.detach().float(), torch.zeros_like(weight)).reshape(
        -1, *([1] * (v.ndim - 1))
    )

    v_pos = config.beta * v + (1.0 - config.beta) * v_old_f
    v_neg = (1.0 + config.beta) * v_old_f - config.beta * v
    loss_pos, _ = nft_x0_error(x_t_f - s * v_pos, x0_f, config.norm_floor)
    loss_neg, _ = nft_x0_error(x_t_f - s * v_neg, x0_f, config.norm_floor)
    r = torch.where(include, nft_optimality(advantages, config.a_max), torch.zeros_like(weight))
    per_sample = config.a_max * (r * loss_pos + (1.0 - r) * loss_neg) / config.beta
    policy_loss = _weighted_mean(per_sample, weight, include, denominator)

    if v_ref is not None:
        kl = (v - masked(v_ref.detach())).square().flatten(1).mean(dim=1)
        kl_loss = _weighted_mean(kl, weight, include, denominator)
        loss = policy_loss + config.beta_ref * kl_loss
    else:
        kl_loss = None
        loss = policy_loss

    with torch.no_grad():
        nan = torch.full((), float("nan"), device=v_theta.device)
        stats = {
            "loss/policy": policy_loss.detach(),
            "loss/kl": kl_loss.detach() if kl_loss is not None else nan,
            "loss/nft_positive": _stat(loss_pos, weight, include, denominator),
            "loss/nft_negative": _stat(loss_neg, weight, include, denominator),
            "policy/old_deviation": _stat(
                (v - v_old_f).square().flatten(1).mean(dim=1), weight, include, denominator
            ),
            "policy/r_mean": _stat(r, weight, include, denominator),
        }
    return loss, stats


# ------------------------------------------------------------------------------------------ parameter averaging


def old_adapter_decay(iteration: int, rate: float = 0.001, max_decay: float = 0.5) -> float:
    """eta = min(rate * iteration, max_decay): how much of the old adapter survives a soft update.

    DiffusionNFT's ``return_decay`` (decay_type 1): the old policy starts as a copy that tracks the trained one
    exactly (eta = 0) and becomes smoother as training goes on. Their script passes its optimiser-step counter;
    DESIGN.md section 6 uses the RL iteration.
    """
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    if not 0.0 <= max_decay <= 1.0 or rate < 0:
        raise ValueError(f"need rate >= 0 and 0 <= max_decay <= 1, got rate={rate}, max_decay={max_decay}")
    return min(rate * iteration, max_decay)


def _check_pairs(name: str, target: Sequence[Tensor], source: Sequence[Tensor], decay: float) -> None:
    if len(target) != len(source):
        raise ValueError(f"{name}: {len(target)} target tensors but {len(source)} source tensors")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"{name}: decay must be in [0, 1], got {decay}")
    for index, (t, s) in enumerate(zip(target, source)):
        if t.shape != s.shape:
            raise ValueError(
                f"{name}: tensor {index} has shape {tuple(t.shape)} in target, {tuple(s.shape)} in source"
            )


@torch.no_grad()
def soft_update_(target: Sequence[Tensor], source: Sequence[Tensor], decay: float) -> None:
    """target <- decay * target + (1 - decay) * source, in place, without autograd (old-adapter update).

    Args:
        target: tensors updated in place (e.g. the old adapter's LoRA parameters).
        source: tensors of the same shapes (e.g. the trained adapter's LoRA parameters), read only.
        decay: eta in [0, 1]; 0 copies the source.
    """
    _check_pairs("soft_update_", target, source, decay)
    for t, s in zip(target, source):
        s = s.detach().to(dtype=t.dtype, device=t.device)
        if decay == 0.0:
            t.copy_(s)
        else:
            t.mul_(decay).add_(s, alpha=1.0 - decay)


def ema_update_(ema: Sequence[Tensor], params: Sequence[Tensor], decay: float = 0.9) -> None:
    """ema <- decay * ema + (1 - decay) * params, in place (the evaluation/export EMA, DESIGN.md section 6).

    Args:
        ema: the EMA tensors, updated in place.
        params: the trained tensors of the same shapes, read only.
        decay: EMA decay in [0, 1].
    """
    soft_update_(ema, params, decay)
