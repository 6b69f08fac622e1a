"""Tables and figures of docs/ablations.md from the study's run folders (``tools/ablations.py report``).

Per run, the held-out scores after RL (``eval/heldout_scores.json``: every chain's per-turn IF and CC, judged by the
exact toy judge) give C_k, CC_k, O_k and M_k exactly as ``mtflow.eval.metrics`` computes them (checked against the
run's own ``before_after.json``). A difference to the reference cell is paired: within a seed both cells are
evaluated on the same chains with the same sampling noise, so the bootstrap resamples seeds, then chains within each
seed, the same chains for both cells.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from ablation_study import ABLATIONS, REFERENCE, Ablation, Cell

THRESHOLD = 4.0  # IF that counts as a successful turn (SUCCESS_THRESHOLD of the toy judge and the evaluation)
METRICS = ("C_3", "CC_3", "O_3", "M1-M3")


def chain_arrays(scores: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    """-> chain ids [N], IF [N, K], CC [N, K] (NaN where unscored)."""

    def array(rows: list) -> np.ndarray:
        return np.array([[math.nan if v is None else v for v in row] for row in rows], dtype=np.float64)

    return list(scores["chain_ids"]), array(scores["if"]), array(scores["cc"])


def metrics(if_scores: np.ndarray, cc_scores: np.ndarray) -> dict[str, np.ndarray]:
    """Per-turn C_k, CC_k, O_k, M_k (points) of the chains given (all scored)."""
    cumulative = 100.0 * np.cumprod(if_scores >= THRESHOLD, axis=1).mean(axis=0)
    consistency = ((cc_scores - 1.0) / 4.0 * 100.0).mean(axis=0)
    previous = np.concatenate([[100.0], cumulative[:-1]])
    with np.errstate(divide="ignore", invalid="ignore"):
        marginal = np.where(previous > 0, 100.0 * cumulative / previous, math.nan)
    return {"C": cumulative, "CC": consistency, "O": np.sqrt(cumulative * consistency), "M": marginal}


def headline(m: dict[str, np.ndarray]) -> dict[str, float]:
    return {"C_3": m["C"][-1], "CC_3": m["CC"][-1], "O_3": m["O"][-1], "M1-M3": m["M"][0] - m["M"][-1]}


def run_metrics(run: dict, when: str = "after") -> dict[str, float]:
    """Headline metrics of one run from its per-chain scores; checked against its ``before_after.json``."""
    _, if_s, cc_s = chain_arrays(run["scores"][when])
    keep = ~(np.isnan(if_s).any(axis=1) | np.isnan(cc_s).any(axis=1))
    m = metrics(if_s[keep], cc_s[keep])
    recorded = run["before_after"][when]["conditions"]["model"]
    for key, name in (("C", "cumulative_success"), ("CC", "consistency")):
        expected = [e["value"] for e in recorded[name]]
        if not np.allclose(m[key], expected, atol=1e-6):
            raise ValueError(
                f"{run['run']}: per-chain {name} {m[key]} differs from before_after.json {expected}"
            )
    return headline(m)


def paired_difference(
    cell_runs: dict[int, dict], ref_runs: dict[int, dict], rng: np.random.Generator, bootstrap: int
) -> dict[str, tuple[float, float, float]]:
    """Mean over shared seeds of (cell - reference) per headline metric, with a 95 % percentile CI from a
    two-level bootstrap (seeds, then the chains scored in both runs of a seed)."""
    seeds = sorted(set(cell_runs) & set(ref_runs))
    pairs = []
    for seed in seeds:
        ids_a, if_a, cc_a = chain_arrays(cell_runs[seed]["scores"]["after"])
        ids_b, if_b, cc_b = chain_arrays(ref_runs[seed]["scores"]["after"])
        if ids_a != ids_b:
            raise ValueError(f"seed {seed}: the cell and the reference were evaluated on different chains")
        keep = ~(
            np.isnan(if_a).any(1) | np.isnan(cc_a).any(1) | np.isnan(if_b).any(1) | np.isnan(cc_b).any(1)
        )
        pairs.append((if_a[keep], cc_a[keep], if_b[keep], cc_b[keep]))

    def difference(chosen: list[tuple[np.ndarray, ...]]) -> dict[str, float]:
        parts = []
        for if_a, cc_a, if_b, cc_b in chosen:
            a, b = headline(metrics(if_a, cc_a)), headline(metrics(if_b, cc_b))
            parts.append({k: a[k] - b[k] for k in METRICS})
        return {k: float(np.mean([part[k] for part in parts])) for k in METRICS}

    point = difference(pairs)
    draws = {k: [] for k in METRICS}
    for _ in range(bootstrap):
        chosen = []
        for s in rng.integers(0, len(pairs), len(pairs)):
            p = pairs[s]
            idx = rng.integers(0, len(p[0]), len(p[0]))
            chosen.append(tuple(a[idx] for a in p))
        for k, v in difference(chosen).items():
            draws[k].append(v)
    return {k: (point[k], *np.nanpercentile(draws[k], [2.5, 97.5])) for k in METRICS}


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.1f} ± {std:.1f}"


def _ci(d: tuple[float, float, float]) -> str:
    return f"{d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}]"


def verdict(difference: tuple[float, float, float], sign: int) -> str:
    _, low, high = difference
    if (sign < 0 and high < 0) or (sign > 0 and low > 0):
        return "reproduced"
    if (sign < 0 and low > 0) or (sign > 0 and high < 0):
        return "not reproduced"
    return "not separable from noise"


def ablation_table(
    ablation: Ablation, found: dict, rng: np.random.Generator, bootstrap: int
) -> tuple[str, list[str]]:
    ref = found.get(REFERENCE, {})
    header = "| setting | seeds | C_3 | CC_3 | O_3 | M_1 - M_3 | ΔC_3 vs reference | ΔCC_3 | ΔO_3 | ΔM_1 - M_3 | min / run |"
    lines = [header, "| " + " | ".join(["---"] * 11) + " |"]
    prior = [run_metrics(run, "before") for run in ref.values()]
    lines.append(
        "| prior (before RL) | "
        + f"{len(prior)} | "
        + " | ".join(_mean_std([p[k] for p in prior]) for k in METRICS)
        + " | | | | | |"
    )
    differences: dict[Cell, dict] = {}
    for cell in ablation.cells:
        runs = found.get(cell, {})
        after = [run_metrics(run) for run in runs.values()]
        cells = [_mean_std([a[k] for a in after]) for k in METRICS]
        if cell == REFERENCE or not runs or not ref:
            deltas = ["(reference)" if cell == REFERENCE else "-"] + [""] * 3
        else:
            differences[cell] = paired_difference(runs, ref, rng, bootstrap)
            deltas = [_ci(differences[cell][k]) for k in METRICS]
        minutes = _mean_std([run["wall_clock_s"] / 60 for run in runs.values()])
        name = f"**{cell.label}**" if cell == REFERENCE else cell.label
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells + deltas) + f" | {minutes} |")
    claims = []
    for claim in ablation.claims:
        if claim.cell not in differences:
            claims.append(f"- {claim.text}: not run")
            continue
        d = differences[claim.cell][claim.metric]
        claims.append(
            f"- {claim.text}: **{verdict(d, claim.sign)}** (Δ{claim.metric} {claim.cell.label} - reference = {_ci(d)})"
        )
    return "\n".join(lines), claims


def curves_figure(ablation: Ablation, found: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 3.6))
    for cell in ablation.cells:
        curves = [run["curve"] for run in found.get(cell, {}).values() if run["curve"]]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        values = np.array([c[:length] for c in curves])
        x = np.arange(1, length + 1)
        axis.plot(x, values.mean(0), label=cell.label)
        axis.fill_between(x, values.min(0), values.max(0), alpha=0.15)
    axis.set_xlabel("RL iteration")
    axis.set_ylabel("training reward (its own judge)")
    axis.set_title(ablation.question, fontsize=8)
    axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def frontier_figure(found: dict, path: Path) -> list[tuple[str, float, float, float]]:
    """C_3 gain vs CC_3 loss of every cell (mean over seeds, gains against each seed's prior)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for cell, runs in found.items():
        gains = [run_metrics(r)["C_3"] - run_metrics(r, "before")["C_3"] for r in runs.values()]
        losses = [run_metrics(r, "before")["CC_3"] - run_metrics(r)["CC_3"] for r in runs.values()]
        o_gains = [run_metrics(r)["O_3"] - run_metrics(r, "before")["O_3"] for r in runs.values()]
        points.append((cell.label, float(np.mean(gains)), float(np.mean(losses)), float(np.mean(o_gains))))
    figure, axis = plt.subplots(figsize=(7, 5))
    axis.axvspan(-100, 5, ymin=0, ymax=1, alpha=0.06, color="green")
    axis.axhline(10, color="green", lw=0.8, ls="--")
    axis.axvline(5, color="green", lw=0.8, ls="--")
    for label, gain, loss, _ in points:
        axis.scatter(loss, gain, s=18)
        axis.annotate(label, (loss, gain), fontsize=6, xytext=(3, 2), textcoords="offset points")
    axis.set_xlabel("CC_3 loss (points, mean over seeds)")
    axis.set_ylabel("C_3 gain (points)")
    axis.set_title(
        "every cell: what RL buys at turn 3 and what it costs; target: up-left of the dashed lines",
        fontsize=8,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return sorted(points, key=lambda p: -p[3])


def write_report(
    found: dict, out: Path, figures: Path, rng: np.random.Generator, bootstrap: int, judge_cache: Path
) -> Path:
    sections = []
    for ablation in ABLATIONS:
        table, claims = ablation_table(ablation, found, rng, bootstrap)
        figure = figures / f"{ablation.name}_curves.png"
        curves_figure(ablation, found, figure)
        rel = Path(figure).relative_to(out.parent) if figure.is_relative_to(out.parent) else figure
        sections.append(
            f"## {ablation.question}\n\n{table}\n\n"
            + ("\n".join(claims) + "\n\n" if claims else "")
            + f"![learning curves]({rel})\n"
        )
    frontier = frontier_figure(found, figures / "frontier.png")
    frontier_rows = "\n".join(
        f"| {label} | {gain:+.1f} | {loss:+.1f} | {o_gain:+.1f} |" for label, gain, loss, o_gain in frontier
    )
    body = (
        GENERATED_HEADER
        + "\n".join(sections)
        + "\n## The frontier: C_3 gain against CC_3 loss, every cell\n\n"
        + "| setting | C_3 gain | CC_3 loss | O_3 gain |\n| --- | --- | --- | --- |\n"
        + frontier_rows
        + f"\n\n![frontier]({(figures / 'frontier.png').relative_to(out.parent)})\n"
    )
    body += (
        "\n## Judge quality against learning\n\nEach training judge's error against the exact toy judge on the prior's"
        " held-out outputs (200 chains x 3 turns), and what RL learned under it (held-out, judged exactly):\n\n"
        + judge_table(judge_errors(judge_cache), found)
        + "\n"
    )
    out.write_text(body)
    return out


GENERATED_HEADER = """<!-- generated by `python tools/ablations.py report`; edit tools/ablation_report.py, not this file -->
# Ablations on the toy world: measured tables

"""


# ---------------------------------------------------------------------------------------------- judge error
JUDGES = {  # the study's perturbed judges (configs/sweeps/ablations/judge_*.yaml), by cell label
    "noise std 0.5": {"noise_std": 0.5},
    "noise std 1.0": {"noise_std": 1.0},
    "noise std 2.0": {"noise_std": 2.0},
    "shrink 0.5": {"shrink": 0.5},
    "saturation bias 2.0": {"saturation_bias": 2.0},
    "binary scores": None,  # the binary toy judge
}


def judge_errors(cache: Path, num_chains: int = 200) -> dict[str, dict[str, float]]:
    """Each training judge's error against the exact scores, on the prior's deterministic held-out rollouts (the
    evaluation's chains, steps and noise, seed 0): bias and mean absolute error of IF and CC, their correlation
    with the exact scores, and how often the turn's success (IF >= 4) agrees. Cached in ``cache``."""
    import json

    if cache.is_file():
        return json.loads(cache.read_text())
    from mtflow.eval.evaluate import rollout_and_score
    from mtflow.toy.data import ToyChainDataset
    from mtflow.toy.judge import ToyJudge
    from mtflow.toy.perturbed import PerturbedJudge
    from mtflow.toy.prior import load_prior_policy, prior_world

    policy = load_prior_policy(max_sequence_length=12)
    chains = [ToyChainDataset(prior_world(), "heldout", num_chains)[i] for i in range(num_chains)]
    exact, items = rollout_and_score(
        policy,
        ToyJudge(),
        chains,
        condition="model",
        adapter=None,
        num_steps=10,
        forward_batch_size=100,
        seed=0,
    )
    results = {}
    for label, knobs in JUDGES.items():
        judge = ToyJudge(binary_threshold=4.0) if knobs is None else PerturbedJudge(ToyJudge(), **knobs)
        flawed = judge.score(items)
        keep = exact.scored & flawed.scored
        row = {}
        for name, attr in (("IF", "instruction_following"), ("CC", "content_consistency")):
            a = getattr(exact, attr)[keep].double().numpy()
            b = getattr(flawed, attr)[keep].double().numpy()
            row[f"{name} bias"] = float((b - a).mean())
            row[f"{name} MAE"] = float(np.abs(b - a).mean())
            row[f"{name} corr"] = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else math.nan
        a = exact.instruction_following[keep].numpy() >= THRESHOLD
        b = flawed.instruction_following[keep].numpy() >= THRESHOLD
        row["success agreement %"] = float(100.0 * (a == b).mean())
        results[label] = row
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(results, indent=2))
    return results


def judge_table(errors: dict[str, dict[str, float]], found: dict) -> str:
    """Each flawed judge's error and what RL learned under it (after RL, judged exactly; mean over seeds)."""
    from ablation_study import Cell

    cells = {c.label: c for c in found} | {"binary scores": Cell("binary", "binary scores")}
    ref = [run_metrics(r) for r in found.get(REFERENCE, {}).values()]
    lines = [
        "| training judge | IF bias | IF MAE | IF corr | CC bias | CC MAE | CC corr | success agreement | C_3 | CC_3 | O_3 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        "| exact (reference) | 0 | 0 | 1 | 0 | 0 | 1 | 100 % | "
        + " | ".join(_mean_std([m[k] for m in ref]) for k in ("C_3", "CC_3", "O_3"))
        + " |",
    ]
    for label, row in errors.items():
        runs = [run_metrics(r) for r in found.get(cells.get(label), {}).values()] if label in cells else []
        values = " | ".join(
            f"{row[k]:+.2f}" if "bias" in k else f"{row[k]:.2f}"
            for k in ("IF bias", "IF MAE", "IF corr", "CC bias", "CC MAE", "CC corr")
        )
        outcome = " | ".join(_mean_std([m[k] for m in runs]) for k in ("C_3", "CC_3", "O_3"))
        lines.append(f"| {label} | {values} | {row['success agreement %']:.1f} % | {outcome} |")
    return "\n".join(lines)
