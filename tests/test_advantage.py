"""Advantage computation: hand-computed cases for every mode, masking rules, and hypothesis properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtflow.advantage import AdvantageConfig, compute_advantages

EPS = 1e-4
NAN = math.nan


def scores(rows):
    """Nested lists [B][G][K] -> float64 tensor."""
    return torch.tensor(rows, dtype=torch.float64)


def all_scored(tensor):
    return torch.ones(tensor.shape, dtype=torch.bool)


def constant_like(tensor, value=3.0):
    return torch.full(tensor.shape, value, dtype=torch.float64)


def pop_std(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def normalised(values, std=None):
    """(v - mean) / (std + EPS) for a list of group values; std defaults to the group's population std."""
    mean = sum(values) / len(values)
    std = pop_std(values) if std is None else std
    return [(v - mean) / (std + EPS) for v in values]


# IF scores of one group of three trajectories over three turns, used by the aggregation cases.
IF_ROWS = [[[5, 4, 1], [3, 3, 3], [2, 5, 4]]]


@pytest.mark.parametrize(
    ("aggregation", "aggregated"),
    [
        ("mean", [10 / 3, 3.0, 11 / 3]),
        ("min", [1.0, 3.0, 2.0]),
        ("last", [1.0, 3.0, 4.0]),
        # (s - 1) / 4 then product over turns: 1 * 0.75 * 0, 0.5^3, 0.25 * 1 * 0.75
        ("product", [0.0, 0.125, 0.1875]),
    ],
)
def test_each_aggregation_matches_hand_computation(aggregation, aggregated):
    if_scores = scores(IF_ROWS)
    cc_scores = constant_like(if_scores)  # flat CC: contributes exactly 0
    config = AdvantageConfig(aggregation=aggregation)
    result, stats = compute_advantages(if_scores, cc_scores, all_scored(if_scores), config)
    expected = torch.tensor(normalised(aggregated), dtype=torch.float32)
    assert result.advantages.dtype == torch.float32
    for k in range(3):  # trajectory broadcast: the same value on every turn
        torch.testing.assert_close(result.advantages[0, :, k], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(result.rewards_if[0], torch.tensor(aggregated, dtype=torch.float32))
    assert result.valid.all()
    assert stats["adv/frac_valid"] == 1.0
    assert stats["reward/frac_zero_std"] == 0.0


def test_advantage_level_fusion_hand_computed():
    # IF means: 4, 2 -> +-1 / (1 + eps); CC means: 3, 5 -> -+1 / (1 + eps); A = A_IF + 0.3 A_CC.
    if_scores = scores([[[5, 3], [1, 3]]])
    cc_scores = scores([[[3, 3], [5, 5]]])
    result, stats = compute_advantages(if_scores, cc_scores, all_scored(if_scores), AdvantageConfig())
    a = 0.7 / (1 + EPS)
    torch.testing.assert_close(result.advantages[0], torch.tensor([[a, a], [-a, -a]]), rtol=1e-6, atol=1e-7)
    assert stats["adv/mean"] == pytest.approx(0.0, abs=1e-9)
    assert stats["adv/std"] == pytest.approx(a, rel=1e-6)
    assert stats["reward/if_mean"] == pytest.approx(3.0)
    assert stats["reward/cc_mean"] == pytest.approx(4.0)
    assert stats["reward/if_turn1"] == pytest.approx(3.0)
    assert stats["reward/if_turn2"] == pytest.approx(3.0)
    assert stats["reward/cc_turn2"] == pytest.approx(4.0)


def test_reward_level_fusion_hand_computed():
    # Fused rewards R = IF + 0.3 CC: 4 + 0.9 = 4.9 and 2 + 1.5 = 3.5; mean 4.2, std 0.7.
    if_scores = scores([[[5, 3], [1, 3]]])
    cc_scores = scores([[[3, 3], [5, 5]]])
    config = AdvantageConfig(fusion="reward")
    result, _ = compute_advantages(if_scores, cc_scores, all_scored(if_scores), config)
    a = 0.7 / (0.7 + EPS)
    torch.testing.assert_close(result.advantages[0, :, 0], torch.tensor([a, -a]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(result.rewards[0], torch.tensor([4.9, 3.5]))


def test_lambda_cc_weights_the_consistency_component():
    if_scores = scores([[[5], [1]]])
    cc_scores = scores([[[1], [5]]])  # CC disagrees with IF
    for lam in (0.0, 0.3, 1.0, 2.0):
        result, _ = compute_advantages(
            if_scores, cc_scores, all_scored(if_scores), AdvantageConfig(lambda_cc=lam)
        )
        expected = (1 - lam) / (2 + EPS) * 2  # each component: +-2 / (2 + eps)
        assert float(result.advantages[0, 0, 0]) == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_group_and_batch_std_modes_hand_computed():
    # Two groups of two: means 2 and 4.5; group stds 1 and 0.5; batch std of [1, 3, 4, 5] = sqrt(2.1875).
    if_scores = scores([[[1], [3]], [[4], [5]]])
    cc_scores = constant_like(if_scores)
    group, _ = compute_advantages(
        if_scores, cc_scores, all_scored(if_scores), AdvantageConfig(std_mode="group")
    )
    expected_group = torch.tensor([[-1 / (1 + EPS), 1 / (1 + EPS)], [-0.5 / (0.5 + EPS), 0.5 / (0.5 + EPS)]])
    torch.testing.assert_close(group.advantages[..., 0], expected_group, rtol=1e-6, atol=1e-7)

    batch, _ = compute_advantages(
        if_scores, cc_scores, all_scored(if_scores), AdvantageConfig(std_mode="batch")
    )
    std = math.sqrt(2.1875)
    assert pop_std([1, 3, 4, 5]) == pytest.approx(std)
    expected_batch = torch.tensor([[-1.0, 1.0], [-0.5, 0.5]]) / (std + EPS)
    torch.testing.assert_close(batch.advantages[..., 0], expected_batch, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(group.group_std, torch.tensor([1.0, 0.5]))


def test_turn_broadcast_gives_each_turn_its_own_advantage():
    # Trajectory means are equal (3 and 3) -> zero trajectory advantage; per turn the two disagree.
    if_scores = scores([[[5, 1], [1, 5]]])
    cc_scores = constant_like(if_scores)
    traj, _ = compute_advantages(if_scores, cc_scores, all_scored(if_scores), AdvantageConfig())
    assert torch.equal(traj.advantages, torch.zeros_like(traj.advantages))
    turn, stats = compute_advantages(
        if_scores, cc_scores, all_scored(if_scores), AdvantageConfig(broadcast="turn")
    )
    a = 2 / (2 + EPS)
    torch.testing.assert_close(turn.advantages[0], torch.tensor([[a, -a], [-a, a]]), rtol=1e-6, atol=1e-7)
    assert stats["reward/frac_zero_std"] == 0.0


def test_turn_broadcast_with_batch_std_uses_each_turns_batch_std():
    # Turn 1 values [1, 3, 4, 5] (batch std sqrt(2.1875)); turn 2 values [2, 2, 1, 5] (group 0 flat).
    if_scores = scores([[[1, 2], [3, 2]], [[4, 1], [5, 5]]])
    cc_scores = constant_like(if_scores)
    config = AdvantageConfig(broadcast="turn", std_mode="batch")
    result, _ = compute_advantages(if_scores, cc_scores, all_scored(if_scores), config)
    std1 = pop_std([1, 3, 4, 5])
    std2 = pop_std([2, 2, 1, 5])
    expected = torch.tensor(
        [
            [[-1 / (std1 + EPS), 0.0], [1 / (std1 + EPS), 0.0]],
            [[-0.5 / (std1 + EPS), -2 / (std2 + EPS)], [0.5 / (std1 + EPS), 2 / (std2 + EPS)]],
        ]
    )
    torch.testing.assert_close(result.advantages, expected, rtol=1e-6, atol=1e-7)


def test_clip_at_a_max():
    # 30 trajectories, one at 5 and 29 at 1: the outlier's advantage is sqrt(29) / (1 + eps / std) > 5.
    values = [5.0] + [1.0] * 29
    if_scores = scores([[[v] for v in values]])
    cc_scores = constant_like(if_scores)
    result, stats = compute_advantages(
        if_scores, cc_scores, all_scored(if_scores), AdvantageConfig(a_max=5.0)
    )
    raw = normalised(values)
    assert raw[0] > 5.0
    assert float(result.advantages[0, 0, 0]) == pytest.approx(5.0)
    assert float(result.advantages[0, 1, 0]) == pytest.approx(raw[1], rel=1e-6)
    assert stats["adv/frac_clipped"] == pytest.approx(1 / 30)
    tight, tight_stats = compute_advantages(
        if_scores, cc_scores, all_scored(if_scores), AdvantageConfig(a_max=0.1)
    )
    assert float(tight.advantages.max()) == pytest.approx(0.1)
    assert float(tight.advantages.min()) == pytest.approx(-0.1)
    assert tight_stats["adv/frac_clipped"] == 1.0


def test_unscored_trajectory_is_excluded_and_gets_no_gradient():
    if_scores = scores([[[5, 3], [1, 3], [NAN, 2]]])
    cc_scores = scores([[[3, 3], [5, 5], [NAN, 1]]])
    scored = torch.tensor([[[True, True], [True, True], [False, True]]])  # turn 2 scored, turn 1 not
    result, stats = compute_advantages(if_scores, cc_scores, scored, AdvantageConfig())
    a = 0.7 / (1 + EPS)  # identical to the two-trajectory case above
    torch.testing.assert_close(
        result.advantages[0], torch.tensor([[a, a], [-a, -a], [0.0, 0.0]]), rtol=1e-6, atol=1e-7
    )
    assert result.valid[0].tolist() == [[True, True], [True, True], [False, False]]
    assert result.trajectory_valid[0].tolist() == [True, True, False]
    assert math.isnan(float(result.rewards[0, 2]))
    assert stats["reward/frac_unscored"] == pytest.approx(1 / 3)
    assert stats["adv/frac_valid"] == pytest.approx(2 / 3)
    assert stats["reward/if_mean"] == pytest.approx(
        3.0
    )  # the unscored trajectory's turn-2 score 2 is not used


def test_group_with_fewer_than_two_scored_trajectories_gets_no_gradient():
    if_scores = scores([[[5], [1], [3]], [[5], [1], [2]]])
    cc_scores = constant_like(if_scores)
    scored = torch.tensor([[[True], [False], [False]], [[True], [True], [True]]])
    for std_mode in ("group", "batch"):
        result, stats = compute_advantages(if_scores, cc_scores, scored, AdvantageConfig(std_mode=std_mode))
        assert not result.valid[0].any()
        assert torch.equal(result.advantages[0], torch.zeros(3, 1))
        assert result.valid[1].all()
        assert stats["reward/frac_dropped_groups"] == 0.5
        assert math.isnan(float(result.group_std[0]))
    # The batch std only sees the second group: values [5, 1, 2].
    std = pop_std([5, 1, 2])
    torch.testing.assert_close(
        result.advantages[1, :, 0],
        torch.tensor([(v - 8 / 3) / (std + EPS) for v in (5, 1, 2)]),
        rtol=1e-6,
        atol=1e-7,
    )


def test_nothing_scored_gives_no_gradient_and_nan_stats():
    if_scores = torch.full((2, 3, 2), NAN)
    scored = torch.zeros(2, 3, 2, dtype=torch.bool)
    result, stats = compute_advantages(if_scores, if_scores.clone(), scored, AdvantageConfig())
    assert not result.valid.any()
    assert torch.equal(result.advantages, torch.zeros(2, 3, 2))
    assert math.isnan(stats["adv/mean"]) and math.isnan(stats["reward/if_mean"])
    assert stats["adv/frac_valid"] == 0.0
    assert stats["reward/frac_dropped_groups"] == 1.0


def test_min_group_std_drops_low_variance_groups():
    # Group 0: fused rewards 3.00 and 3.06 (std 0.03 < 0.05); group 1: 1 and 5.
    if_scores = scores([[[3.0], [3.06]], [[1.0], [5.0]]])
    cc_scores = constant_like(if_scores)
    kept_all, stats_all = compute_advantages(if_scores, cc_scores, all_scored(if_scores), AdvantageConfig())
    assert kept_all.valid.all() and stats_all["reward/frac_dropped_groups"] == 0.0
    assert float(kept_all.advantages[0, 1, 0]) == pytest.approx(0.03 / (0.03 + EPS), rel=1e-5)
    filtered, stats = compute_advantages(
        if_scores, cc_scores, all_scored(if_scores), AdvantageConfig(min_group_std=0.05)
    )
    assert filtered.valid[0].logical_not().all() and filtered.valid[1].all()
    assert torch.equal(filtered.advantages[0], torch.zeros(2, 1))
    assert filtered.group_kept.tolist() == [[False], [True]]
    assert stats["reward/frac_dropped_groups"] == 0.5
    assert stats["reward/group_std_mean"] == pytest.approx((0.03 + 2.0) / 2, rel=1e-6)


def test_zero_std_group_has_exactly_zero_advantage_and_is_counted():
    # 0.1 * 3 / 3 != 0.1 in floating point: the flat group must still give exactly 0.
    if_scores = scores([[[4.1], [4.1], [4.1]], [[1.0], [2.0], [5.0]]])
    cc_scores = scores([[[2.7], [2.7], [2.7]], [[3.0], [3.0], [3.0]]])
    for config in (AdvantageConfig(), AdvantageConfig(std_mode="batch"), AdvantageConfig(fusion="reward")):
        result, stats = compute_advantages(if_scores, cc_scores, all_scored(if_scores), config)
        assert torch.equal(result.advantages[0], torch.zeros(3, 1))
        assert result.valid[0].all()  # kept (min_group_std = 0) but contributes nothing
        assert stats["reward/frac_zero_std"] == 0.5


def test_bad_inputs_raise_clear_errors():
    good = torch.full((1, 2, 2), 3.0)
    scored = torch.ones(1, 2, 2, dtype=torch.bool)
    bad = good.clone()
    bad[0, 1, 0] = NAN
    with pytest.raises(ValueError, match=r"if_scores is not finite at scored positions .*\(0, 1, 0\)"):
        compute_advantages(bad, good, scored, AdvantageConfig())
    with pytest.raises(ValueError, match="same"):
        compute_advantages(good, good[:, :1], scored, AdvantageConfig())
    with pytest.raises(TypeError, match="bool"):
        compute_advantages(good, good, scored.float(), AdvantageConfig())
    out_of_scale = good.clone()
    out_of_scale[0, 0, 1] = 7.0
    with pytest.raises(ValueError, match="outside the judge scale"):
        compute_advantages(good, out_of_scale, scored, AdvantageConfig(aggregation="product"))
    with pytest.raises(ValueError, match="aggregation"):
        AdvantageConfig(aggregation="median")
    with pytest.raises(ValueError, match="a_max"):
        AdvantageConfig(a_max=0.0)


# ------------------------------------------------------------------------------------------ property tests

# Scores on a 0.25 grid and transforms by powers of two and grid shifts keep every value exact in floating
# point, so "equal" stays exactly equal; std_eps is tiny so that the std regulariser does not blur the
# invariance being tested.
GRID = st.integers(min_value=4, max_value=20).map(lambda i: i / 4)
PROPERTY_CONFIG = {"std_eps": 1e-9}


@st.composite
def score_batches(draw, max_groups=3, max_group=4, max_turns=3):
    b = draw(st.integers(1, max_groups))
    g = draw(st.integers(2, max_group))
    k = draw(st.integers(1, max_turns))
    shape = (b, g, k)
    size = b * g * k
    if_scores = torch.tensor(draw(st.lists(GRID, min_size=size, max_size=size)), dtype=torch.float64).reshape(
        shape
    )
    cc_scores = torch.tensor(draw(st.lists(GRID, min_size=size, max_size=size)), dtype=torch.float64).reshape(
        shape
    )
    scored = torch.tensor(draw(st.lists(st.booleans(), min_size=size, max_size=size))).reshape(shape)
    scored |= torch.rand(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))) < 0.7
    return if_scores, cc_scores, scored


MODES = st.fixed_dictionaries(
    {
        "aggregation": st.sampled_from(["mean", "min", "last"]),
        "std_mode": st.sampled_from(["group", "batch"]),
        "broadcast": st.sampled_from(["trajectory", "turn"]),
        "lambda_cc": st.sampled_from([0.0, 0.3, 1.0]),
    }
)


@settings(max_examples=60, deadline=None)
@given(
    batch=score_batches(),
    modes=MODES,
    component=st.sampled_from(["if", "cc"]),
    scale=st.sampled_from([0.25, 0.5, 2.0, 4.0]),
    shift=st.integers(-8, 8).map(lambda i: i / 4),
)
def test_advantage_fusion_is_invariant_to_affine_maps_of_one_component(batch, modes, component, scale, shift):
    if_scores, cc_scores, scored = batch
    config = AdvantageConfig(fusion="advantage", **modes, **PROPERTY_CONFIG)
    base, _ = compute_advantages(if_scores, cc_scores, scored, config)
    if component == "if":
        moved, _ = compute_advantages(if_scores * scale + shift, cc_scores, scored, config)
    else:
        moved, _ = compute_advantages(if_scores, cc_scores * scale + shift, scored, config)
    assert torch.equal(moved.valid, base.valid)
    torch.testing.assert_close(moved.advantages, base.advantages, rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(batch=score_batches(), modes=MODES, fusion=st.sampled_from(["advantage", "reward"]), data=st.data())
def test_group_with_equal_rewards_has_zero_advantage(batch, modes, fusion, data):
    if_scores, cc_scores, scored = batch
    flat_group = data.draw(st.integers(0, if_scores.shape[0] - 1))
    # Every trajectory of the group repeats trajectory 0's scores (per turn), so all its rewards are equal.
    if_scores[flat_group] = if_scores[flat_group, :1]
    cc_scores[flat_group] = cc_scores[flat_group, :1]
    config = AdvantageConfig(fusion=fusion, **modes, **PROPERTY_CONFIG)
    result, _ = compute_advantages(if_scores, cc_scores, scored, config)
    assert torch.equal(result.advantages[flat_group], torch.zeros_like(result.advantages[flat_group]))


@settings(max_examples=60, deadline=None)
@given(batch=score_batches(), modes=MODES, fusion=st.sampled_from(["advantage", "reward"]), data=st.data())
def test_masked_trajectories_never_change_the_others(batch, modes, fusion, data):
    if_scores, cc_scores, scored = batch
    config = AdvantageConfig(fusion=fusion, **modes, min_group_std=data.draw(st.sampled_from([0.0, 0.3])))
    base, base_stats = compute_advantages(if_scores, cc_scores, scored, config)
    junk = data.draw(st.sampled_from([-1e6, 0.0, 1e6]))
    # Replace every score of every not fully scored trajectory: NaN where unscored, finite junk on its scored turns.
    invalid = ~scored.all(dim=-1, keepdim=True).expand_as(scored)
    junk_scores = torch.where(scored, torch.full_like(if_scores, junk), torch.full_like(if_scores, NAN))
    changed, changed_stats = compute_advantages(
        torch.where(invalid, junk_scores, if_scores),
        torch.where(invalid, -junk_scores, cc_scores),
        scored,
        config,
    )
    assert torch.equal(changed.advantages, base.advantages)
    assert torch.equal(changed.valid, base.valid)
    assert not changed.valid[invalid].any()
    for key, value in base_stats.items():
        assert value == changed_stats[key] or (math.isnan(value) and math.isnan(changed_stats[key])), key


@settings(max_examples=40, deadline=None)
@given(batch=score_batches(max_groups=1), modes=MODES, fusion=st.sampled_from(["advantage", "reward"]))
def test_removing_masked_trajectories_leaves_the_others_unchanged(batch, modes, fusion):
    if_scores, cc_scores, scored = batch
    config = AdvantageConfig(fusion=fusion, **modes)
    base, _ = compute_advantages(if_scores, cc_scores, scored, config)
    keep = scored[0].all(dim=-1)
    if int(keep.sum()) == 0:
        return
    reduced, _ = compute_advantages(if_scores[:, keep], cc_scores[:, keep], scored[:, keep], config)
    torch.testing.assert_close(reduced.advantages, base.advantages[:, keep], rtol=1e-6, atol=1e-6)
    assert torch.equal(reduced.valid, base.valid[:, keep])
