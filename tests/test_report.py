"""Evaluation report files: JSON round trip, Markdown values, plotted values, and the image grid's pixels."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mtflow.eval.metrics import SINGLE_TURN_MERGED, compute_eval_metrics, paired_final_difference
from mtflow.eval.report import (
    EvalReport,
    chain_grid_captions,
    format_estimate,
    make_turn_curves_figure,
    read_report,
    render_markdown,
    save_chain_grid,
    write_report,
)
from mtflow.reward.base import ScoreBatch, ScoringItem

NAN = math.nan
MODEL_IF = torch.tensor([[5.0, 5.0, 5.0], [2.0, 5.0, 5.0], [4.0, 3.0, 4.0], [5.0, 4.0, 1.0], [5.0, NAN, 5.0]])
MODEL_CC = torch.tensor([[5.0, 5.0, 5.0], [3.0, 3.0, 3.0], [1.0, 1.0, 1.0], [5.0, 3.0, 1.0], [5.0, NAN, 5.0]])
BASE_IF = torch.tensor([[5.0, 2.0, 5.0], [5.0, 5.0, 5.0], [1.0, 5.0, 5.0], [4.0, 4.0, 4.0], [5.0, 5.0, 5.0]])
BASE_CC = torch.full((5, 3), 4.0)  # 75 everywhere
MERGED_IF = torch.tensor([[5.0], [1.0], [1.0], [4.0], [5.0]])
MERGED_CC = torch.tensor([[3.0], [3.0], [3.0], [3.0], [3.0]])  # 50


def _scored(*tensors):
    mask = torch.ones_like(tensors[0], dtype=torch.bool)
    for t in tensors:
        mask &= torch.isfinite(t)
    return mask


@pytest.fixture
def report():
    model = (MODEL_IF, MODEL_CC, _scored(MODEL_IF, MODEL_CC))
    base = (BASE_IF, BASE_CC, _scored(BASE_IF, BASE_CC))
    merged = (MERGED_IF, MERGED_CC, _scored(MERGED_IF, MERGED_CC))
    return EvalReport(
        conditions={
            "model": compute_eval_metrics(*model, num_bootstrap=200),
            "base": compute_eval_metrics(*base, num_bootstrap=200),
            "merged": compute_eval_metrics(*merged, num_bootstrap=200, kind=SINGLE_TURN_MERGED),
        },
        comparisons={
            "model-base": paired_final_difference(model, base, num_bootstrap=200),
            "model-merged": paired_final_difference(model, merged, num_bootstrap=200),
        },
        info={"manifest": "chains.jsonl"},
    )


def test_json_round_trip_and_headline(tmp_path, report):
    files = write_report(tmp_path / "eval", report)
    data = json.loads(files.json.read_text())  # strict JSON (NaN -> null) parses with the stdlib
    assert data["primary"] == "model"
    assert data["final_overall"] == pytest.approx(math.sqrt(25 * 37.5))
    restored = read_report(tmp_path / "eval")
    assert restored.to_dict() == report.to_dict()
    assert restored.final_overall == pytest.approx(math.sqrt(25 * 37.5))
    # Paired model - base on the 4 chains scored in both: base C_3 = chains b, d -> 50 %, CC 75.
    diff = restored.comparisons["model-base"]
    assert diff.num_chains == 4
    assert diff.cumulative_success.value == pytest.approx(25.0 - 50.0)
    assert diff.overall.value == pytest.approx(math.sqrt(25 * 37.5) - math.sqrt(50 * 75))


def test_read_report_rejects_other_json_naming_the_file(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(
        ValueError, match=r"report\.json: malformed evaluation report .*not an mtflow evaluation"
    ):
        read_report(path)


def _table_rows(markdown: str, heading: str) -> list[list[str]]:
    lines = markdown.splitlines()
    start = lines.index(heading)
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if line.startswith("| ") and not line.startswith("| ---"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[1:]  # drop the header row


def test_markdown_tables_carry_the_hand_computed_values(report):
    markdown = render_markdown(report)
    model_rows = _table_rows(markdown, "## model")
    assert [row[0] for row in model_rows] == ["1", "2", "3"]
    assert [row[3].split(" [")[0] for row in model_rows] == ["75.0", "50.0", "25.0"]  # C_k
    assert [row[4].split(" [")[0] for row in model_rows] == ["62.5", "50.0", "37.5"]  # CC_k
    assert [row[6].split(" [")[0] for row in model_rows] == ["75.0", "66.7", "50.0"]  # M_k
    assert model_rows[0][1].startswith("4.00 [")
    summary = {row[0]: row for row in _table_rows(markdown, "# Evaluation report")}
    assert summary["model"][3:5] == ["4", "1"]  # chains scored, dropped
    assert summary["model"][7].startswith("30.6 [") and summary["model"][8].startswith("25.0 [")
    assert summary["merged"][2] == "1" and summary["merged"][8] == "n/a"
    assert summary["merged"][5].startswith("60.0 [")  # merged C: chains a, d, e of 5
    comparisons = {
        row[0]: row
        for row in _table_rows(markdown, "## Paired comparisons (last turn of each side, same chains)")
    }
    assert comparisons["model-merged"][1] == "4" and comparisons["model-merged"][3].startswith("-25.0 [")


def test_format_estimate():
    from mtflow.eval.metrics import Estimate

    assert format_estimate(Estimate(1.234, 1.0, 1.5)) == "1.2 [1.0, 1.5]"
    assert format_estimate(Estimate(1.234, NAN, NAN), 2) == "1.23"
    assert format_estimate(Estimate(NAN, NAN, NAN)) == "n/a"


def test_curve_figure_plots_the_report_values(report):
    figure = make_turn_curves_figure(report)
    axes = figure.axes
    assert len(axes) == 4
    lines_c = {line.get_label(): line for line in axes[0].get_lines()}
    assert list(lines_c["model"].get_xdata()) == [1, 2, 3]
    assert list(lines_c["model"].get_ydata()) == pytest.approx([75.0, 50.0, 25.0])
    assert list(lines_c["base"].get_ydata()) == pytest.approx(
        [v.value for v in report.conditions["base"].cumulative_success]
    )
    assert list(lines_c["merged"].get_xdata()) == [3] and list(
        lines_c["merged"].get_ydata()
    ) == pytest.approx([60.0])
    lines_o = {line.get_label(): line for line in axes[2].get_lines()}
    assert list(lines_o["merged"].get_ydata()) == pytest.approx([math.sqrt(60 * 50)])
    lines_m = {line.get_label(): line for line in axes[3].get_lines()}
    assert "merged" not in lines_m and list(lines_m["model"].get_ydata()) == pytest.approx([75, 200 / 3, 50])
    assert len(axes[0].collections) == 2  # a bootstrap band per multi-turn condition


def _solid(color, size=(16, 16)):
    return Image.new("RGB", size, color)


def test_chain_grid_places_every_image_and_captions_it(tmp_path):
    colors = [
        [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)],
        [(0, 255, 255), (255, 0, 255), (90, 60, 30), (10, 200, 120)],
    ]
    items = [
        ScoringItem(
            item_id=f"c{row}/g0",
            chain_id=f"c{row}",
            source=_solid(colors[row][0], (32, 16) if row == 1 else (16, 16)),
            outputs=[_solid(c) for c in colors[row][1:]],
            instructions=["make the square red", "add a very long instruction " * 6, "remove it"],
        )
        for row in range(2)
    ]
    scores = ScoreBatch(
        instruction_following=torch.tensor([[5.0, 4.0, 1.0], [NAN, 3.0, 2.0]]),
        content_consistency=torch.tensor([[5.0, 4.5, 1.0], [NAN, 3.0, 2.0]]),
        scored=torch.tensor([[True, True, True], [False, True, True]]),
    )
    path = tmp_path / "grid.png"
    boxes = save_chain_grid(path, items, scores, cell_size=48, padding=4)
    grid = np.asarray(Image.open(path).convert("RGB"))
    assert len(boxes) == 8
    for (row, column), (left, top, right, bottom) in boxes.items():
        cell = grid[top:bottom, left:right]
        assert (cell == np.array(colors[row][column], dtype=np.uint8)).all(), (row, column)
        caption = grid[bottom + 1 : bottom + 40, left : left + 48]
        assert (caption < 128).any(), f"no caption text under cell {(row, column)}"
    left, top, right, bottom = boxes[(1, 0)]
    assert (right - left, bottom - top) == (48, 24)  # a 2:1 source keeps its aspect ratio
    assert boxes[(0, 0)][2] - boxes[(0, 0)][0] == 48

    with pytest.raises(ValueError, match="at least one item"):
        save_chain_grid(path, [])

    captions = chain_grid_captions(items[1], scores, 1, wrap_width=20, caption_lines=3)
    assert captions[0] == ["source c1"]
    assert captions[1] == ["unscored", "1. make the square", "red"]
    assert captions[2][0] == "IF 3.00  CC 3.00" and len(captions[2]) == 3 and captions[2][-1].endswith("...")
    assert len(captions[2][-1]) <= 20
    assert chain_grid_captions(items[0], None, 0, wrap_width=40, caption_lines=3)[3] == ["3. remove it"]


def test_write_report_writes_all_files(tmp_path, report):
    item = ScoringItem("c/g0", "c", _solid((1, 2, 3)), [_solid((4, 5, 6))] * 3, ["a", "b", "c"])
    files = write_report(tmp_path, report, grid_items=[item])
    for path in (files.json, files.markdown, files.curves, files.grid):
        assert path.is_file() and path.stat().st_size > 0
    assert Image.open(files.curves).size == (1000, 750)
    assert files.markdown.read_text() == render_markdown(report)
