"""From per-turn judge scores to per-sample advantages (docs/design.md section 4).

Input: IF and CC scores of shape [B, G, K] (B groups = edit chains, G trajectories per group, K turns) on the
judge scale [1, 5], with a ``scored`` mask. Output: advantages [B, G, K] and the mask of samples that get a
gradient.

Rules (each one a decision the tests pin down):

- **Unscored trajectories.** A trajectory with any unscored turn (``scored`` False, or not every turn scored) is
  *invalid*: it is excluded from every statistic (group mean and std, batch std, filters, logged stats), gets
  advantage 0 and ``valid`` False; its scores are never read. Unscored entries may hold anything (NaN); a
  ``scored`` entry that is not finite is a scorer bug and raises, even in a trajectory that is otherwise unscored.
- **Groups with fewer than 2 valid trajectories** carry no comparison, so they get no gradient (``valid``
  False everywhere in the group) and count as dropped in ``reward/frac_dropped_groups``. This holds in both std
  modes (under ``batch`` such a group's advantage would be exactly 0 anyway).
- **Turn aggregation** (trajectory broadcast only): ``mean``, ``min``, ``last`` over the K turns, or ``product``
  of the scores mapped to [0, 1] by (s - 1) / 4. Under turn broadcast each turn is normalised on its own and
  the aggregation is not used.
- **Normalisation** per component m in {IF, CC}: A^m = (R^m - group mean) / (std + std_eps), std the population
  std (ddof 0, as Flow-GRPO's ``np.std``) of the group (``group``) or of every valid trajectory of every kept
  group in the batch (``batch``; Flow-GRPO's ``global_std``: the mean stays per group). A group whose values are
  all exactly equal gets advantage exactly 0 (not 1e-13 from rounding in the mean).
- **Fusion** ``advantage``: A = A^IF + lambda_cc * A^CC. ``reward``: R = R^IF + lambda_cc * R^CC, normalised once.
- **Clip** to [-a_max, a_max].
- **Broadcast** ``trajectory``: the unit of normalisation is (group); its advantage is copied to all K turns.
  ``turn``: the unit is (group, turn): turn k's scores are normalised within the group (under ``batch`` std, over
  turn k of the whole batch) and turn k gets its own advantage.
- **Group filter** (``min_group_std`` > 0): a unit whose fused raw reward R^IF + lambda_cc * R^CC (aggregated, or
  per turn under turn broadcast) has population std below the threshold is dropped (no gradient), in either
  fusion mode. Units are counted in ``reward/frac_dropped_groups``.

Stats (python floats; NaN when there is nothing to average, never an invented 0):
``adv/mean``, ``adv/std``, ``adv/abs_mean``, ``adv/frac_clipped`` (over valid units, before broadcast),
``adv/frac_valid`` (share of the [B, G, K] samples that get gradient), ``reward/frac_zero_std`` (units with
>= 2 valid trajectories whose fused rewards are all equal), ``reward/frac_dropped_groups`` (units with no
gradient: fewer than 2 valid trajectories or below ``min_group_std``), ``reward/frac_unscored`` (trajectories
not fully scored), ``reward/if_mean``, ``reward/cc_mean``, ``reward/mean`` (aggregated, over valid
trajectories), ``reward/if_turn{k}``, ``reward/cc_turn{k}`` (k from 1, over valid trajectories), and
``reward/group_std_mean`` (mean over units with >= 2 valid trajectories of the fused reward's group std).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from mtflow.reward.base import SCORE_MAX, SCORE_MIN

Aggregation = Literal["mean", "min", "last", "product"]


@dataclass(frozen=True)
class AdvantageConfig:
    """How judge scores become advantages (docs/design.md section 4).

    Attributes:
        aggregation: how a trajectory's K per-turn scores become one reward (trajectory broadcast only).
        std_mode: normalise by the std of the group ("group") or of the whole batch ("batch", Flow-GRPO global_std).
        fusion: fuse IF and CC after normalising each ("advantage", MT-EditFlow) or before ("reward", ablation).
        lambda_cc: weight of the content-consistency component in the fusion.
        a_max: advantages are clipped to [-a_max, a_max].
        broadcast: one advantage per trajectory copied to every turn ("trajectory") or one per turn ("turn").
        min_group_std: drop groups whose fused reward std is below this (0 keeps all; paper option 0.05).
        std_eps: added to the std in the normalisation denominator.
    """

    aggregation: Aggregation = "mean"
    std_mode: Literal["group", "batch"] = "group"
    fusion: Literal["advantage", "reward"] = "advantage"
    lambda_cc: float = 0.3
    a_max: float = 5.0
    broadcast: Literal["trajectory", "turn"] = "trajectory"
    min_group_std: float = 0.0
    std_eps: float = 1e-4

    def __post_init__(self) -> None:
        choices = {
            "aggregation": ("mean", "min", "last", "product"),
            "std_mode": ("group", "batch"),
            "fusion": ("advantage", "reward"),
            "broadcast": ("trajectory", "turn"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"AdvantageConfig.{name}={getattr(self, name)!r}; expected one of {allowed}")
        if not self.a_max > 0:
            raise ValueError(f"AdvantageConfig.a_max must be > 0, got {self.a_max}")
        if not self.std_eps > 0:
            raise ValueError(f"AdvantageConfig.std_eps must be > 0, got {self.std_eps}")
        if not self.min_group_std >= 0:
            raise ValueError(f"AdvantageConfig.min_group_std must be >= 0, got {self.min_group_std}")
        if not math.isfinite(self.lambda_cc):
            raise ValueError(f"AdvantageConfig.lambda_cc must be finite, got {self.lambda_cc}")


@dataclass
class AdvantageResult:
    """Advantages of one batch.

    Attributes:
        advantages: [B, G, K] float32; 0 wherever ``valid`` is False. Under trajectory broadcast equal along K.
        valid: [B, G, K] bool; True where the sample gets gradient (trajectory fully scored, its group has >= 2
            valid trajectories and passed the ``min_group_std`` filter).
        trajectory_valid: [B, G] bool; every turn of the trajectory was scored (before any group filter).
        rewards: [B, G] float32; fused aggregated raw reward R^IF + lambda_cc * R^CC; NaN for invalid trajectories.
        rewards_if: [B, G] float32; aggregated IF reward (product: on [0, 1]); NaN for invalid trajectories.
        rewards_cc: [B, G] float32; aggregated CC reward; NaN for invalid trajectories.
        group_std: [B] float32; population std of ``rewards`` over the group's valid trajectories; NaN for groups
            with fewer than 2 valid trajectories.
        group_kept: [B, K] bool; the unit (group, or group and turn under turn broadcast) passed both filters.
    """

    advantages: torch.Tensor
    valid: torch.Tensor
    trajectory_valid: torch.Tensor
    rewards: torch.Tensor
    rewards_if: torch.Tensor
    rewards_cc: torch.Tensor
    group_std: torch.Tensor
    group_kept: torch.Tensor


def _check_inputs(if_scores: torch.Tensor, cc_scores: torch.Tensor, scored: torch.Tensor) -> None:
    if if_scores.ndim != 3:
        raise ValueError(f"if_scores must be [B, G, K], got shape {tuple(if_scores.shape)}")
    if cc_scores.shape != if_scores.shape or scored.shape != if_scores.shape:
        raise ValueError(
            f"if_scores {tuple(if_scores.shape)}, cc_scores {tuple(cc_scores.shape)} and scored "
            f"{tuple(scored.shape)} must have the same [B, G, K] shape"
        )
    if scored.dtype != torch.bool:
        raise TypeError(f"scored must be a bool tensor, got {scored.dtype}")
    if min(if_scores.shape) == 0:
        raise ValueError(f"empty score tensor of shape {tuple(if_scores.shape)}")
    for name, scores in (("if_scores", if_scores), ("cc_scores", cc_scores)):
        bad = scored & ~torch.isfinite(scores)
        if bad.any():
            where = [tuple(i) for i in bad.nonzero()[:5].tolist()]
            raise ValueError(
                f"{name} is not finite at scored positions (b, g, k) {where}: unscored entries must have "
                "scored=False"
            )


def _check_score_range(if_scores: torch.Tensor, cc_scores: torch.Tensor, scored: torch.Tensor) -> None:
    for name, scores in (("if_scores", if_scores), ("cc_scores", cc_scores)):
        bad = scored & ((scores < SCORE_MIN) | (scores > SCORE_MAX))
        if bad.any():
            where = [tuple(i) for i in bad.nonzero()[:5].tolist()]
            raise ValueError(
                f"{name} outside the judge scale [{SCORE_MIN}, {SCORE_MAX}] at (b, g, k) {where}; product "
                "aggregation maps (s - 1) / 4 and needs scores on that scale"
            )


def _aggregate(scores: torch.Tensor, aggregation: Aggregation) -> torch.Tensor:
    """scores: [B, G, K] float64 (finite) -> [B, G, 1]."""
    if aggregation == "mean":
        return scores.mean(dim=-1, keepdim=True)
    if aggregation == "min":
        return scores.amin(dim=-1, keepdim=True)
    if aggregation == "last":
        return scores[..., -1:]
    unit = (scores - SCORE_MIN) / (SCORE_MAX - SCORE_MIN)
    return unit.prod(dim=-1, keepdim=True)


def _masked_std(values: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Population std of ``values`` where ``mask`` over ``dims`` (keepdim); 0 where fewer than 1 entry."""
    weight = mask.to(values.dtype)
    count = weight.sum(dim=dims, keepdim=True).clamp(min=1.0)
    mean = (values * weight).sum(dim=dims, keepdim=True) / count
    var = ((values - mean) ** 2 * weight).sum(dim=dims, keepdim=True) / count
    return var.sqrt()


