"""EdiVal-style per-turn evaluation metrics (docs/design.md section 7) from judge scores, with bootstrap CIs.

Inputs are the judge's IF and CC on the 1-5 scale (``mtflow.reward.base``) for N chains and K turns, and the
``scored`` mask. Units (fixed here, used by every report):

- ``mean_if``: mean IF score on the judge's 1-5 scale.
- ``consistency`` CC_k: mean of ``(cc - 1) / 4 * 100``, in [0, 100].
- ``success_rate``: percent of chains whose turn-k IF >= ``threshold`` (4 by default), turn by turn.
- ``cumulative_success`` C_k: percent of chains whose turns 1..k *all* succeeded (all-or-nothing: a chain that
  fails turn 1 stays failed even if later turns succeed).
- ``overall`` O_k = sqrt(C_k * CC_k) with C_k in percent and CC_k in [0, 100], so O_k is in [0, 100]; this is
  EdiVal's convention (FLUX.1-Kontext-dev turn-3 O = 38.71 on EdiVal-Bench).
- ``marginal_success`` M_k = 100 * C_k / C_{k-1} with C_0 = 100 %, in percent; undefined (NaN) when C_{k-1} = 0.
- ``exposure_bias`` = M_1 - M_K in percentage points.

Unscored items: a chain with *any* unscored turn is dropped from *all* turns (so every turn's numbers describe
the same chains and C_k stays a proper all-or-nothing rate); the count is reported as ``num_dropped_chains``.
Nothing is ever imputed.

Confidence intervals: percentile bootstrap over chains (resample the kept chains with replacement, recompute
every metric, take the (1 - confidence) / 2 and 1 - (1 - confidence) / 2 quantiles, linear interpolation).
Seeded, so a report is reproducible. Resamples in which M_k is undefined are left out of M_k's interval.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mtflow.reward.base import SCORE_MAX, SCORE_MIN

MULTI_TURN = "multi_turn"
SINGLE_TURN_MERGED = "single_turn_merged"
PER_TURN_METRICS = (
    "mean_if",
    "consistency",
    "success_rate",
    "cumulative_success",
    "overall",
    "marginal_success",
)
_BOOTSTRAP_CHUNK = 256  # resamples per vectorised chunk (bounds memory for large N)
_SCALE_TOLERANCE = 1e-4


@dataclass
class Estimate:
    """A point estimate on all kept chains and its bootstrap confidence interval (NaN where undefined)."""

    value: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict[str, float | None]:
        return {key: (None if math.isnan(v) else v) for key, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Estimate:
        return cls(
            **{
                key: (math.nan if data.get(key) is None else float(data[key]))
                for key in ("value", "ci_low", "ci_high")
            }
        )


@dataclass
class EvalMetrics:
    """Per-turn evaluation of one condition (a model on a set of chains). Lists hold one ``Estimate`` per turn.

    Attributes:
        kind: ``multi_turn`` (K turns on the model's own outputs) or ``single_turn_merged`` (all K instructions
            joined into one edit, so one turn).
        num_turns: K of this condition.
        num_chains: chains given.
        num_scored_chains: chains used (every turn scored).
        num_dropped_chains: chains dropped because at least one turn was unscored.
        threshold: IF score counted as a success (>=).
        confidence, num_bootstrap, seed: the bootstrap settings.
        mean_if, consistency, success_rate, cumulative_success, overall, marginal_success: per turn, units in the
            module docstring.
        exposure_bias: M_1 - M_K in percentage points.
    """

    kind: str
    num_turns: int
    num_chains: int
    num_scored_chains: int
    num_dropped_chains: int
    threshold: float
    confidence: float
    num_bootstrap: int
    seed: int
    mean_if: list[Estimate]
    consistency: list[Estimate]
    success_rate: list[Estimate]
    cumulative_success: list[Estimate]
    overall: list[Estimate]
    marginal_success: list[Estimate]
    exposure_bias: Estimate

    @property
    def final_overall(self) -> float:
        """O at the last turn (the headline number of an EdiVal-style report)."""
        return self.overall[-1].value

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN written as null)."""
        data: dict[str, Any] = {
            key: getattr(self, key)
            for key in (
                "kind",
                "num_turns",
                "num_chains",
                "num_scored_chains",
                "num_dropped_chains",
                "threshold",
                "confidence",
                "num_bootstrap",
                "seed",
            )
        }
        for name in PER_TURN_METRICS:
            data[name] = [estimate.to_dict() for estimate in getattr(self, name)]
        data["exposure_bias"] = self.exposure_bias.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalMetrics:
        fields = {key: data[key] for key in ("kind", "num_turns", "num_chains", "num_scored_chains")}
        fields.update(
            num_dropped_chains=data["num_dropped_chains"],
            threshold=float(data["threshold"]),
            confidence=float(data["confidence"]),
            num_bootstrap=int(data["num_bootstrap"]),
            seed=int(data["seed"]),
        )
        for name in PER_TURN_METRICS:
            fields[name] = [Estimate.from_dict(item) for item in data[name]]
        fields["exposure_bias"] = Estimate.from_dict(data["exposure_bias"])
        return cls(**fields)

    def to_stats(self, prefix: str = "eval") -> dict[str, float]:
        """Flat slash-namespaced scalars for a logger, e.g. ``eval/overall_turn3``, ``eval/exposure_bias``,
        ``eval/overall_final`` (O at the last turn: the default metric of the W&B sweep file)."""
        stats = {
            f"{prefix}/num_scored_chains": float(self.num_scored_chains),
            f"{prefix}/num_dropped_chains": float(self.num_dropped_chains),
            f"{prefix}/exposure_bias": self.exposure_bias.value,
            f"{prefix}/overall_final": self.final_overall,
        }
        for name in PER_TURN_METRICS:
            for turn, estimate in enumerate(getattr(self, name), start=1):
                stats[f"{prefix}/{name}_turn{turn}"] = estimate.value
        return stats


