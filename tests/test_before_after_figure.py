"""The fit's held-out figure: before and after RL on the same axes, each with its bootstrap band, and the
before/after rows the loggers get."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtflow.eval.metrics import compute_eval_metrics
from mtflow.eval.report import (
    AFTER_LABEL,
    BEFORE_LABEL,
    EvalReport,
    before_after_rows,
    make_before_after_figure,
)

BEFORE_IF = torch.tensor([[5.0, 2.0, 5.0], [5.0, 5.0, 1.0], [1.0, 5.0, 5.0], [4.0, 4.0, 4.0]])
AFTER_IF = torch.tensor([[5.0, 5.0, 5.0], [5.0, 5.0, 1.0], [4.0, 5.0, 5.0], [4.0, 4.0, 4.0]])
CC = torch.full((4, 3), 4.0)  # 75 everywhere


def _report(if_scores):
    metrics = compute_eval_metrics(
        if_scores, CC, torch.ones(4, 3, dtype=torch.bool), num_bootstrap=50, seed=0
    )
    return EvalReport(conditions={"model": metrics})


def test_before_and_after_share_every_panel_with_their_bands():
    before, after = _report(BEFORE_IF), _report(AFTER_IF)
    figure = make_before_after_figure(before, after)
    axes = figure.axes
    assert len(axes) == 4
    # C_k by hand (IF >= 4): before, chains {0,1,3} pass turn 1, {1,3} turns 1-2, {3} all; after {all}, {all}, {0,2,3}
    expected_c = {BEFORE_LABEL: [75.0, 50.0, 25.0], AFTER_LABEL: [100.0, 100.0, 75.0]}
    lines = {line.get_label(): line for line in axes[0].get_lines()}
    for label, values in expected_c.items():
        assert list(lines[label].get_xdata()) == [1, 2, 3]
        assert list(lines[label].get_ydata()) == pytest.approx(values)
    for ax, attribute in zip(axes, ("cumulative_success", "consistency", "overall", "marginal_success")):
        labels = [line.get_label() for line in ax.get_lines()]
        assert labels == [BEFORE_LABEL, AFTER_LABEL]
        for line, report in zip(ax.get_lines(), (before, after)):
            assert list(line.get_ydata()) == pytest.approx(
                [e.value for e in getattr(report.conditions["model"], attribute)]
            )
    # one band per side on the C_k panel, spanning that side's bootstrap interval at each turn
    bands = axes[0].collections
    assert len(bands) == 2
    for band, report in zip(bands, (before, after)):
        vertices = band.get_paths()[0].vertices
        for turn, estimate in enumerate(report.conditions["model"].cumulative_success, start=1):
            ys = vertices[np.isclose(vertices[:, 0], turn), 1]
            assert ys.min() == pytest.approx(estimate.ci_low) and ys.max() == pytest.approx(estimate.ci_high)


def test_before_after_rows_are_the_per_turn_values_rounded():
    columns, rows = before_after_rows(_report(BEFORE_IF), _report(AFTER_IF))
    assert columns[:5] == ["turn", "C_k before", "C_k after", "CC_k before", "CC_k after"]
    assert rows[1][:5] == [2, 50.0, 100.0, 75.0, 75.0]
    assert len(rows) == 3