def _all_equal(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, G, U] values and mask -> [B, 1, U] bool: every masked value of the group is the same number."""
    high = torch.where(mask, values, torch.full_like(values, -math.inf)).amax(dim=1, keepdim=True)
    low = torch.where(mask, values, torch.full_like(values, math.inf)).amin(dim=1, keepdim=True)
    return high == low


def _normalise(
    rewards: torch.Tensor, mask: torch.Tensor, std_mode: str, std_eps: float, std_mask: torch.Tensor
) -> torch.Tensor:
    """Group-normalise [B, G, U] rewards over G where ``mask``; ``std_mask`` selects what the batch std sees.

    Returns [B, G, U] float64 with 0 outside ``mask`` and exactly 0 in groups whose masked values are all equal.
    """
    weight = mask.to(rewards.dtype)
    count = weight.sum(dim=1, keepdim=True).clamp(min=1.0)
    group_mean = (rewards * weight).sum(dim=1, keepdim=True) / count
    if std_mode == "group":
        std = _masked_std(rewards, mask, dims=(1,))
    else:
        std = _masked_std(rewards, std_mask, dims=(0, 1))
    advantages = (rewards - group_mean) / (std + std_eps)
    flat = _all_equal(rewards, mask)
    return torch.where(mask & ~flat, advantages, torch.zeros_like(advantages))


def _nan_mean(values: torch.Tensor) -> float:
    return float(values.mean()) if values.numel() else math.nan


def compute_advantages(
    if_scores: torch.Tensor,
    cc_scores: torch.Tensor,
    scored: torch.Tensor,
    config: AdvantageConfig,
) -> tuple[AdvantageResult, dict[str, float]]:
    """Advantages from per-turn judge scores (rules in the module docstring).

    Args:
        if_scores: [B, G, K] float, instruction following on [1, 5]; anything (NaN) where not scored.
        cc_scores: [B, G, K] float, content consistency on [1, 5]; anything (NaN) where not scored.
        scored: [B, G, K] bool, True where both scores of that turn exist.
        config: the advantage settings.

    Returns:
        (result, stats): ``AdvantageResult`` (advantages [B, G, K] float32, valid [B, G, K] bool, ...) and a dict
        of python floats keyed ``adv/...`` and ``reward/...``.
    """
    _check_inputs(if_scores, cc_scores, scored)
    if config.aggregation == "product" and config.broadcast == "trajectory":
        _check_score_range(if_scores, cc_scores, scored)
    batch, group, turns = if_scores.shape
    lam = config.lambda_cc

    trajectory_valid = scored.all(dim=-1)  # [B, G]
    # Unscored entries are replaced before any arithmetic so that their NaNs cannot leak anywhere.
    zeros = torch.zeros_like(if_scores, dtype=torch.float64)
    score_if = torch.where(trajectory_valid[..., None], if_scores.to(torch.float64), zeros)
    score_cc = torch.where(trajectory_valid[..., None], cc_scores.to(torch.float64), zeros)

    agg_if = _aggregate(score_if, config.aggregation)  # [B, G, 1]
    agg_cc = _aggregate(score_cc, config.aggregation)
    if config.broadcast == "trajectory":
        unit_if, unit_cc = agg_if, agg_cc  # [B, G, U=1]
    else:
        unit_if, unit_cc = score_if, score_cc  # [B, G, U=K]
    unit_fused = unit_if + lam * unit_cc
    num_units = unit_fused.shape[-1]

    member = trajectory_valid[..., None].expand(batch, group, num_units)  # [B, G, U]
    num_valid = member.sum(dim=1, keepdim=True)  # [B, 1, U]
    filled = num_valid >= 2
    unit_std = _masked_std(unit_fused, member, dims=(1,))  # [B, 1, U]
    kept = filled & (unit_std >= config.min_group_std)  # [B, 1, U]
    in_kept = member & kept  # trajectories that may get gradient and that the batch std sees

    if config.fusion == "advantage":
        raw = _normalise(unit_if, in_kept, config.std_mode, config.std_eps, in_kept)
        raw = raw + lam * _normalise(unit_cc, in_kept, config.std_mode, config.std_eps, in_kept)
    else:
        raw = _normalise(unit_fused, in_kept, config.std_mode, config.std_eps, in_kept)
    clipped = raw.clamp(-config.a_max, config.a_max)

    advantages = clipped.expand(batch, group, turns) if num_units == 1 else clipped
    valid = in_kept.expand(batch, group, turns) if num_units == 1 else in_kept
    advantages = torch.where(valid, advantages, torch.zeros_like(advantages)).to(torch.float32).contiguous()
    valid = valid.contiguous()

    nan = torch.full_like(agg_if[..., 0], math.nan)
    rewards_if = torch.where(trajectory_valid, agg_if[..., 0], nan)
    rewards_cc = torch.where(trajectory_valid, agg_cc[..., 0], nan)
    rewards = rewards_if + lam * rewards_cc
    traj_fused = torch.where(trajectory_valid, agg_if[..., 0] + lam * agg_cc[..., 0], torch.zeros_like(nan))
    group_std = _masked_std(traj_fused[..., None], trajectory_valid[..., None], dims=(1,))[:, 0, 0]
    group_std = torch.where(trajectory_valid.sum(dim=1) >= 2, group_std, torch.full_like(group_std, math.nan))

    result = AdvantageResult(
        advantages=advantages,
        valid=valid,
        trajectory_valid=trajectory_valid,
        rewards=rewards.to(torch.float32),
        rewards_if=rewards_if.to(torch.float32),
        rewards_cc=rewards_cc.to(torch.float32),
        group_std=group_std.to(torch.float32),
        group_kept=kept[:, 0, :].expand(batch, turns).contiguous(),
    )

    unit_adv = clipped[in_kept]
    zero_spread = _all_equal(unit_fused, member) & filled
    stats: dict[str, float] = {
        "adv/mean": _nan_mean(unit_adv),
        "adv/std": float(unit_adv.std(unbiased=False)) if unit_adv.numel() else math.nan,
        "adv/abs_mean": _nan_mean(unit_adv.abs()),
        "adv/frac_clipped": _nan_mean((raw[in_kept].abs() > config.a_max).to(torch.float64)),
        "adv/frac_valid": float(valid.to(torch.float64).mean()),
        "reward/frac_zero_std": float(zero_spread.sum()) / max(int(filled.sum()), 1)
        if filled.any()
        else math.nan,
        "reward/frac_dropped_groups": 1.0 - float(kept.to(torch.float64).mean()),
        "reward/frac_unscored": 1.0 - float(trajectory_valid.to(torch.float64).mean()),
        "reward/if_mean": _nan_mean(agg_if[..., 0][trajectory_valid]),
        "reward/cc_mean": _nan_mean(agg_cc[..., 0][trajectory_valid]),
        "reward/mean": _nan_mean(rewards[trajectory_valid]),
        "reward/group_std_mean": _nan_mean(unit_std[filled]),
    }
    for k in range(turns):
        stats[f"reward/if_turn{k + 1}"] = _nan_mean(score_if[..., k][trajectory_valid])
        stats[f"reward/cc_turn{k + 1}"] = _nan_mean(score_cc[..., k][trajectory_valid])
    return result, stats