def validate_scores(
    instruction_following: torch.Tensor, content_consistency: torch.Tensor, scored: torch.Tensor
) -> None:
    """Check shapes ([N, K] each), dtype of ``scored`` (bool) and that scored entries are finite and in [1, 5].

    Raises ValueError naming the first offending (item, turn).
    """
    shape = instruction_following.shape
    if len(shape) != 2 or content_consistency.shape != shape or scored.shape != shape:
        raise ValueError(
            f"scores must all be [N, K]: got IF {tuple(shape)}, CC {tuple(content_consistency.shape)}, "
            f"scored {tuple(scored.shape)}"
        )
    if scored.dtype != torch.bool:
        raise ValueError(f"scored must be a bool tensor, got {scored.dtype}")
    for name, values in (("IF", instruction_following), ("CC", content_consistency)):
        values = values.double()
        bad = scored & ~(
            torch.isfinite(values)
            & (values >= SCORE_MIN - _SCALE_TOLERANCE)
            & (values <= SCORE_MAX + _SCALE_TOLERANCE)
        )
        if bad.any():
            item, turn = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{name}[{item}, {turn}] = {values[item, turn].item()} is marked scored but is not a finite score "
                f"in [{SCORE_MIN}, {SCORE_MAX}] ({int(bad.sum())} such entries)"
            )


def per_turn_metrics(
    instruction_following: torch.Tensor, content_consistency: torch.Tensor, threshold: float = 4.0
) -> dict[str, torch.Tensor]:
    """The per-turn metrics of fully scored chains, batched over leading resample dims.

    Args:
        instruction_following: [..., N, K] IF on the 1-5 scale (no NaN: drop unscored chains first).
        content_consistency: [..., N, K] CC on the 1-5 scale.
        threshold: IF >= threshold counts as a successful turn.

    Returns:
        dict of float64 tensors: every name in ``PER_TURN_METRICS`` -> [..., K]; ``exposure_bias`` -> [...].
        Units as in the module docstring (percent / [0, 100]; ``mean_if`` on 1-5).
    """
    if_scores = instruction_following.double()
    cc_scores = content_consistency.double()
    success = if_scores >= threshold  # [..., N, K]
    all_so_far = torch.cummin(success.to(torch.int8), dim=-1).values.bool()  # all-or-nothing up to turn k
    cumulative = 100.0 * all_so_far.double().mean(dim=-2)  # [..., K]
    consistency = ((cc_scores - SCORE_MIN) / (SCORE_MAX - SCORE_MIN) * 100.0).mean(dim=-2)
    previous = torch.cat([torch.full_like(cumulative[..., :1], 100.0), cumulative[..., :-1]], dim=-1)
    marginal = torch.where(previous > 0, 100.0 * cumulative / previous.clamp_min(1e-300), math.nan)
    return {
        "mean_if": if_scores.mean(dim=-2),
        "consistency": consistency,
        "success_rate": 100.0 * success.double().mean(dim=-2),
        "cumulative_success": cumulative,
        "overall": torch.sqrt(cumulative * consistency),
        "marginal_success": marginal,
        "exposure_bias": marginal[..., 0] - marginal[..., -1],
    }


