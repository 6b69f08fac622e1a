"""``mtflow runs gallery RUN``: one static HTML page per run (no server, no script, no network), readable on a
laptop: the held-out before/after table and chains side by side, the turn curves, every logged rollout iteration's
chains with their instructions and per-turn IF / CC, and the metric plots.

The page sits at ``<run>/gallery.html`` and points at the run's own image files with relative paths, so the folder
can be copied or zipped as it is. Every text from a run (instructions come from users and VLMs) is HTML-escaped.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from mtflow.workflow.runs import describe, read_metrics

METRICS_PNG = "gallery_metrics.png"
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; max-width: 1400px; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table.facts td { padding: 0.1rem 0.8rem 0.1rem 0; } table.numbers { border-collapse: collapse; }
table.numbers td, table.numbers th { border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: right; }
.chain { display: flex; gap: 0.4rem; margin: 0.6rem 0; align-items: flex-start; }
.pair { display: flex; gap: 2rem; flex-wrap: wrap; }
.turn { width: 140px; font-size: 0.75rem; }
.turn img { width: 140px; height: 140px; object-fit: contain; image-rendering: pixelated; background: #eee; }
.score { display: block; font-weight: 600; } .unscored { color: #a00; }
.label { font-size: 0.8rem; color: #555; } img.figure { max-width: 100%; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _chain_html(chain: dict[str, Any], base: str) -> str:
    """One chain: the source, then each turn's image with its IF / CC and instruction."""
    cells = [
        f'<div class="turn"><img src="{_e(base + chain["images"][0])}" alt="source"><span class="label">source '
        f"{_e(chain['chain_id'])}</span></div>"
    ]
    for k, turn in enumerate(chain["turns"], start=1):
        if turn["if"] is None:
            score = '<span class="score unscored">unscored</span>'
        else:
            score = f'<span class="score">IF {turn["if"]:.2f} · CC {turn["cc"]:.2f}</span>'
        cells.append(
            f'<div class="turn"><img src="{_e(base + chain["images"][k])}" alt="turn {k}">{score}'
            f"{k}. {_e(turn['instruction'])}</div>"
        )
    return f'<div class="chain" data-chain-id="{_e(chain["item_id"])}">{"".join(cells)}</div>'


def _metrics_figure(series: dict[str, list[tuple[int, float]]]) -> Figure | None:
    panels = [
        ("fused reward", [n for n in ("reward/mean",) if n in series]),
        ("instruction following by turn", sorted(n for n in series if n.startswith("reward/if_turn"))),
        ("consistency by turn", sorted(n for n in series if n.startswith("reward/cc_turn"))),
        ("policy", [n for n in ("policy/approx_kl", "policy/clip_frac", "adv/frac_valid") if n in series]),
    ]
    panels = [(title, names) for title, names in panels if names]
    if not panels:
        return None
    figure = Figure(figsize=(4.2 * len(panels), 3.2), layout="constrained")
    for ax, (title, names) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        for name in names:
            steps, values = zip(*series[name])
            ax.plot(steps, values, marker=".", label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    return figure


def _before_after_table(run: Path) -> str:
    path = run / "eval" / "before_after.json"
    if not path.is_file():
        return ""
    data = json.loads(path.read_text())
    sides = [data[s]["conditions"]["model"] for s in ("before", "after")]
    rows = ['<table class="numbers"><tr><th>turn</th>']
    rows += [f"<th>{name} {side}</th>" for name in ("C_k", "CC_k", "O_k") for side in ("before", "after")]
    rows.append("</tr>")
    for k in range(sides[0]["num_turns"]):
        cells = []
        for key in ("cumulative_success", "consistency", "overall"):
            for metrics in sides:
                value = metrics[key][k]["value"]
                cells.append("n/a" if value is None else f"{value:.1f}")
        rows.append(f"<tr><td>{k + 1}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "".join(rows) + "</table>"


def _read_chains(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text()).get("chains", []) if path.is_file() else []


def write_gallery(run: str | Path, output: str | Path | None = None) -> Path:
    """Write the run's page (default ``<run>/gallery.html``) and its metric plot; returns the page's path."""
    run = Path(run)
    page = Path(output) if output else run / "gallery.html"
    base = Path(_relative(run, page.parent))
    prefix = "" if str(base) == "." else base.as_posix() + "/"
    facts = describe(run)
    parts = [f"<h1>mtflow run {_e(run)}</h1>", '<table class="facts">']
    for key in (
        "status",
        "iteration",
        "wall_clock_s",
        "last_reward",
        "eval",
        "pretrained",
        "lora_rank",
        "algorithm",
        "judge",
        "error",
    ):
        if facts.get(key) is not None:
            value = facts[key]
            shown = f"{value:.3f}" if isinstance(value, float) else value
            parts.append(f"<tr><td>{_e(key.replace('_', ' '))}</td><td>{_e(shown)}</td></tr>")
    parts.append("</table>")

    before = _read_chains(run / "eval" / "heldout_before.json")
    after = _read_chains(run / "eval" / "heldout_after.json")
    table = _before_after_table(run)
    if table or before or after:
        parts += ["<h2>Held-out chains before and after RL</h2>", table]
        if (run / "eval" / "turn_curves.png").is_file():
            parts.append(
                f'<p><img class="figure" src="{_e(prefix)}eval/turn_curves.png" alt="turn curves"></p>'
            )
        for row in range(max(len(before), len(after))):
            sides = []
            for label, chains in (("before RL", before), ("after RL", after)):
                if row < len(chains):
                    sides.append(
                        f'<div><div class="label">{label}</div>{_chain_html(chains[row], prefix + "eval/")}</div>'
                    )
            parts.append(f'<div class="pair">{"".join(sides)}</div>')

    figure = _metrics_figure(read_metrics(run))
    if figure is not None:
        figure.savefig(run / METRICS_PNG, dpi=90)
        parts += [
            "<h2>Metrics</h2>",
            f'<p><img class="figure" src="{_e(prefix + METRICS_PNG)}" alt="metrics"></p>',
        ]

    rollouts = sorted((run / "images").glob("rollout_iter*.json"))
    if rollouts:
        parts.append("<h2>Rollouts</h2>")
    for path in rollouts:
        data = json.loads(path.read_text())
        parts.append(f'<h3 id="iter{data.get("iteration")}">iteration {_e(data.get("iteration"))}</h3>')
        parts += [_chain_html(chain, prefix + "images/") for chain in data.get("chains", [])]

    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
        f"<title>mtflow run {_e(run.name)}</title><style>{STYLE}</style></head><body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n",
        encoding="utf-8",
    )
    return page


def _relative(target: Path, start: Path) -> str:
    import os

    return os.path.relpath(target.resolve(), start.resolve())
