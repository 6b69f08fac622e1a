"""Framework overhead: an iteration's wall time (``FlowRLModule.training_step`` in a Lightning ``Trainer``, as
``mtflow fit`` drives it) over the sum of the model passes it cannot avoid, each timed alone on the raw modules."""

from __future__ import annotations

import statistics

from benchkit.context import ROLLOUT_PASSES, UPDATE_PASSES, Context
from benchkit.passes import model_passes, pass_adapter
from benchkit.report import Section, fmt_s, fmt_x


def overhead(ctx: Context) -> tuple[Section, Section]:
    """Each mode's iteration over its unavoidable passes, round by round (measured by ``loss_modes``), and the passes
    of one full-SDE GRPO iteration."""
    a = ctx.args
    section = Section(
        "Framework overhead",
        "Iteration wall time / the sum of the passes it cannot avoid: each pass timed alone on the raw modules "
        "(diffusers transformer / VAE / text encoders called directly with prepared inputs, the judge's `score` on "
        f"ready items, AdamW on the LoRA parameters; median of {a.pass_repeats} calls) times the number of such "
        "calls the iteration makes at the same batch sizes. The passes of a configuration are timed right after its "
        "fit, in every round, and each round's iterations are divided by that round's passes; the table gives the "
        "median over rounds (min - max in brackets). Target: <= 1.15.",
        ["mode", "iteration", "unavoidable", "overhead", "rollout / its passes", "update / its passes"],
    )
    ctx.results["overhead"] = {}
    for name in ctx.runs:
        ratios, rollouts, updates, unavoidables, iterations = [], [], [], [], []
        for runs, totals in zip(ctx.rounds, ctx.pass_totals):
            run, passes = runs[name], totals[name]
            unavoidable = sum(passes.values())
            ratios.append(run.iteration_s / unavoidable)
            rollouts.append(run.stat("perf/rollout_s") / sum(passes.get(k, 0) for k in ROLLOUT_PASSES))
            updates.append(run.stat("perf/update_s") / sum(passes.get(k, 0) for k in UPDATE_PASSES))
            unavoidables.append(unavoidable)
            iterations.append(run.iteration_s)

        def cell(values, fmt=fmt_x):
            text = fmt(statistics.median(values))
            return text if len(values) < 2 else f"{text} ({fmt(min(values))} - {fmt(max(values))})"

        section.rows.append(
            [
                name,
                fmt_s(statistics.median(iterations)),
                fmt_s(statistics.median(unavoidables)),
                cell(ratios),
                cell(rollouts),
                cell(updates),
            ]
        )
        ctx.results["overhead"][name] = {"ratios": ratios, "rollout": rollouts, "update": updates}
    section.notes.append(
        "`rollout / its passes` = the module's `perf/rollout_s` over text + VAE + rollout transformer passes; "
        "`update / its passes` = `perf/update_s` over trained forward+backward + optimiser steps (NFT's old and "
        "reference velocities run in `score+prepare`). The rest of an iteration (judge items, advantages, logging, "
        "Lightning between batches) counts in the total only."
    )
    detail = Section(
        "Unavoidable passes of one full-SDE GRPO iteration (last round)",
        header=["pass", "calls x batch", "seconds per call", "total"],
    )
    per_call = ctx.grpo_pass_seconds
    sampling = ctx.algorithms["grpo"].sampling_adapter
    for p in model_passes(ctx.shapes["grpo"]):
        if p.name == "judge":
            seconds = per_call["judge"]
        else:
            seconds = per_call[f"{p.name}@{p.batch_size}/{pass_adapter(p.name, sampling)}"]
        detail.rows.append(
            [p.name, f"{p.calls} x {p.batch_size}", f"{seconds * 1e3:.2f} ms", fmt_s(seconds * p.calls)]
        )
    return section, detail