def bootstrap_indices(num_chains: int, num_bootstrap: int, seed: int) -> torch.Tensor:
    """Resample indices: [num_bootstrap, num_chains] int64, uniform with replacement, from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_chains, (num_bootstrap, num_chains), generator=generator)


def _bootstrap(
    tensors: list[torch.Tensor], statistic, num_bootstrap: int, seed: int
) -> dict[str, torch.Tensor]:
    """Apply ``statistic`` to chain-resampled copies of ``tensors`` ([N, ...] each); returns stacked [B, ...]."""
    num_chains = tensors[0].shape[0]
    indices = bootstrap_indices(num_chains, num_bootstrap, seed)
    chunks: dict[str, list[torch.Tensor]] = {}
    for start in range(0, num_bootstrap, _BOOTSTRAP_CHUNK):
        index = indices[start : start + _BOOTSTRAP_CHUNK]
        for key, value in statistic(*(t[index] for t in tensors)).items():
            chunks.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in chunks.items()}


def _interval(samples: torch.Tensor, confidence: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile interval over dim 0, ignoring NaN resamples: ([...], [...])."""
    alpha = (1.0 - confidence) / 2.0
    quantiles = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)
    bounds = torch.nanquantile(samples.double(), quantiles, dim=0)
    return bounds[0], bounds[1]


