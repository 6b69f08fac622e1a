"""The GRPO and NFT losses and the parameter-averaging rules (docs/design.md sections 5-6).

Every loss takes M samples (one per trained transition for GRPO, one per noised clean output for NFT) with an
optional per-sample ``weight`` [M] >= 0. The loss is the weighted mean sum(w * l) / sum(w); a weight of 0
excludes a sample (its inputs may be anything finite or not: excluded samples are masked before any arithmetic
that could overflow, so they contribute exactly 0 to the loss and to every gradient). When every weight is 0
the loss is an exact 0 that is still connected to the graph, so every FSDP rank runs the same backward.

Stats are detached 0-d float32 tensors (weighted means over the included samples; NaN when none is included).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    """Detached weighted mean; NaN when no sample is included (no host sync)."""
    with torch.no_grad():
        value = _weighted_mean(values.detach().float(), weight, include, denominator)
        return torch.where(include.any(), value, torch.full_like(value, float("nan")))


def _mask_rows(value: Tensor, include: Tensor, fill: float = 0.0) -> Tensor:
    """Replace the rows (first dim) of excluded samples by ``fill`` so that garbage there cannot reach a gradient."""
    keep = include.reshape(-1, *([1] * (value.ndim - 1)))
    return torch.where(keep, value, torch.full((), fill, dtype=value.dtype, device=value.device))


# ------------------------------------------------------------------------------------------------------- GRPO


@dataclass(frozen=True)
class GRPOConfig:
    """Flow-GRPO's clipped-ratio objective (docs/design.md section 5).

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
    over the non-batch dims, the same reduction ``log p`` gets (docs/design.md section 3), so the two terms of the
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


@dataclass
class GRPOTerms:
    """Per-sample terms of the clipped objective.

    Attributes:
        objective: [M] float32 min(rho A, clip(rho, 1 - eps, 1 + eps) A), differentiable in the log-ratio.
        ratio: [M] float32 rho (detached).
        clipped: [M] bool, |rho - 1| > eps (PPO's clip-fraction convention).
        clip_active: [M] bool, the clip stopped the gradient (rho > 1 + eps with A > 0, rho < 1 - eps with A < 0).
    """

    objective: Tensor
    ratio: Tensor
    clipped: Tensor
    clip_active: Tensor


def grpo_terms(log_ratio: Tensor, advantages: Tensor, clip_eps: float) -> GRPOTerms:
    """Torch reference of the per-sample GRPO terms.

    Args:
        log_ratio: [M] float32 log p_theta - log p_old (differentiable), finite.
        advantages: [M] float32 (constant).
        clip_eps: clip range eps.
    """
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    objective = torch.minimum(ratio * advantages, clipped_ratio * advantages)
    with torch.no_grad():
        ratio_value = ratio.detach()
        clip_active = ((advantages > 0) & (ratio_value > 1.0 + clip_eps)) | (
            (advantages < 0) & (ratio_value < 1.0 - clip_eps)
        )
        clipped = (ratio_value - 1.0).abs() > clip_eps
    return GRPOTerms(objective=objective, ratio=ratio_value, clipped=clipped, clip_active=clip_active)


