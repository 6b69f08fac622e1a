"""Evaluation report files: ``report.json``, a Markdown table, per-turn curve plots and an image grid of chains.

The report is built from ``EvalMetrics`` (``mtflow.eval.metrics``), one per *condition*: the evaluated model, the
base model, the single-turn-merged baseline (kind ``single_turn_merged``, one turn: all K instructions in one
edit), ... ``report.json`` is the run-folder contract the sweep collector reads (``<run>/eval/report.json``)::

    {"format": "mtflow.eval.report/1", "primary": "model",
     "conditions": {"model": {EvalMetrics.to_dict()}, "base": {...}, "merged": {...}},
     "comparisons": {"model-base": {PairedDifference.to_dict()}, ...}, "info": {...}}

NaN is written as ``null`` (strict JSON). Plots use matplotlib's object API (no pyplot global state); the grid is
drawn with PIL so that its pixels are exactly the images given.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont, ImageOps

from mtflow.eval.metrics import SINGLE_TURN_MERGED, Estimate, EvalMetrics, PairedDifference
from mtflow.reward.base import ScoreBatch, ScoringItem

REPORT_FORMAT = "mtflow.eval.report/1"
REPORT_JSON = "report.json"
REPORT_MARKDOWN = "report.md"
CURVES_PNG = "turn_curves.png"
GRID_PNG = "chains.png"

# (metric attribute, axis title) of the four per-turn panels.
CURVE_PANELS = (
    ("cumulative_success", "cumulative success C_k (%)"),
    ("consistency", "consistency CC_k (0-100)"),
    ("overall", "overall O_k = sqrt(C_k * CC_k)"),
    ("marginal_success", "marginal success M_k (%)"),
)


@dataclass
class EvalReport:
    """Everything one evaluation produced.

    Attributes:
        conditions: name -> metrics, e.g. ``{"model": ..., "base": ..., "merged": ...}``.
        primary: the condition whose final O_K is the run's headline (the sweep collector reads it).
        comparisons: name -> paired last-turn differences, e.g. ``{"model-base": ..., "model-merged": ...}``.
        info: free-form JSON facts (manifest, checkpoint, judge, seeds, ...).
    """

    conditions: dict[str, EvalMetrics]
    primary: str = "model"
    comparisons: dict[str, PairedDifference] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.primary not in self.conditions:
            raise ValueError(f"primary condition {self.primary!r} not among {list(self.conditions)}")

    @property
    def final_overall(self) -> float:
        """The primary condition's O at its last turn."""
        return self.conditions[self.primary].final_overall

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": REPORT_FORMAT,
            "primary": self.primary,
            "final_overall": _nullable(self.final_overall),
            "conditions": {name: metrics.to_dict() for name, metrics in self.conditions.items()},
            "comparisons": {name: diff.to_dict() for name, diff in self.comparisons.items()},
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalReport:
        if data.get("format") != REPORT_FORMAT:
            raise ValueError(
                f"not an mtflow evaluation report (format {data.get('format')!r}, expected {REPORT_FORMAT!r})"
            )
        return cls(
            conditions={name: EvalMetrics.from_dict(m) for name, m in data["conditions"].items()},
            primary=data["primary"],
            comparisons={
                name: PairedDifference.from_dict(d) for name, d in data.get("comparisons", {}).items()
            },
            info=dict(data.get("info", {})),
        )


@dataclass
class ReportFiles:
    """Paths written by ``write_report`` (``grid`` is None when no chains were given)."""

    json: Path
    markdown: Path
    curves: Path
    grid: Path | None = None


def _nullable(value: float) -> float | None:
    return None if math.isnan(value) else value