def _estimates(point: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> list[Estimate]:
    return [
        Estimate(float(p), float(lo), float(hi))
        for p, lo, hi in zip(point.tolist(), low.tolist(), high.tolist())
    ]


def compute_eval_metrics(
    instruction_following: torch.Tensor,
    content_consistency: torch.Tensor,
    scored: torch.Tensor,
    *,
    threshold: float = 4.0,
    num_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    kind: str = MULTI_TURN,
) -> EvalMetrics:
    """Per-turn EdiVal-style metrics with bootstrap CIs over chains.

    Args:
        instruction_following: [N, K] float, judge IF in [1, 5]; NaN where unscored.
        content_consistency: [N, K] float, judge CC in [1, 5]; NaN where unscored.
        scored: [N, K] bool, True where both IF and CC of the turn were scored.
        threshold: IF >= threshold counts as a successful turn (4 of 5 by default).
        num_bootstrap: bootstrap resamples (0 disables CIs: they are NaN).
        confidence: two-sided level of the percentile intervals.
        seed: seed of the resampling generator.
        kind: ``multi_turn`` or ``single_turn_merged`` (labels the condition in reports).

    Returns:
        EvalMetrics; all values NaN (and ``num_scored_chains`` 0) when no chain is fully scored.
    """
    validate_scores(instruction_following, content_consistency, scored)
    if kind not in (MULTI_TURN, SINGLE_TURN_MERGED):
        raise ValueError(f"kind must be {MULTI_TURN!r} or {SINGLE_TURN_MERGED!r}, got {kind!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    num_chains, num_turns = instruction_following.shape
    keep = scored.all(dim=1)
    if_kept = instruction_following.double()[keep]  # [N', K]
    cc_kept = content_consistency.double()[keep]
    num_kept = int(keep.sum())

    nan_turns = torch.full((num_turns,), math.nan, dtype=torch.float64)
    if num_kept == 0:
        point = {name: nan_turns for name in PER_TURN_METRICS}
        point["exposure_bias"] = torch.tensor(math.nan, dtype=torch.float64)
    else:
        point = per_turn_metrics(if_kept, cc_kept, threshold)
    if num_kept > 0 and num_bootstrap > 0:
        samples = _bootstrap(
            [if_kept, cc_kept], lambda a, b: per_turn_metrics(a, b, threshold), num_bootstrap, seed
        )
        bounds = {name: _interval(value, confidence) for name, value in samples.items()}
    else:
        bounds = {name: (torch.full_like(value, math.nan),) * 2 for name, value in point.items()}

    fields = {name: _estimates(point[name], *bounds[name]) for name in PER_TURN_METRICS}
    exposure = Estimate(
        float(point["exposure_bias"]), float(bounds["exposure_bias"][0]), float(bounds["exposure_bias"][1])
    )
    return EvalMetrics(
        kind=kind,
        num_turns=num_turns,
        num_chains=num_chains,
        num_scored_chains=num_kept,
        num_dropped_chains=num_chains - num_kept,
        threshold=float(threshold),
        confidence=float(confidence),
        num_bootstrap=int(num_bootstrap),
        seed=int(seed),
        exposure_bias=exposure,
        **fields,
    )


@dataclass
class PairedDifference:
    """Final-turn difference A - B between two conditions scored on the same chains (paired bootstrap).

    Attributes:
        num_chains: chains fully scored under both conditions (the others are dropped from both).
        overall, cumulative_success, consistency: A's last turn minus B's last turn, same units as EvalMetrics.
    """

    num_chains: int
    overall: Estimate
    cumulative_success: Estimate
    consistency: Estimate

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_chains": self.num_chains,
            **{key: getattr(self, key).to_dict() for key in ("overall", "cumulative_success", "consistency")},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PairedDifference:
        return cls(
            num_chains=int(data["num_chains"]),
            **{
                key: Estimate.from_dict(data[key]) for key in ("overall", "cumulative_success", "consistency")
            },
        )


def paired_final_difference(
    scores_a: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    scores_b: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    threshold: float = 4.0,
    num_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """Last-turn O, C and CC of condition A minus condition B on the same N chains, with a paired bootstrap.

    The conditions may have different K (e.g. multi-turn model [N, 3] vs single-turn-merged baseline [N, 1]):
    each side's own last turn is compared. Chains not fully scored on both sides are dropped from both.

    Args:
        scores_a: (IF [N, K_a], CC [N, K_a], scored [N, K_a] bool) of condition A, row i = chain i.
        scores_b: (IF [N, K_b], CC [N, K_b], scored [N, K_b] bool) of condition B, same chain order.
        threshold, num_bootstrap, confidence, seed: as in ``compute_eval_metrics``.
    """
    for scores in (scores_a, scores_b):
        validate_scores(*scores)
    if scores_a[0].shape[0] != scores_b[0].shape[0]:
        raise ValueError(
            f"paired conditions need the same chains: {scores_a[0].shape[0]} vs {scores_b[0].shape[0]}"
        )
    keep = scores_a[2].all(dim=1) & scores_b[2].all(dim=1)
    tensors = [scores_a[0][keep], scores_a[1][keep], scores_b[0][keep], scores_b[1][keep]]
    tensors = [t.double() for t in tensors]
    names = ("overall", "cumulative_success", "consistency")

    def difference(if_a, cc_a, if_b, cc_b):
        metrics_a = per_turn_metrics(if_a, cc_a, threshold)
        metrics_b = per_turn_metrics(if_b, cc_b, threshold)
        return {name: metrics_a[name][..., -1] - metrics_b[name][..., -1] for name in names}

    num_kept = int(keep.sum())
    if num_kept == 0:
        nan = Estimate(math.nan, math.nan, math.nan)
        return PairedDifference(0, nan, nan, nan)
    point = difference(*tensors)
    if num_bootstrap > 0:
        samples = _bootstrap(tensors, difference, num_bootstrap, seed)
        bounds = {name: _interval(samples[name], confidence) for name in names}
    else:
        bounds = {name: (torch.tensor(math.nan), torch.tensor(math.nan)) for name in names}
    return PairedDifference(
        num_chains=num_kept,
        **{
            name: Estimate(float(point[name]), float(bounds[name][0]), float(bounds[name][1]))
            for name in names
        },
    )


__all__ = [
    "MULTI_TURN",
    "PER_TURN_METRICS",
    "SINGLE_TURN_MERGED",
    "Estimate",
    "EvalMetrics",
    "PairedDifference",
    "bootstrap_indices",
    "compute_eval_metrics",
    "paired_final_difference",
    "per_turn_metrics",
    "validate_scores",
]