def grpo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    config: GRPOConfig,
    weight: Tensor | None = None,
    mean: Tensor | None = None,
    ref_mean: Tensor | None = None,
    std: Tensor | float | None = None,
    *,
    terms_fn: Callable[[Tensor, Tensor, float], GRPOTerms] = grpo_terms,
    kl_fn: Callable[[Tensor, Tensor, Tensor | float], Tensor] = gaussian_mean_kl,
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
        terms_fn, kl_fn: implementations of the per-sample terms and KL (default: the torch references here;
            ``mtflow.kernels`` passes its fused kernels).

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
    terms = terms_fn(log_ratio, adv, config.clip_eps)
    policy_loss = -_weighted_mean(terms.objective, weight, include, denominator)

    has_means = mean is not None and ref_mean is not None and std is not None
    if config.beta_kl > 0 and not has_means:
        raise ValueError("grpo_loss: beta_kl > 0 needs mean, ref_mean and std (the reference policy's mean)")
    if has_means:
        if mean.ndim < 2 or mean.shape[0] != num:
            raise ValueError(f"mean must be [M, ...] with M = {num}, got shape {tuple(mean.shape)}")
        ref_mean = ref_mean.detach()
        if not bool(include.all()):
            mean, ref_mean = _mask_rows(mean, include), _mask_rows(ref_mean, include)
            std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
            if std.ndim > 0 and std.numel() == num:
                std = torch.where(include, std.reshape(num), torch.ones_like(std.reshape(num)))
        kl = kl_fn(mean, ref_mean, std)
        kl_loss = _weighted_mean(kl, weight, include, denominator)
    else:
        kl_loss = None
    loss = policy_loss + config.beta_kl * kl_loss if config.beta_kl > 0 else policy_loss

    with torch.no_grad():
        ratio = terms.ratio
        nan = torch.full((), float("nan"), device=log_prob.device)
        ratio_max = torch.where(include, ratio, torch.full_like(ratio, -float("inf"))).amax() if num else nan
        stats = {
            "loss/policy": policy_loss.detach(),
            "loss/kl": kl_loss.detach() if kl_loss is not None else nan,
            "policy/clip_frac": _stat(terms.clipped.float(), weight, include, denominator),
            "policy/clip_frac_active": _stat(terms.clip_active.float(), weight, include, denominator),
            "policy/approx_kl": _stat(ratio - 1.0 - log_ratio.detach(), weight, include, denominator),
            "policy/ratio_mean": _stat(ratio, weight, include, denominator),
            "policy/ratio_max": torch.where(include.any(), ratio_max, nan),
        }
    return loss, stats


# -------------------------------------------------------------------------------------------------------- NFT


