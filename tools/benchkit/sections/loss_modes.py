"""GRPO with the SDE on all T steps vs GRPO window mode (W of T) vs NFT (deterministic rollout, D noised copies per
turn) at equal B, G, K, T: time per iteration and per trajectory, every configuration's network calls checked against
the pass model."""

from __future__ import annotations

from benchkit.context import Context, time_passes
from benchkit.harness import RunResult, run_iterations
from benchkit.passes import expected_calls, model_passes
from benchkit.report import Section, fmt_s, fmt_x, log
from mtflow.algorithms import NFT, Algorithm


def loss_modes(ctx: Context) -> Section:
    """Every loss mode fitted ``--rounds`` times (its network calls checked against the pass model in the first
    round), each fit followed by its unavoidable passes timed alone."""
    a = ctx.args
    configs: dict[str, Algorithm] = {"grpo": ctx.grpo(), "grpo_window": ctx.grpo(stochastic="window")}
    for d in a.nft_draws:
        configs[f"nft_d{d}"] = NFT(train_timesteps=d)
    for name, algorithm in configs.items():
        ctx.algorithms[name] = algorithm
        ctx.shapes[name] = ctx.shape(algorithm)
    for r in range(a.rounds):
        runs, totals = {}, {}
        for name, algorithm in configs.items():
            log(f"loss modes, round {r + 1}/{a.rounds}: {name}, then its passes alone")
            shape = ctx.shapes[name]
            run = run_iterations(
                ctx.policy, ctx.chains, a.chains, ctx.module(algorithm), a.repeats, a.warmup, count=(r == 0)
            )
            if r == 0:
                expected = expected_calls(model_passes(shape), algorithm.sampling_adapter)
                if run.calls != expected:
                    raise AssertionError(
                        f"{name}: the iteration made {run.calls}, the pass model expects {expected}"
                    )
            runs[name] = run
            totals[name], per_call = time_passes(ctx, shape, algorithm.sampling_adapter)
            if name == "grpo":
                ctx.grpo_pass_seconds = per_call
        ctx.rounds.append(runs)
        ctx.pass_totals.append(totals)
    ctx.runs = {name: RunResult.merge([rnd[name] for rnd in ctx.rounds]) for name in configs}
    full = ctx.runs["grpo"].iteration_s
    n = a.chains * a.group
    section = Section(
        "GRPO full SDE vs window vs NFT",
        f"B = {a.chains}, G = {a.group}, K = {a.turns}, T = {a.steps}, W = {a.window}, forward batch "
        f"{a.forward_batch}. Each configuration is a Lightning `Trainer` fit of `FlowRLModule` exactly as `mtflow "
        f"fit` drives it; {a.rounds} rounds through all configurations (so load from other jobs spreads over all), "
        f"{a.repeats} timed iterations per round after {a.warmup} warm-up; medians over the {a.rounds * a.repeats} "
        "iterations. `rollout`, `score+prepare` and `update` are the module's own `perf/*` stats.",
        [
            "mode",
            "iteration",
            "per trajectory",
            "rollout",
            "score+prepare",
            "update",
            "cheaper than full SDE",
        ],
    )
    for name, run in ctx.runs.items():
        section.rows.append(
            [
                name,
                fmt_s(run.iteration_s),
                fmt_s(run.iteration_s / n),
                fmt_s(run.stat("perf/rollout_s")),
                fmt_s(run.stat("perf/score_and_prepare_s")),
                fmt_s(run.stat("perf/update_s")),
                fmt_x(full / run.iteration_s),
            ]
        )
    section.notes.append(
        "Every configuration's network calls (transformer by grad mode and adapter, VAE encode/decode, text "
        "encoder, judge, optimiser steps, each with its batch size) equal what `model_passes` "
        "(`tools/benchkit/passes.py`) predicts: checked on a real iteration."
    )
    ctx.results["loss_modes"] = {
        k: {"iteration_s": v.iteration_s, "walls": v.walls, "gap": v.gap, "stats": v.stats}
        for k, v in ctx.runs.items()
    }
    return section