def read_report(path: str | Path) -> EvalReport:
    """Load a ``report.json`` (or the folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_JSON
    with path.open("r", encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
    try:
        return EvalReport.from_dict(data)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: malformed evaluation report ({type(error).__name__}: {error})") from error


def format_estimate(estimate: Estimate, digits: int = 1) -> str:
    """``value [low, high]``; ``n/a`` for an undefined value; no brackets when there is no interval."""
    if math.isnan(estimate.value):
        return "n/a"
    text = f"{estimate.value:.{digits}f}"
    if not (math.isnan(estimate.ci_low) or math.isnan(estimate.ci_high)):
        text += f" [{estimate.ci_low:.{digits}f}, {estimate.ci_high:.{digits}f}]"
    return text


def render_markdown(report: EvalReport) -> str:
    """The report as Markdown: a summary table (one row per condition), per-turn tables, comparisons."""
    primary = report.conditions[report.primary]
    lines = [
        "# Evaluation report",
        "",
        f"Primary condition: `{report.primary}`. Success: IF >= {primary.threshold:g} (judge scale 1-5). "
        f"Rates in %, CC in [0, 100], O_k = sqrt(C_k * CC_k). Brackets: {primary.confidence:.0%} percentile "
        f"bootstrap intervals over chains ({primary.num_bootstrap} resamples, seed {primary.seed}). Chains with an "
        "unscored turn are dropped from every turn.",
        "",
        "| condition | kind | turns | chains scored | dropped | C_K | CC_K | O_K | exposure bias M_1 - M_K |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in report.conditions.items():
        bias = "n/a" if m.num_turns == 1 else format_estimate(m.exposure_bias)
        lines.append(
            f"| {name} | {m.kind} | {m.num_turns} | {m.num_scored_chains} | {m.num_dropped_chains} | "
            f"{format_estimate(m.cumulative_success[-1])} | {format_estimate(m.consistency[-1])} | "
            f"{format_estimate(m.overall[-1])} | {bias} |"
        )
    for name, m in report.conditions.items():
        lines += [
            "",
            f"## {name}",
            "",
            "| turn | mean IF (1-5) | success % | C_k % | CC_k | O_k | M_k % |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for turn in range(m.num_turns):
            lines.append(
                f"| {turn + 1} | {format_estimate(m.mean_if[turn], 2)} | {format_estimate(m.success_rate[turn])} | "
                f"{format_estimate(m.cumulative_success[turn])} | {format_estimate(m.consistency[turn])} | "
                f"{format_estimate(m.overall[turn])} | {format_estimate(m.marginal_success[turn])} |"
            )
    if report.comparisons:
        lines += [
            "",
            "## Paired comparisons (last turn of each side, same chains)",
            "",
            "| comparison | chains | delta O | delta C | delta CC |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, diff in report.comparisons.items():
            lines.append(
                f"| {name} | {diff.num_chains} | {format_estimate(diff.overall)} | "
                f"{format_estimate(diff.cumulative_success)} | {format_estimate(diff.consistency)} |"
            )
    return "\n".join(lines) + "\n"


def make_turn_curves_figure(report: EvalReport) -> Figure:
    """Four panels (C_k, CC_k, O_k, M_k against turn k), one line per multi-turn condition with its bootstrap
    band; a single-turn-merged condition is one marker at the primary condition's last turn (not on M_k).

    Each plotted line carries its condition name as ``label`` (the tests read the plotted values back).
    """
    figure = Figure(figsize=(10, 7.5), layout="constrained")
    axes = figure.subplots(2, 2).ravel()
    last_turn = report.conditions[report.primary].num_turns
    for ax, (attribute, title) in zip(axes, CURVE_PANELS):
        for name, metrics in report.conditions.items():
            estimates = getattr(metrics, attribute)
            if metrics.kind == SINGLE_TURN_MERGED:
                if attribute == "marginal_success":
                    continue
                ax.plot(
                    [last_turn],
                    [estimates[-1].value],
                    linestyle="none",
                    marker="*",
                    markersize=12,
                    label=name,
                )
                continue
            turns = list(range(1, metrics.num_turns + 1))
            (line,) = ax.plot(turns, [e.value for e in estimates], marker="o", label=name)
            lows, highs = [e.ci_low for e in estimates], [e.ci_high for e in estimates]
            if not any(math.isnan(v) for v in lows + highs):
                ax.fill_between(turns, lows, highs, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(title)
        ax.set_xlabel("turn k")
        ax.set_xticks(range(1, last_turn + 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return figure


BEFORE_LABEL, AFTER_LABEL = "before RL", "after RL"


def make_before_after_figure(before: EvalReport, after: EvalReport, condition: str = "model") -> Figure:
    """``make_turn_curves_figure`` of one condition before and after RL on the same axes: C_k, CC_k, O_k and M_k
    against turn k, each with its bootstrap band (lines labelled ``before RL`` / ``after RL``)."""
    combined = EvalReport(
        conditions={BEFORE_LABEL: before.conditions[condition], AFTER_LABEL: after.conditions[condition]},
        primary=AFTER_LABEL,
    )
    figure = make_turn_curves_figure(combined)
    figure.suptitle(
        f"held-out chains before and after RL ({after.conditions[condition].num_scored_chains} chains)"
    )
    return figure


def before_after_rows(
    before: EvalReport, after: EvalReport, condition: str = "model"
) -> tuple[list[str], list[list[Any]]]:
    """The before/after table as columns and rows (per turn: C_k, CC_k, O_k, M_k before and after, rounded to
    0.1; None where undefined), for loggers that take tables."""
    a, b = before.conditions[condition], after.conditions[condition]
    columns = ["turn"]
    for name in ("C_k", "CC_k", "O_k", "M_k"):
        columns += [f"{name} before", f"{name} after"]
    rows = []
    for k in range(a.num_turns):
        row: list[Any] = [k + 1]
        for attribute in ("cumulative_success", "consistency", "overall", "marginal_success"):
            for metrics in (a, b):
                value = getattr(metrics, attribute)[k].value
                row.append(None if math.isnan(value) else round(value, 1))
        rows.append(row)
    return columns, rows


def _caption_font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType: fixed bitmap font
        return ImageFont.load_default()


def chain_grid_captions(
    item: ScoringItem, scores: ScoreBatch | None, row: int, *, wrap_width: int, caption_lines: int
) -> list[list[str]]:
    """Caption lines of one grid row: ``[source line], [turn 1 lines], ...``. With scores, a turn's first line is
    ``IF x  CC y`` (or ``unscored``), then its instruction wrapped to ``wrap_width`` characters; at most
    ``caption_lines`` lines, the last cut with ``...``."""
    captions: list[list[str]] = [[f"source {item.chain_id}"]]
    for turn, instruction in enumerate(item.instructions):
        lines = textwrap.wrap(f"{turn + 1}. {instruction}", wrap_width) or [f"{turn + 1}."]
        if scores is not None:  # scores first, so a long instruction never hides them
            if bool(scores.scored[row, turn]):
                score_line = (
                    f"IF {float(scores.instruction_following[row, turn]):.2f}  "
                    f"CC {float(scores.content_consistency[row, turn]):.2f}"
                )
            else:
                score_line = "unscored"
            lines.insert(0, score_line)
        if len(lines) > caption_lines:
            lines = lines[:caption_lines]
            lines[-1] = lines[-1][: max(0, wrap_width - 3)] + "..."
        captions.append(lines)
    return captions


def chain_grid(
    items: Sequence[ScoringItem],
    scores: ScoreBatch | None = None,
    *,
    max_chains: int = 4,
    cell_size: int = 192,
    font_size: int = 11,
    caption_lines: int = 4,
    padding: int = 6,
) -> tuple[Image.Image, dict[tuple[int, int], tuple[int, int, int, int]]]:
    """A grid image: one row per chain (source, turn 1..K), each image captioned with its instruction and, when
    ``scores`` is given, its IF / CC (``unscored`` where the judge gave none).

    Args:
        items: trajectories to show (the first ``max_chains``).
        scores: optional scores of ``items`` (row i = item i).
        max_chains: rows in the grid.
        cell_size: each image is fitted (aspect kept, centred) into a square of this many pixels.
        font_size: caption font size in pixels.
        caption_lines: caption lines under each image (longer instructions are cut with an ellipsis).
        padding: pixels between cells.

    Returns:
        The grid, and (row, column) -> (left, top, right, bottom) box of each image cell in it.
    """
    if not items:
        raise ValueError("a chain grid needs at least one item")
    shown = list(items[:max_chains])
    columns = 1 + max(item.num_turns for item in shown)
    font = _caption_font(font_size)
    line_height = font_size + 3
    caption_height = caption_lines * line_height + 2
    cell_width, cell_height = cell_size + padding, cell_size + caption_height + padding
    grid = Image.new("RGB", (columns * cell_width + padding, len(shown) * cell_height + padding), "white")
    draw = ImageDraw.Draw(grid)
    wrap_width = max(8, int(cell_size / (0.55 * font_size)))
    boxes: dict[tuple[int, int], tuple[int, int, int, int]] = {}

    for row, item in enumerate(shown):
        captions = chain_grid_captions(item, scores, row, wrap_width=wrap_width, caption_lines=caption_lines)
        for column, (image, caption) in enumerate(zip([item.source, *item.outputs], captions)):
            left = padding + column * cell_width
            top = padding + row * cell_height
            # magnify with NEAREST so a small image's pixels (a toy world's edges) stay visible; shrink smoothly
            magnify = max(image.size) <= cell_size
            resample = Image.Resampling.NEAREST if magnify else Image.Resampling.BICUBIC
            fitted = ImageOps.contain(image.convert("RGB"), (cell_size, cell_size), method=resample)
            offset = ((cell_size - fitted.width) // 2, (cell_size - fitted.height) // 2)
            grid.paste(fitted, (left + offset[0], top + offset[1]))
            boxes[(row, column)] = (
                left + offset[0],
                top + offset[1],
                left + offset[0] + fitted.width,
                top + offset[1] + fitted.height,
            )
            for index, text in enumerate(caption):
                draw.text((left, top + cell_size + 2 + index * line_height), text, fill="black", font=font)
    return grid, boxes


def save_chain_grid(
    path: str | Path, items: Sequence[ScoringItem], scores: ScoreBatch | None = None, **options: Any
) -> dict[tuple[int, int], tuple[int, int, int, int]]:
    """Save ``chain_grid(items, scores, **options)`` as a PNG at ``path``; returns its cell boxes."""
    grid, boxes = chain_grid(items, scores, **options)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return boxes


def write_report(
    out_dir: str | Path,
    report: EvalReport,
    *,
    grid_items: Sequence[ScoringItem] | None = None,
    grid_scores: ScoreBatch | None = None,
    max_grid_chains: int = 4,
) -> ReportFiles:
    """Write ``report.json``, ``report.md``, ``turn_curves.png`` and (given items) ``chains.png`` into ``out_dir``.

    Args:
        out_dir: folder to write into (created); a run's evaluation goes to ``<run>/eval``.
        report: the metrics of every condition.
        grid_items: trajectories to show in the image grid (e.g. the primary model's first chains).
        grid_scores: their scores, for the captions.
        max_grid_chains: rows of the image grid.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(
        json=out_dir / REPORT_JSON, markdown=out_dir / REPORT_MARKDOWN, curves=out_dir / CURVES_PNG
    )
    files.json.write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    files.markdown.write_text(render_markdown(report), encoding="utf-8")
    make_turn_curves_figure(report).savefig(files.curves, dpi=100)
    if grid_items:
        files.grid = out_dir / GRID_PNG
        save_chain_grid(files.grid, grid_items, grid_scores, max_chains=max_grid_chains)
    return files


__all__ = [
    "CURVES_PNG",
    "GRID_PNG",
    "REPORT_FORMAT",
    "REPORT_JSON",
    "REPORT_MARKDOWN",
    "AFTER_LABEL",
    "BEFORE_LABEL",
    "EvalReport",
    "ReportFiles",
    "before_after_rows",
    "chain_grid",
    "chain_grid_captions",
    "format_estimate",
    "make_before_after_figure",
    "make_turn_curves_figure",
    "read_report",
    "render_markdown",
    "save_chain_grid",
    "write_report",
]