@dataclass(frozen=True)
class NFTConfig:
    """DiffusionNFT's negative-aware objective (docs/design.md section 6).

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


@dataclass
class NFTReductions:
    """Per-sample means over the non-batch dims, each [M] float32.

    Attributes:
        pos_sq: mean (x0_hat(v+) - x0)^2, differentiable in v_theta.
        pos_abs: mean |x0_hat(v+) - x0| (no gradient).
        neg_sq: mean (x0_hat(v-) - x0)^2, differentiable in v_theta.
        neg_abs: mean |x0_hat(v-) - x0| (no gradient).
        ref_sq: mean (v_theta - v_ref)^2, differentiable; None without v_ref.
        old_sq: mean (v_theta - v_old)^2 (no gradient; logged).
    """

    pos_sq: Tensor
    pos_abs: Tensor
    neg_sq: Tensor
    neg_abs: Tensor
    ref_sq: Tensor | None
    old_sq: Tensor


def nft_reductions(
    v_theta: Tensor,
    v_old: Tensor,
    x_t: Tensor,
    x0: Tensor,
    sigma: Tensor,
    beta: float,
    v_ref: Tensor | None = None,
) -> NFTReductions:
    """Torch reference of the elementwise part of the NFT loss (float32 whatever the input dtype).

    Args:
        v_theta: [M, ...] (differentiable); v_old, x_t, x0, v_ref: [M, ...] constants; sigma: [M]; beta: NFT beta.
    """
    v = v_theta.float()
    v_old = v_old.detach().float()
    x_t = x_t.detach().float()
    x0 = x0.detach().float()
    s = sigma.detach().float().reshape(-1, *([1] * (v.ndim - 1)))
    error_pos = x_t - s * (beta * v + (1.0 - beta) * v_old) - x0
    error_neg = x_t - s * ((1.0 + beta) * v_old - beta * v) - x0

    def per_sample_mean(value: Tensor) -> Tensor:
        return value.flatten(1).mean(dim=1)

    with torch.no_grad():
        pos_abs = per_sample_mean(error_pos.abs())
        neg_abs = per_sample_mean(error_neg.abs())
        old_sq = per_sample_mean((v - v_old).square())
    ref_sq = per_sample_mean((v - v_ref.detach().float()).square()) if v_ref is not None else None
    return NFTReductions(
        pos_sq=per_sample_mean(error_pos.square()),
        pos_abs=pos_abs,
        neg_sq=per_sample_mean(error_neg.square()),
        neg_abs=neg_abs,
        ref_sq=ref_sq,
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
    *,
    reductions_fn: Callable[..., NFTReductions] = nft_reductions,
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
        reductions_fn: computes the per-sample reductions (default: the torch reference ``nft_reductions``;
            ``mtflow.kernels`` passes its fused kernel).

    Returns:
        (loss 0-d float32, stats): ``loss/policy``, ``loss/kl`` (weighted mean of mean (v_theta - v_ref)^2; NaN
        without v_ref), ``loss/nft_positive``, ``loss/nft_negative`` (weighted means of L+ and L-),
        ``policy/old_deviation`` (weighted mean of mean (v_theta - v_old)^2), ``policy/r_mean``.
    """
    shape = v_theta.shape
    named = {"v_old": v_old, "x_t": x_t, "x0": x0}
    if v_ref is not None:
        named["v_ref"] = v_ref
    for name, value in named.items():
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

    sigma = sigma.detach().float()
    if not bool(include.all()):
        # Excluded samples are zeroed so non-finite garbage cannot reach the loss or the gradient.
        v_theta, v_old, x_t, x0 = (_mask_rows(t, include) for t in (v_theta, v_old, x_t, x0))
        v_ref = _mask_rows(v_ref, include) if v_ref is not None else None
        sigma = torch.where(include, sigma, torch.zeros_like(sigma))
    red = reductions_fn(v_theta, v_old, x_t, x0, sigma, config.beta, v_ref)

    # DiffusionNFT's adaptive weight: the per-sample mean absolute error, floored, as a constant.
    loss_pos = red.pos_sq / red.pos_abs.detach().clamp(min=config.norm_floor)
    loss_neg = red.neg_sq / red.neg_abs.detach().clamp(min=config.norm_floor)
    r = torch.where(include, nft_optimality(advantages, config.a_max), torch.zeros_like(weight))
    per_sample = config.a_max * (r * loss_pos + (1.0 - r) * loss_neg) / config.beta
    policy_loss = _weighted_mean(per_sample, weight, include, denominator)

    if red.ref_sq is not None:
        kl_loss = _weighted_mean(red.ref_sq, weight, include, denominator)
        loss = policy_loss + config.beta_ref * kl_loss
    else:
        kl_loss = None
        loss = policy_loss

    with torch.no_grad():
        nan = torch.full((), float("nan"), device=loss.device)
        stats = {
            "loss/policy": policy_loss.detach(),
            "loss/kl": kl_loss.detach() if kl_loss is not None else nan,
            "loss/nft_positive": _stat(loss_pos, weight, include, denominator),
            "loss/nft_negative": _stat(loss_neg, weight, include, denominator),
            "policy/old_deviation": _stat(red.old_sq, weight, include, denominator),
            "policy/r_mean": _stat(r, weight, include, denominator),
        }
    return loss, stats


# ------------------------------------------------------------------------------------------ parameter averaging


def old_adapter_decay(iteration: int, rate: float = 0.001, max_decay: float = 0.5) -> float:
    """eta = min(rate * iteration, max_decay): how much of the old adapter survives a soft update.

    DiffusionNFT's ``return_decay`` (decay_type 1): the old policy starts as a copy that tracks the trained one
    exactly (eta = 0) and becomes smoother as training goes on. Their script passes its optimiser-step counter;
    docs/design.md section 6 uses the RL iteration.
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
    """ema <- decay * ema + (1 - decay) * params, in place (the evaluation/export EMA, docs/design.md section 6).

    Args:
        ema: the EMA tensors, updated in place.
        params: the trained tensors of the same shapes, read only.
        decay: EMA decay in [0, 1].
    """
    soft_update_(ema, params, decay)
