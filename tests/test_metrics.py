"""EdiVal-style metrics on hand-made judge scores: every formula against a hand-computed example."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mtflow.eval.metrics import (
    SINGLE_TURN_MERGED,
    EvalMetrics,
    bootstrap_indices,
    compute_eval_metrics,
    paired_final_difference,
)

NAN = math.nan
# Five chains, three turns. b fails turn 1 and succeeds later; e has an unscored turn (dropped everywhere).
IF = torch.tensor(
    [
        [5.0, 5.0, 5.0],  # a
        [2.0, 5.0, 5.0],  # b
        [4.0, 3.0, 4.0],  # c
        [5.0, 4.0, 1.0],  # d
        [5.0, NAN, 5.0],  # e
    ]
)
CC = torch.tensor(
    [
        [5.0, 5.0, 5.0],  # 100 100 100
        [3.0, 3.0, 3.0],  # 50 50 50
        [1.0, 1.0, 1.0],  # 0 0 0
        [5.0, 3.0, 1.0],  # 100 50 0
        [5.0, NAN, 5.0],
    ]
)
SCORED = torch.isfinite(IF) & torch.isfinite(CC)


def values(estimates):
    return [e.value for e in estimates]


def test_hand_computed_example_threshold_4():
    m = compute_eval_metrics(IF, CC, SCORED, num_bootstrap=0)
    assert (m.num_chains, m.num_scored_chains, m.num_dropped_chains, m.num_turns) == (5, 4, 1, 3)
    assert values(m.mean_if) == pytest.approx([4.0, 4.25, 3.75])
    assert values(m.success_rate) == pytest.approx([75.0, 75.0, 75.0])  # a,c,d / a,b,d / a,b,c
    # All-or-nothing: b succeeds at turns 2 and 3 but stays failed; c fails at 2 and stays failed.
    assert values(m.cumulative_success) == pytest.approx([75.0, 50.0, 25.0])
    assert values(m.consistency) == pytest.approx([62.5, 50.0, 37.5])
    assert values(m.overall) == pytest.approx([math.sqrt(75 * 62.5), 50.0, math.sqrt(25 * 37.5)])
    assert values(m.marginal_success) == pytest.approx([75.0, 200.0 / 3.0, 50.0])
    assert m.exposure_bias.value == pytest.approx(25.0)
    assert m.final_overall == pytest.approx(30.618621784789724)
    assert math.isnan(m.overall[0].ci_low)  # no bootstrap -> no interval, never an invented one


def test_threshold_5_and_negative_exposure_bias():
    m = compute_eval_metrics(IF, CC, SCORED, threshold=5.0, num_bootstrap=0)
    assert values(m.success_rate) == pytest.approx([50.0, 50.0, 50.0])  # a,d / a,b / a,b
    assert values(m.cumulative_success) == pytest.approx([50.0, 25.0, 25.0])
    assert values(m.marginal_success) == pytest.approx([50.0, 50.0, 100.0])
    assert m.exposure_bias.value == pytest.approx(-50.0)


def test_unscored_turn_drops_the_chain_even_if_its_values_are_finite():
    scored = SCORED.clone()
    scored[0, 2] = False  # chain a: judge returned something but flagged it unscored
    m = compute_eval_metrics(IF, CC, scored, num_bootstrap=0)
    assert m.num_dropped_chains == 2 and m.num_scored_chains == 3
    # Remaining b, c, d: C1 = c,d = 2/3; C2 = d; C3 = none.
    assert values(m.cumulative_success) == pytest.approx([200 / 3, 100 / 3, 0.0])
    assert values(m.marginal_success) == pytest.approx([200 / 3, 50.0, 0.0])


def test_marginal_undefined_after_total_failure():
    if_scores = torch.tensor([[1.0, 5.0], [2.0, 5.0]])
    cc_scores = torch.full((2, 2), 3.0)
    m = compute_eval_metrics(if_scores, cc_scores, torch.ones(2, 2, dtype=torch.bool), num_bootstrap=50)
    assert values(m.cumulative_success) == [0.0, 0.0]
    assert m.marginal_success[0].value == 0.0 and math.isnan(m.marginal_success[1].value)
    assert math.isnan(m.exposure_bias.value)
    assert values(m.overall) == [0.0, 0.0] and values(m.consistency) == [50.0, 50.0]


def test_nothing_scored_gives_nan_not_zero():
    m = compute_eval_metrics(IF, CC, torch.zeros_like(SCORED), num_bootstrap=10)
    assert m.num_scored_chains == 0 and m.num_dropped_chains == 5
    assert all(math.isnan(v) for v in values(m.overall) + values(m.cumulative_success))


def test_bad_inputs_are_rejected_with_the_position():
    scored = SCORED.clone()
    scored[4, 1] = True  # NaN marked as scored
    with pytest.raises(ValueError, match=r"IF\[4, 1\] = nan is marked scored"):
        compute_eval_metrics(IF, CC, scored)
    out_of_scale = CC.clone()
    out_of_scale[2, 0] = 7.0
    with pytest.raises(ValueError, match=r"CC\[2, 0\] = 7.0"):
        compute_eval_metrics(IF, out_of_scale, SCORED)
    with pytest.raises(ValueError, match="must all be"):
        compute_eval_metrics(IF, CC[:, :2], SCORED)
    with pytest.raises(ValueError, match="bool"):
        compute_eval_metrics(IF, CC, SCORED.float())


def _reference_metrics(if_rows, cc_rows, threshold):
    """Plain-Python metrics of one resample (lists of per-chain lists), written independently of the module."""
    n, k = len(if_rows), len(if_rows[0])
    out = {"cumulative_success": [], "consistency": [], "overall": [], "marginal_success": []}
    previous = 100.0
    for turn in range(k):
        alive = sum(all(row[t] >= threshold for t in range(turn + 1)) for row in if_rows)
        c = 100.0 * alive / n
        cc = sum((row[turn] - 1.0) / 4.0 * 100.0 for row in cc_rows) / n
        out["cumulative_success"].append(c)
        out["consistency"].append(cc)
        out["overall"].append(math.sqrt(c * cc))
        out["marginal_success"].append(100.0 * c / previous if previous > 0 else math.nan)
        previous = c
    return out


def test_bootstrap_interval_matches_a_naive_loop_over_the_same_resamples():
    generator = torch.Generator().manual_seed(3)
    n, k = 37, 3
    if_scores = torch.randint(1, 6, (n, k), generator=generator).double()
    cc_scores = 1.0 + 4.0 * torch.rand((n, k), generator=generator, dtype=torch.float64)
    scored = torch.ones(n, k, dtype=torch.bool)
    m = compute_eval_metrics(if_scores, cc_scores, scored, num_bootstrap=300, confidence=0.9, seed=11)
    indices = bootstrap_indices(n, 300, 11).tolist()
    rows_if, rows_cc = if_scores.tolist(), cc_scores.tolist()
    resampled = [
        _reference_metrics([rows_if[i] for i in idx], [rows_cc[i] for i in idx], 4.0) for idx in indices
    ]
    for name in ("cumulative_success", "consistency", "overall", "marginal_success"):
        for turn in range(k):
            samples = np.array([r[name][turn] for r in resampled])
            samples = samples[~np.isnan(samples)]
            low, high = np.percentile(samples, [5.0, 95.0])
            estimate = getattr(m, name)[turn]
            assert estimate.ci_low == pytest.approx(low, abs=1e-9), (name, turn)
            assert estimate.ci_high == pytest.approx(high, abs=1e-9), (name, turn)
            assert estimate.ci_low <= estimate.value + 1e-9 or name == "marginal_success"


def test_bootstrap_width_matches_binomial_standard_error_and_is_seeded():
    n, p = 400, 0.3
    generator = torch.Generator().manual_seed(0)
    success = torch.rand(n, generator=generator) < p
    if_scores = torch.where(success, 5.0, 1.0)[:, None]
    cc_scores = torch.full((n, 1), 5.0)
    scored = torch.ones(n, 1, dtype=torch.bool)
    m = compute_eval_metrics(if_scores, cc_scores, scored, num_bootstrap=2000, seed=1)
    rate = m.success_rate[0].value / 100
    expected_half_width = 100 * 1.959964 * math.sqrt(rate * (1 - rate) / n)
    half_width = (m.success_rate[0].ci_high - m.success_rate[0].ci_low) / 2
    assert half_width == pytest.approx(expected_half_width, rel=0.12)
    again = compute_eval_metrics(if_scores, cc_scores, scored, num_bootstrap=2000, seed=1)
    assert again.success_rate[0] == m.success_rate[0]
    assert torch.equal(bootstrap_indices(n, 50, 1), bootstrap_indices(n, 50, 1))
    assert not torch.equal(bootstrap_indices(n, 50, 1), bootstrap_indices(n, 50, 2))


def test_identical_chains_give_a_zero_width_interval():
    if_scores = torch.tensor([[5.0, 3.0]]).repeat(20, 1)
    cc_scores = torch.tensor([[4.0, 2.0]]).repeat(20, 1)
    m = compute_eval_metrics(if_scores, cc_scores, torch.ones(20, 2, dtype=torch.bool), num_bootstrap=100)
    for estimate in m.overall + m.consistency + m.cumulative_success:
        assert estimate.ci_low == estimate.value == estimate.ci_high


def test_paired_difference_against_separate_metrics_and_zero_for_identical_conditions():
    generator = torch.Generator().manual_seed(5)
    n = 60
    a_if = torch.randint(1, 6, (n, 3), generator=generator).float()
    a_cc = torch.randint(1, 6, (n, 3), generator=generator).float()
    b_if = torch.randint(1, 6, (n, 1), generator=generator).float()  # single-turn-merged baseline
    b_cc = torch.randint(1, 6, (n, 1), generator=generator).float()
    a_scored = torch.ones(n, 3, dtype=torch.bool)
    b_scored = torch.ones(n, 1, dtype=torch.bool)
    b_scored[7] = False  # unscored on B: chain 7 leaves both sides
    diff = paired_final_difference((a_if, a_cc, a_scored), (b_if, b_cc, b_scored), num_bootstrap=200)
    keep = torch.arange(n) != 7
    ma = compute_eval_metrics(a_if[keep], a_cc[keep], a_scored[keep], num_bootstrap=0)
    mb = compute_eval_metrics(
        b_if[keep], b_cc[keep], b_scored[keep], num_bootstrap=0, kind=SINGLE_TURN_MERGED
    )
    assert diff.num_chains == n - 1
    assert diff.overall.value == pytest.approx(ma.overall[-1].value - mb.overall[-1].value)
    assert diff.cumulative_success.value == pytest.approx(
        ma.cumulative_success[-1].value - mb.cumulative_success[-1].value
    )
    assert diff.overall.ci_low < diff.overall.value < diff.overall.ci_high

    same = paired_final_difference((a_if, a_cc, a_scored), (a_if, a_cc, a_scored), num_bootstrap=200)
    assert (same.overall.value, same.overall.ci_low, same.overall.ci_high) == (0.0, 0.0, 0.0)


def test_json_round_trip_keeps_nan_as_null():
    m = compute_eval_metrics(
        torch.tensor([[1.0, 5.0]]), torch.tensor([[2.0, 3.0]]), torch.ones(1, 2, dtype=torch.bool)
    )
    text = json.dumps(m.to_dict(), allow_nan=False)  # strict JSON: NaN must have become null
    restored = EvalMetrics.from_dict(json.loads(text))
    assert math.isnan(restored.marginal_success[1].value)
    assert restored.consistency[1].value == m.consistency[1].value == 50.0
    assert restored.num_turns == 2 and restored.kind == "multi_turn"
    stats = m.to_stats()
    assert stats["eval/consistency_turn1"] == 25.0 and "eval/exposure_bias" in stats
    assert stats["eval/overall_final"] == stats["eval/overall_turn2"] == 0.0  # C_2 = 0: turn 1 failed
