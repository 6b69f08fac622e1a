"""Side-by-side benchmark of mtflow's RL loop on the tiny Kontext model (issue 8 items 1, 2 and 4).

One run measures, on real classes at tiny size, everything as ratios taken in the same process:

1. GRPO with the SDE on all T steps vs GRPO window mode (W of T) vs NFT (deterministic rollout) at equal B, G, K,
   T, as NFT's cost depends on its noised copies per turn D (``--nft-draws``): time per iteration and trajectory;
   every run's network calls are counted and checked against ``mtflow.bench.passes.model_passes``.
2. Framework overhead: iteration wall time (``FlowRLModule.training_step`` in a Lightning ``Trainer``, as
   ``mtflow fit`` drives it) / the sum of the model passes it cannot avoid, each timed alone on the raw modules.
3. mtflow's batched loop vs an anchor-style loop (``mtflow.bench.naive``: one trajectory at a time, text encoded per
   sample and turn, no caching, the source encoded per trajectory, per-sample recomputation), after checking both
   produce the same rollout on the same seeds.
4. Optimisations, each with its before/after ratio: encodes avoided, batching, compact storage, gradient
   checkpointing, scoring overlapped with the reward-independent work, ``torch.compile`` of the transformer.
5. Cost growth with G, T and K (fresh process per point: time and peak RSS), with fitted lines.
6. A GPU projection of the paper setting from FLOP counts (``mtflow.bench.projection``).

    python tools/bench.py                        # default sizes, about 5 minutes on 2 shared cores
    python tools/bench.py --quick                # smoke run (well under a minute)
    python tools/bench.py --write BENCHMARKS.md  # also write the Markdown report with this command line
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mtflow.bench.harness import (
    ModelSpec,
    RunResult,
    WorkerJob,
    bench_chains,
    build_model,
    load_policy,
    run_iterations,
    run_worker,
)
from mtflow.bench.naive import NaiveLoop, naive_log_prob, naive_rollout
from mtflow.bench.passes import IterationShape, PassTimer, expected_calls, model_passes
from mtflow.bench.projection import (
    FluxArch,
    Hardware,
    PaperSetting,
    counted_flux_flops,
    flux_forward_flops,
    project_iteration,
    rollout_storage_bytes,
)
from mtflow.bench.timing import count_calls, fit_line, time_calls
from mtflow.losses import sampling_adapter
from mtflow.rollout import RolloutConfig, rollout
from mtflow.testing.scorers import BrightnessScorer
from mtflow.training.module import scoring_items

ROLLOUT_PASSES = ("text_encode", "vae_encode", "rollout_forward", "vae_decode")
UPDATE_PASSES = ("train_forward_backward", "optimizer_step")


# ------------------------------------------------------------------------------------------------ report


@dataclass
class Section:
    title: str
    text: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        out = [f"## {self.title}", ""]
        if self.text:
            out += [self.text, ""]
        if self.header:
            out.append("| " + " | ".join(self.header) + " |")
            out.append("|" + "|".join("---" for _ in self.header) + "|")
            out += ["| " + " | ".join(row) + " |" for row in self.rows]
            out.append("")
        out += [f"- {n}" for n in self.notes]
        if self.notes:
            out.append("")
        return "\n".join(out)


def _s(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds < 10 else f"{seconds:.1f} s"


def _x(ratio: float) -> str:
    return f"{ratio:.2f}x"


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def _t(flops: float) -> str:
    return f"{flops / 1e12:,.1f}"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------------ sections


@dataclass
class Context:
    args: argparse.Namespace
    spec: ModelSpec
    model_path: Path
    policy: object
    chains: list
    base: dict
    runs: dict[str, RunResult] = field(default_factory=dict)
    rounds: list[dict[str, RunResult]] = field(default_factory=list)
    pass_totals: list[dict[str, dict[str, float]]] = field(default_factory=list)
    grpo_pass_seconds: dict[str, float] = field(default_factory=dict)  # per call, full-SDE GRPO, last round
    judge_items: list | None = None  # one rollout's judge items, built once
    shapes: dict[str, IterationShape] = field(default_factory=dict)
    results: dict = field(default_factory=dict)


def judge_items(ctx: Context) -> list:
    """Judge items of one rollout of the benchmark's size (built once)."""
    if ctx.judge_items is None:
        a = ctx.args
        config = RolloutConfig(group_size=a.group, num_steps=a.steps, forward_batch_size=a.forward_batch)
        sample = rollout(
            ctx.policy, ctx.chains[: a.chains], config, generator=torch.Generator().manual_seed(0)
        )
        ctx.judge_items = scoring_items(sample)
    return ctx.judge_items


def time_passes(ctx: Context, shape: IterationShape) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds of every unavoidable pass of one configuration, each kind timed alone now (fresh timer).

    Returns:
        (seconds per pass kind summed over its calls, seconds per single call keyed "name@batch/adapter")
    """
    a = ctx.args
    timer = PassTimer(ctx.policy, repeats=a.pass_repeats)
    items = judge_items(ctx)
    judge_s = time_calls(lambda: BrightnessScorer().score(items), a.pass_repeats).median
    sampling = sampling_adapter(shape.loss)
    totals: dict[str, float] = {}
    for p in model_passes(shape):
        if p.name == "judge":
            seconds = judge_s
        else:
            adapter = {"rollout_forward": sampling, "old_forward": "old", "reference_forward": None}.get(
                p.name, "default"
            )
            seconds = timer.seconds(p.name, p.batch_size, adapter)
        totals[p.name] = totals.get(p.name, 0.0) + seconds * p.calls
    per_call = {f"{k[0]}@{k[1]}/{k[2]}": v for k, v in timer.cache.items()}
    per_call["judge"] = judge_s
    return totals, per_call


def loss_modes(ctx: Context) -> Section:
    a = ctx.args

    def shape(loss: str, **extra) -> IterationShape:
        return IterationShape(
            a.chains, a.group, a.turns, a.steps, loss, forward_batch_size=a.forward_batch, **extra
        )

    configs = {"grpo": ({"loss": "grpo"}, shape("grpo"))}
    configs["grpo_window"] = ({"loss": "grpo", "stochastic": "window"}, shape("grpo", trained_steps=a.window))
    for d in a.nft_draws:
        configs[f"nft_d{d}"] = (
            {"loss": "nft", "nft_train_timesteps": d},
            shape("nft", nft_draws=min(d, a.steps)),
        )
    for name, (_, iteration_shape) in configs.items():
        ctx.shapes[name] = iteration_shape
    for r in range(a.rounds):
        runs, totals = {}, {}
        for name, (extra, _) in configs.items():
            log(f"loss modes, round {r + 1}/{a.rounds}: {name}, then its passes alone")
            shape = ctx.shapes[name]
            run = run_iterations(
                ctx.policy, ctx.chains, a.chains, {**ctx.base, **extra}, a.repeats, a.warmup, count=(r == 0)
            )
            if r == 0:
                adapter = sampling_adapter(shape.loss)
                expected = expected_calls(model_passes(shape), adapter)
                if run.calls != expected:
                    raise AssertionError(
                        f"{name}: the iteration made {run.calls}, the pass model expects {expected}"
                    )
            runs[name] = run
            totals[name], per_call = time_passes(ctx, shape)
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
                _s(run.iteration_s),
                _s(run.iteration_s / n),
                _s(run.stat("perf/rollout_s")),
                _s(run.stat("perf/score_and_prepare_s")),
                _s(run.stat("perf/update_s")),
                _x(full / run.iteration_s),
            ]
        )
    section.notes.append(
        "Every configuration's network calls (transformer by grad mode and adapter, VAE encode/decode, text "
        "encoder, judge, optimiser steps, each with its batch size) equal what `mtflow.bench.passes.model_passes` "
        "predicts: checked on a real iteration."
    )
    ctx.results["loss_modes"] = {
        k: {"iteration_s": v.iteration_s, "walls": v.walls, "gap": v.gap, "stats": v.stats}
        for k, v in ctx.runs.items()
    }
    return section


def overhead(ctx: Context) -> tuple[Section, Section]:
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

        def cell(values, fmt=_x):
            text = fmt(statistics.median(values))
            return text if len(values) < 2 else f"{text} ({fmt(min(values))} - {fmt(max(values))})"

        section.rows.append(
            [
                name,
                _s(statistics.median(iterations)),
                _s(statistics.median(unavoidables)),
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
    for p in model_passes(ctx.shapes["grpo"]):
        seconds = per_call["judge"] if p.name == "judge" else per_call[f"{p.name}@{p.batch_size}/default"]
        detail.rows.append(
            [p.name, f"{p.calls} x {p.batch_size}", f"{seconds * 1e3:.2f} ms", _s(seconds * p.calls)]
        )
    return section, detail


def naive_comparison(ctx: Context) -> Section:
    a = ctx.args
    policy = ctx.policy
    chains = ctx.chains[: a.chains]
    config = RolloutConfig(group_size=a.group, num_steps=a.steps, forward_batch_size=a.forward_batch)
    log("naive: same-seed rollout check")

    def gens():
        return [torch.Generator().manual_seed(1000 + b) for b in range(len(chains))]

    batched = rollout(policy, chains, config, generator=gens())
    naive = naive_rollout(policy, chains, config, generator=gens())
    pixel_diff = (batched.images.int() - naive.images.int()).abs()
    logp_diff = float((batched.log_probs - naive.log_probs).abs().max())
    latent_diff = float((batched.final_latents - naive.final_latents).abs().max())
    with torch.no_grad():
        recomputed = [
            float((naive_log_prob(policy, batched, n, k, s)[0] - batched.log_probs[n, k, s]).abs().max())
            for n in range(0, batched.num_trajectories, max(1, batched.num_trajectories // 4))
            for k in range(batched.num_turns)
            for s in (0, batched.step_indices.numel() - 1)
        ]
    checks = {
        "max_pixel_diff": int(pixel_diff.max()),
        "pixels_differing": float((pixel_diff > 0).float().mean()),
        "max_log_prob_diff": logp_diff,
        "max_final_latent_diff": latent_diff,
        "max_recomputed_log_prob_diff": max(recomputed),
    }
    if (
        checks["max_pixel_diff"] > 1
        or checks["pixels_differing"] > 1e-3
        or logp_diff > 1e-4
        or latent_diff > 1e-3
    ):
        raise AssertionError(f"the naive loop does not reproduce mtflow's rollout: {checks}")
    if checks["max_recomputed_log_prob_diff"] > 1e-4:
        raise AssertionError(f"per-sample recomputation differs from the recorded log-probs: {checks}")

    rows = []
    counts = {}
    largest = max(a.nft_draws)
    for loss in ("grpo", "nft"):
        if loss == "nft" and not a.naive_nft:
            continue
        loop = NaiveLoop(
            policy,
            BrightnessScorer(),
            loss,
            RolloutConfig(
                group_size=a.group,
                num_steps=a.steps,
                stochastic="all" if loss == "grpo" else "none",
                forward_batch_size=1,
            ),
            nft_draws=largest,
        )
        module = {**ctx.base, "loss": loss}
        if loss == "nft":
            module["nft_train_timesteps"] = largest
        targets = {
            "text_encode": (policy._pipeline, "encode_prompt"),
            "vae_encode": (policy.vae, "encode"),
            "vae_decode": (policy.vae, "decode"),
            "transformer": (policy.transformer, "forward"),
        }
        naive_walls, mtflow_runs = [], []
        for r in range(a.naive_repeats):  # interleaved: naive iteration, then an mtflow fit, and again
            log(f"naive: anchor-style {loss} iteration {r + 1}/{a.naive_repeats}, then mtflow's")
            if r == 0:
                with count_calls(targets) as calls:
                    naive_walls.append(loop.run(chains)["perf/iteration_s"])
                counts[loss] = {name: (calls.count(name), calls.samples(name)) for name in targets}
            else:
                naive_walls.append(loop.run(chains)["perf/iteration_s"])
            mtflow_runs.append(run_iterations(policy, ctx.chains, a.chains, module, 1, a.warmup))
        naive_s = statistics.median(naive_walls)
        mine = RunResult.merge(mtflow_runs)
        label = loss if loss == "grpo" else f"nft (D = {largest})"
        rows.append([label, _s(naive_s), _s(mine.iteration_s), _x(naive_s / mine.iteration_s)])
        ctx.results.setdefault("naive", {})[loss] = {
            "naive_walls": naive_walls,
            "mtflow_walls": [w + mine.gap for w in mine.walls],
        }
    ctx.results.setdefault("naive", {})["checks"] = checks
    ctx.results["naive"]["counts"] = counts
    section = Section(
        "mtflow vs the anchor-style loop",
        f"Same work, same numbers, B = {a.chains}, G = {a.group}, K = {a.turns}, T = {a.steps}. The naive loop "
        "(`mtflow/bench/naive.py`) runs one trajectory at a time (batch 1 everywhere), encodes the instruction per "
        "trajectory and turn without a cache, VAE-encodes the source per trajectory and recomputes log-probs / "
        "velocities one sample at a time with one backward each (plain Python, no Lightning). Interleaved with "
        f"mtflow fits (one warm-up + one timed iteration each), {a.naive_repeats} of each; medians. Target: mtflow "
        ">= 2x faster at G = 8, K = 3.",
        ["loss", "anchor-style loop", "mtflow (Trainer)", "mtflow speed-up"],
        rows,
    )
    section.notes.append(
        f"Same seeds, same weights: rollout images differ by at most {checks['max_pixel_diff']} grey level in "
        f"{checks['pixels_differing']:.1e} of the pixels (float32 sums in another order at batch 1 vs batch "
        f"{a.forward_batch}), recorded log-probs by at most {logp_diff:.1e}, final latents by {latent_diff:.1e}; "
        "log-probs recomputed one sample at a time match the batched recording to "
        f"{checks['max_recomputed_log_prob_diff']:.1e}. `tests/test_bench.py` also checks that the per-sample GRPO "
        "update accumulates the batched gradient."
    )
    return section


def optimisations(ctx: Context) -> Section:
    a = ctx.args
    policy, chains = ctx.policy, ctx.chains
    rows = []
    res = ctx.results.setdefault("optimisations", {})
    n = a.chains * a.group
    counts = ctx.results.get("naive", {}).get("counts", {}).get("grpo")
    mtflow_calls = ctx.runs["grpo"].calls
    if counts:
        text_calls, text_samples = counts["text_encode"]
        mine_text = sum(mtflow_calls["text_encode"].values())
        mine_text_samples = sum(b * c for b, c in mtflow_calls["text_encode"].items())
        rows.append(
            [
                "text encoded once per distinct instruction and iteration (counted)",
                f"{text_calls} calls / {text_samples} prompts",
                f"{mine_text} call / {mine_text_samples} prompts",
                _x(text_samples / mine_text_samples),
                "prompts through T5 + CLIP per iteration",
            ]
        )
        chained = n * (a.turns - 1)
        naive_sources = counts["vae_encode"][1] - chained
        mine_sources = sum(b * c for b, c in mtflow_calls["vae_encode"].items()) - chained
        rows.append(
            [
                "source VAE-encoded once per chain (counted)",
                f"{naive_sources} images",
                f"{mine_sources} images",
                _x(naive_sources / mine_sources),
                f"source encodes per iteration (the {chained} encodes of chained outputs are needed by both)",
            ]
        )
    log("optimisations: batching")
    config = RolloutConfig(group_size=a.group, num_steps=a.steps, forward_batch_size=a.forward_batch)
    one = RolloutConfig(group_size=a.group, num_steps=a.steps, forward_batch_size=1)
    gen = torch.Generator().manual_seed(5)
    t_one, t_f = [], []
    for _ in range(a.batching_repeats):  # interleaved
        t_one += time_calls(lambda: rollout(policy, chains[: a.chains], one, generator=gen), 1, 0).times
        t_f += time_calls(lambda: rollout(policy, chains[: a.chains], config, generator=gen), 1, 0).times
    one_s, batched_s = statistics.median(t_one), statistics.median(t_f)
    rows.append(
        [
            f"batched network calls across chains and trajectories (rollout, batch 1 -> {a.forward_batch})",
            _s(one_s),
            _s(batched_s),
            _x(one_s / batched_s),
            "rollout wall time, same work",
        ]
    )
    res["batching"] = {"batch1": t_one, "batched": t_f}
    log("optimisations: bf16 storage (alternating iterations)")
    alternating = run_iterations(
        policy,
        chains,
        a.chains,
        {**ctx.base, "loss": "grpo"},
        a.repeats,
        a.warmup,
        variants=["store_float32", "store_bfloat16"],
    )
    store = alternating.split()
    fp32 = ctx.runs["grpo"]
    state_bytes = fp32.rollout_bytes["states"] + fp32.rollout_bytes["next_states"]
    # measured on the alternating fit's last rollout, which must be a bf16 one
    if alternating.variants[-1] != "store_bfloat16":
        raise RuntimeError(f"the alternating storage fit ended on {alternating.variants[-1]!r}, not bf16")
    state_bf16 = alternating.rollout_bytes["states"] + alternating.rollout_bytes["next_states"]
    f32_s, bf16_s = store["store_float32"].iteration_s, store["store_bfloat16"].iteration_s
    rows.append(
        [
            "rollout states stored in bf16 (`store_dtype`)",
            f"{_mb(state_bytes)}, {_s(f32_s)}",
            f"{_mb(state_bf16)}, {_s(bf16_s)}",
            f"{_x(state_bytes / state_bf16)} memory, {_x(f32_s / bf16_s)} time",
            "states + next states of one iteration; time of alternating iterations of one fit",
        ]
    )
    window = ctx.runs["grpo_window"].rollout_bytes
    window_bytes = window["states"] + window["next_states"]
    nft_bytes = ctx.runs[f"nft_d{max(a.nft_draws)}"].rollout_bytes
    rows.append(
        [
            "only trained steps stored (window W of T; NFT: none)",
            _mb(state_bytes),
            f"{_mb(window_bytes)} (NFT: {_mb(nft_bytes['states'] + nft_bytes['next_states'])})",
            _x(state_bytes / window_bytes),
            "float32 states + next states",
        ]
    )
    res["storage"] = {"fp32": state_bytes, "window": window_bytes, "fp32_s": f32_s, "bf16_s": bf16_s}
    log("optimisations: overlapped scoring (alternating iterations)")
    largest = max(a.nft_draws)
    overlap = run_iterations(
        policy,
        chains,
        a.chains,
        {**ctx.base, "loss": "nft", "nft_train_timesteps": largest},
        a.repeats,
        a.warmup,
        scorer=BrightnessScorer(delay_s=a.judge_delay),
        variants=["overlap_off", "overlap_on"],
    ).split()
    off, on = overlap["overlap_off"], overlap["overlap_on"]
    prepare = off.stat("perf/score_and_prepare_s") - off.stat("perf/judge_wait_s")
    rows.append(
        [
            f"judge ({a.judge_delay:.2f} s latency) overlapped with NFT's old/ref velocities (D = {largest})",
            _s(off.iteration_s),
            _s(on.iteration_s),
            _x(off.iteration_s / on.iteration_s),
            f"saves {_s(off.iteration_s - on.iteration_s)}; at most min(latency, prepare = {_s(prepare)})",
        ]
    )
    res["overlap"] = {"off": off.walls, "on": on.walls, "prepare_s": prepare}
    return Section(
        "Optimisations (before -> after)",
        "Each optimisation measured side by side in this run, same sizes as above. Where one fit can switch the "
        "setting between iterations (storage dtype, overlapped scoring, checkpointing, compiled forward), the two "
        "variants alternate iteration by iteration and each side is the median of its iterations.",
        ["optimisation", "before", "after", "ratio", "what is measured"],
        rows,
    )


def growth(ctx: Context) -> tuple[Section, list[str], list[str] | None]:
    a = ctx.args
    spec = asdict(ctx.spec)
    base = {**ctx.base, "loss": "grpo", "num_turns": a.turns}
    points = []
    for g in a.growth_group:
        points.append(("G", g, {**base, "group_size": g}))
    for t in a.growth_steps:
        points.append(("T", t, {**base, "num_steps": t}))
    for k in a.growth_turns:
        points.append(("K", k, {**base, "num_turns": k}))
    cache: dict[str, RunResult] = {}
    measured: dict[str, list[tuple[int, float, float, int]]] = {"G": [], "T": [], "K": []}
    for axis, value, module in points:
        key = json.dumps(module, sort_keys=True)
        if key not in cache:
            log(f"growth: {axis} = {value} (fresh process)")
            job = WorkerJob(str(ctx.model_path), spec, a.chains, module, a.growth_repeats, 1, a.threads)
            cache[key] = run_worker(job)
        result = cache[key]
        stored = sum(result.rollout_bytes.values())
        measured[axis].append((value, result.iteration_s, result.peak, stored))
    fits = Section(
        "Cost growth (GRPO, full SDE)",
        f"One fresh process per point (B = {a.chains}; base G = {a.group}, T = {a.steps}, K = {a.turns}; one "
        f"varies at a time); time = median of {a.growth_repeats} iterations after one warm-up; peak = largest "
        "resident-set high-water mark above the iteration's starting RSS (`VmHWM` after `malloc_trim(0)` and a reset "
        "through `/proc/self/clear_refs`; torch has no CPU allocator statistics and `tracemalloc` does not see "
        "tensors). Lines are least-squares fits.",
        [
            "axis",
            "points (value: time, peak, stored rollout)",
            "time slope (R^2)",
            "peak slope (R^2)",
            "stored slope (R^2)",
        ],
    )
    ctx.results["growth"] = measured
    for axis, data in measured.items():
        if len(data) < 2:
            continue
        xs = [float(row[0]) for row in data]
        time_fit = fit_line(xs, [row[1] for row in data])
        mem_fit = fit_line(xs, [row[2] for row in data])
        stored_fit = fit_line(xs, [row[3] for row in data])
        fits.rows.append(
            [
                axis,
                "; ".join(f"{v}: {_s(t)}, {_mb(p)}, {_mb(b)}" for v, t, p, b in data),
                f"{time_fit.slope:.3f} s ({time_fit.r2:.3f})",
                f"{_mb(mem_fit.slope)} ({mem_fit.r2:.3f})",
                f"{_mb(stored_fit.slope)} ({stored_fit.r2:.3f})",
            ]
        )
        ctx.results.setdefault("fits", {})[axis] = {
            "time": asdict(time_fit),
            "peak": asdict(mem_fit),
            "stored": asdict(stored_fit),
        }
    if "G" in ctx.results.get("fits", {}):
        fit = ctx.results["fits"]["G"]
        per_traj, stored_traj = fit["peak"]["slope"] / a.chains, fit["stored"]["slope"] / a.chains
        fits.notes.append(
            f"Per trajectory (G slope / B): peak {_mb(per_traj)}, of which the stored rollout (float32 states, next "
            f"states, latents, images, log-probs) is {_mb(stored_traj)}. The rest are activations of the update's "
            f"micro-batches: all {a.chains * max(a.growth_group or [a.group])} trajectories fit in one forward batch "
            f"of {a.forward_batch} here, so they grow with G; beyond the forward batch they stop growing, while the "
            "stored rollout keeps growing linearly in G, T (full SDE) and K. Against T and K the peak is flat for that "
            "reason (the update's activations dominate at these sizes) while the stored rollout is exactly linear."
        )
    log("growth: gradient checkpointing (fresh process, alternating iterations)")
    module = {**base, "group_size": a.group}
    result = run_worker(
        WorkerJob(
            str(ctx.model_path),
            spec,
            a.chains,
            module,
            a.growth_repeats,
            1,
            a.threads,
            variants=["checkpointing_off", "checkpointing_on"],
        )
    )
    gc = result.split()
    (t0, p0) = gc["checkpointing_off"].iteration_s, gc["checkpointing_off"].peak
    (t1, p1) = gc["checkpointing_on"].iteration_s, gc["checkpointing_on"].peak
    ctx.results["gradient_checkpointing"] = {name: asdict(run) for name, run in gc.items()}
    gc_row = [
        "gradient checkpointing (`KontextPolicy(gradient_checkpointing=True)`)",
        f"{_mb(p0)}, {_s(t0)}",
        f"{_mb(p1)}, {_s(t1)}",
        f"{_x(p0 / max(p1, 1))} lower peak, {_x(t1 / t0)} time",
        "iteration peak RSS above its start and time, alternating iterations in a fresh process",
    ]
    compile_row = None
    if not a.skip_compile:
        log("optimisations: torch.compile (fresh process, compiles the no-grad and the training graph)")
        job = WorkerJob(
            str(ctx.model_path),
            spec,
            a.chains,
            module,
            a.growth_repeats,
            1,
            a.threads,
            variants=["eager", "compiled"],
            compile_transformer=True,
            memory=False,
        )
        with tempfile.TemporaryDirectory(prefix="mtflow-bench-inductor-") as cache:
            # a fresh inductor cache: the compile cost is a cold compile, not a cache hit from an earlier run
            fresh = {"TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": str(Path(cache) / "triton")}
            result = run_worker(job, timeout=1800, env=fresh)
        split = result.split()
        eager_s, compiled_s = split["eager"].iteration_s, split["compiled"].iteration_s
        compile_cost = result.warmup_walls[1] - statistics.median(split["compiled"].walls)
        saved = eager_s - compiled_s
        ctx.results["compile"] = {
            "split": {name: asdict(run) for name, run in split.items()},
            "warmup_walls": result.warmup_walls,
            "eager_s": eager_s,
            "compiled_s": compiled_s,
            "cost_s": compile_cost,
        }
        compile_row = [
            "`torch.compile` of the transformer forward (inductor, CPU)",
            _s(eager_s),
            _s(compiled_s),
            _x(eager_s / compiled_s),
            (
                f"steady iterations alternating in one process; one-off compile cost {_s(compile_cost)}, repaid "
                f"after {compile_cost / saved:.0f} iterations"
            )
            if saved > 0
            else "no gain on this CPU",
        ]
    return fits, gc_row, compile_row


def summary(ctx: Context) -> Section:
    """The issue's targets against this run's numbers."""
    a = ctx.args
    res = ctx.results

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    overhead = statistics.median(res["overhead"]["grpo"]["ratios"])
    rows = [
        ["framework overhead, full-SDE GRPO iteration", "<= 1.15", _x(overhead), verdict(overhead <= 1.15)]
    ]
    worst = max(statistics.median(v["ratios"]) for v in res["overhead"].values())
    rows.append(["framework overhead, worst loss mode", "<= 1.15", _x(worst), verdict(worst <= 1.15)])
    for loss, row in res.get("naive", {}).items():
        if loss in ("checks", "counts"):
            continue
        speedup = statistics.median(row["naive_walls"]) / statistics.median(row["mtflow_walls"])
        rows.append(
            [
                f"mtflow vs anchor-style loop ({loss}, G = {a.group}, K = {a.turns})",
                ">= 2x",
                _x(speedup),
                verdict(speedup >= 2),
            ]
        )
    full = ctx.runs["grpo"].iteration_s
    window = full / ctx.runs["grpo_window"].iteration_s
    rows.append(
        [
            f"window (W = {a.window}) vs full SDE per iteration, T = {a.steps}",
            ">= 2x",
            _x(window),
            verdict(window >= 2),
        ]
    )
    nft_ok = []
    for d in a.nft_draws:
        ratio = full / ctx.runs[f"nft_d{d}"].iteration_s
        if ratio >= 2:
            nft_ok.append(d)
        rows.append(
            [
                f"NFT (D = {d}) vs full SDE per iteration, T = {a.steps}",
                ">= 2x",
                _x(ratio),
                verdict(ratio >= 2),
            ]
        )
    return Section(
        "Summary: the issue's targets",
        "CPU, tiny model, this run (details below).",
        ["target", "wanted", "measured", "verdict"],
        rows,
        [
            f"NFT's cost grows with its noised copies per turn D (`nft_train_timesteps`, mtflow's default "
            f"{_default_nft_copies()}): each "
            "copy costs an old-adapter forward, a reference forward (beta_ref > 0) and a trained forward+backward. "
            f"Here NFT is >= 2x cheaper than full-SDE GRPO for D in {nft_ok or 'no tested value'}; see the GPU "
            "projection for the same comparison at 512 px.",
        ],
    )


def _default_nft_copies() -> int:
    import inspect

    from mtflow.training.module import FlowRLModule

    return inspect.signature(FlowRLModule.__init__).parameters["nft_train_timesteps"].default


def findings(ctx: Context) -> Section:
    """Changes to the trainer this run justifies (or rules out), with the measured ratios."""
    res = ctx.results
    rows = []
    if "compile" in res:
        ratio = res["compile"]["eager_s"] / res["compile"]["compiled_s"]
        rows.append(
            [
                "`torch.compile` option for the transformer forward",
                f"{_x(ratio)} per steady iteration on this CPU after a {res['compile']['cost_s']:.0f} s cold compile "
                "(two graphs: no-grad rollout, training)",
                "applied as the opt-in `KontextPolicy(compile_transformer=True)` (compiled after FSDP sharding); "
                "switching adapters (NFT: old, base, trained) adds graphs, so measure on GPU before making it the "
                "default",
            ]
        )
    storage = res["projection"]["storage_mib"]
    rows.append(
        [
            "the previous iteration's rollout kept for logging",
            f"would be one extra rollout resident: {storage['grpo_fp32']:,.0f} MiB per GPU at the paper setting "
            "(full SDE, fp32 states)",
            "applied: `FlowRLModule.last_rollout` is a `RolloutPreview` (the first rows' uint8 images only), so one "
            "rollout is resident at a time",
        ]
    )
    rows.append(
        [
            "host synchronisation inside the update loop",
            "not measurable on CPU (no asynchronous device)",
            "applied: stats and losses stay device tensors until the end of the optimiser step (one finiteness "
            "sync per step, one transfer of all stats per update); micro-batch weights are read from a host copy",
        ]
    )
    overhead = statistics.median(res["overhead"]["grpo"]["ratios"])
    rollout_part = statistics.median(res["overhead"]["grpo"]["rollout"])
    update_part = statistics.median(res["overhead"]["grpo"]["update"])
    rows.append(
        [
            "the rest of the loop (sampler math, bookkeeping, loss, Lightning)",
            f"iteration {_x(overhead)}, rollout {_x(rollout_part)}, update {_x(update_part)} of their unavoidable "
            "passes (full-SDE GRPO, tiny model)",
            "no change needed: no part of the loop is far above its passes"
            if overhead <= 1.15
            else "above the 1.15 target at these sizes: profile before changing anything",
        ]
    )
    return Section(
        "Findings for the trainer (item 2)",
        "What this run justifies changing in files this benchmark does not own; each with its measured effect.",
        ["finding", "measured", "proposed change"],
        rows,
    )


FLUX_HEAD_DIM = 128  # FLUX.1 attention head width (FluxArch counts FLOPs from the model width alone)


def projection(ctx: Context) -> list[Section]:
    from torch.utils.flop_counter import FlopCounterMode

    log("projection: FLOP counts of the real architectures on the meta device")
    arch = FluxArch()
    setting = PaperSetting()
    # Cross-check the analytic transformer count and measure the VAE on the real diffusers classes (meta device).
    from diffusers import AutoencoderKL

    image_tokens = setting.target_tokens + setting.reference_tokens
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured_forward = counted_flux_flops(
            arch, arch.hidden // FLUX_HEAD_DIM, image_tokens, setting.text_tokens
        )
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=16,
            norm_num_groups=32,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        pixels = torch.empty(1, 3, setting.image_side, setting.image_side)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            latents = vae.encode(pixels).latent_dist.mode()
        encode = counter.get_total_flops()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            vae.decode(latents)
        decode = counter.get_total_flops()
    analytic = flux_forward_flops(arch, image_tokens, setting.text_tokens).total
    setting = PaperSetting(vae_encode_flops=float(encode), vae_decode_flops=float(decode))
    hardware = Hardware()
    modes = [
        ("grpo", "GRPO full SDE", setting),
        ("grpo_window", f"GRPO window W = {setting.window}", setting),
    ]
    for d in (1, 2, 4):
        modes.append(("nft", f"NFT D = {d}", PaperSetting(**{**asdict(setting), "nft_draws": d})))
    table = Section(
        "GPU projection: one paper-setting iteration on 8 x H100",
        f"FLUX.1-Kontext-dev ({arch.double_blocks} double + {arch.single_blocks} single blocks, hidden {arch.hidden}, "
        f"{arch.hidden // FLUX_HEAD_DIM} heads; {arch.in_channels}-channel packed "
        f"latents) at 512 px: {setting.target_tokens} target + {setting.reference_tokens} reference + "
        f"{setting.text_tokens} text tokens, LoRA r = {setting.lora_rank}. Per GPU: B = {setting.chains_per_gpu} chain "
        f"(the 8 GPUs hold {8 * setting.chains_per_gpu} chains = {8 * setting.trajectories_per_gpu} trajectories), G = "
        f"{setting.group_size}, K = {setting.num_turns}, T = {setting.num_steps}. Time = FLOPs / "
        f"({hardware.utilization:.0%} x {hardware.peak_flops / 1e12:.0f} TFLOP/s bf16 dense); judge decoding "
        f"bandwidth-bound at {hardware.bandwidth_utilization:.0%} of 3.35 TB/s. Judge: Qwen3-VL-8B, 4 images x "
        f"{(setting.image_side // 32) ** 2} tokens + {setting.judge_text_tokens} text tokens prefill, "
        f"{setting.judge_output_tokens} thinking tokens generated, per trajectory. TFLOP per GPU; times in seconds.",
        [
            "mode",
            "rollout",
            "VAE + text",
            "train (+ NFT old/ref)",
            "judge",
            "total TFLOP",
            "iteration",
            "vs full SDE",
        ],
    )
    full_total = None
    projections = {}
    for loss, label, s in modes:
        p = project_iteration(s, loss, hardware)
        projections[label] = {"flops": p.flops, "seconds": p.seconds, "total_s": p.total_seconds}
        train = p.flops["train"] + p.flops.get("nft_old_ref", 0.0)
        train_s = p.seconds["train"] + p.seconds.get("nft_old_ref", 0.0)
        judge_s = p.seconds["judge_prefill"] + p.seconds["judge_decode"]
        full_total = full_total or p.total_seconds
        table.rows.append(
            [
                label,
                f"{_t(p.flops['rollout'])} / {p.seconds['rollout']:.1f} s",
                f"{_t(p.flops['vae'] + p.flops['text'])} / {p.seconds['vae'] + p.seconds['text']:.1f} s",
                f"{_t(train)} / {train_s:.1f} s",
                f"{_t(p.flops['judge_prefill'] + p.flops['judge_decode'])} / {judge_s:.1f} s",
                _t(sum(p.flops.values())),
                f"{p.total_seconds:.0f} s",
                _x(full_total / p.total_seconds),
            ]
        )
    ratios = ctx.results.get("overhead", {}).get("grpo", {}).get("ratios")
    overhead = statistics.median(ratios) if ratios else None
    table.notes += [
        f"The analytic transformer count ({analytic / 1e12:.2f} TFLOP per forward) equals `FlopCounterMode` on the "
        f"real diffusers `FluxTransformer2DModel` built on the meta device ({measured_forward / 1e12:.2f} TFLOP); the "
        f"VAE costs are measured the same way on FLUX's `AutoencoderKL` config: encode {encode / 1e12:.2f}, decode "
        f"{decode / 1e12:.2f} TFLOP per 512 px image.",
        "LoRA training on a frozen base: backward = input gradients of the block projections + 2 x attention + 2 x "
        "LoRA (no weight gradients of the base); NFT adds an old-adapter and a reference forward per sample.",
        "Not modelled: FSDP all-gathers (a bf16 replica, 24 GB, fits each 80 GB GPU during rollout), the text "
        "encoder's CLIP half (negligible), elementwise kernels, host overhead. At 40% MFU one full-SDE iteration is "
        f"{full_total / 60:.1f} min; the CPU-measured framework overhead ({overhead:.2f}x of the model passes at tiny "
        "size, where the passes are cheapest relative to Python) bounds what mtflow adds on top."
        if overhead
        else "Not modelled: FSDP all-gathers, elementwise kernels, host overhead.",
        "Judge placement: the 8 GPUs run it between rollout and update (time-shared); with a separate judge node "
        "and `overlap_scoring`, its time leaves the critical path except for GRPO's wait.",
        "Stored rollout per GPU at this setting (`rollout_storage_bytes`): "
        + ", ".join(
            f"{label} {sum(rollout_storage_bytes(setting, loss, size).values()) / 2**20:,.0f} MiB"
            for label, loss, size in (
                ("full SDE fp32", "grpo", 4),
                ("full SDE bf16", "grpo", 2),
                ("window fp32", "grpo_window", 4),
                ("NFT", "nft", 4),
            )
        )
        + ".",
    ]
    ctx.results["projection"] = {
        "storage_mib": {
            "grpo_fp32": sum(rollout_storage_bytes(setting, "grpo", 4).values()) / 2**20,
            "grpo_bf16": sum(rollout_storage_bytes(setting, "grpo", 2).values()) / 2**20,
        },
        "analytic_forward": analytic,
        "measured_forward": measured_forward,
        "vae_encode": encode,
        "vae_decode": decode,
        "modes": projections,
    }
    anchors = Section(
        "Anchors' published compute",
        "Only what could be read in public sources with the search tools available here (no internet access "
        "beyond them):",
        ["anchor", "published GPU-hours", "what could be cited instead"],
        [
            [
                "Flow-GRPO (arXiv 2505.05470)",
                "not found",
                "abstract: GenEval 63% -> 95% on SD3.5-M; no GPU-hour figure found in the readable text",
            ],
            [
                "DiffusionNFT (arXiv 2509.16117)",
                "not found",
                "abstract: 'up to 25x more efficient than FlowGRPO in head-to-head comparisons'; GenEval 0.24 -> 0.98 "
                "within 1k steps vs FlowGRPO 0.95 with over 5k steps and CFG",
            ],
            [
                "Edit-R1 / UniWorld-V2 (arXiv 2510.16888)",
                "not found",
                "abstract: DiffusionNFT + MLLM logit reward, ImgEdit 4.49 / GEdit-Bench 7.83; no compute figure found",
            ],
            [
                "ImageEdit-R1 (papers/imageedit-r1.txt)",
                "not found",
                "'Experiments are conducted using eight 80GB NVIDIA A100 GPUs' (EasyR1 / verl); no duration",
            ],
        ],
    )
    return [table, anchors]


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("tiny model")
    m.add_argument("--layers", type=int, default=1, help="double-stream blocks")
    m.add_argument("--single-layers", type=int, default=1, help="single-stream blocks")
    m.add_argument("--heads", type=int, default=2, help="attention heads")
    m.add_argument("--head-dim", type=int, default=16, help="attention head width (multiple of 4)")
    m.add_argument("--text-width", type=int, default=32, help="T5 / CLIP width")
    m.add_argument("--resolution", type=int, default=32, help="image side in pixels (multiple of 4)")
    m.add_argument("--text-tokens", type=int, default=32, help="T5 tokens per instruction")
    m.add_argument("--lora-rank", type=int, default=4, help="LoRA rank")
    s = p.add_argument_group("iteration")
    s.add_argument("--chains", "-B", type=int, default=2, help="B chains per iteration")
    s.add_argument("--group", "-G", type=int, default=8, help="G trajectories per chain")
    s.add_argument("--turns", "-K", type=int, default=3, help="K turns")
    s.add_argument("--steps", "-T", type=int, default=12, help="T sampler steps")
    s.add_argument("--window", "-W", type=int, default=2, help="W trained steps in window mode")
    s.add_argument("--nft-draws", type=int, nargs="+", default=[1, 2, 4], help="NFT noised copies per turn")
    s.add_argument("--forward-batch", "-F", type=int, default=16, help="samples per network call")
    r = p.add_argument_group("measurement")
    r.add_argument("--rounds", type=int, default=3, help="passes through all loss configurations")
    r.add_argument("--repeats", type=int, default=2, help="timed iterations per configuration and round")
    r.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    r.add_argument("--pass-repeats", type=int, default=5, help="timed calls per model pass")
    r.add_argument("--naive-repeats", type=int, default=2, help="timed naive iterations")
    r.add_argument("--batching-repeats", type=int, default=2, help="timed rollouts per batch size")
    r.add_argument("--growth-group", type=int, nargs="*", default=[2, 4, 8], help="G points")
    r.add_argument("--growth-steps", type=int, nargs="*", default=[3, 6, 12], help="T points")
    r.add_argument("--growth-turns", type=int, nargs="*", default=[1, 2, 3], help="K points")
    r.add_argument("--growth-repeats", type=int, default=2, help="timed iterations per growth point")
    r.add_argument(
        "--judge-delay", type=float, default=0.3, help="emulated judge latency (s) for the overlap test"
    )
    r.add_argument("--skip-compile", action="store_true", help="skip the torch.compile measurement")
    r.add_argument(
        "--no-naive-nft", dest="naive_nft", action="store_false", help="time only the naive GRPO loop"
    )
    r.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    r.add_argument("--model-root", default=None, help="where tiny models are built (default: a temp dir)")
    r.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one repeat, no compile")
    o = p.add_argument_group("output")
    o.add_argument("--write", default=None, help="write the Markdown report here (e.g. BENCHMARKS.md)")
    o.add_argument("--json", default=None, help="write raw results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.chains, args.group, args.turns, args.steps, args.forward_batch = 1, 4, 2, 4, 4
        args.rounds, args.repeats, args.pass_repeats, args.naive_repeats, args.batching_repeats = (
            1,
            1,
            2,
            1,
            1,
        )
        args.nft_draws = [1, 2]
        args.growth_group, args.growth_steps, args.growth_turns = [2, 4], [], []
        args.growth_repeats, args.skip_compile, args.judge_delay = 1, True, 0.05
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    spec = ModelSpec(
        num_layers=args.layers,
        num_single_layers=args.single_layers,
        attention_head_dim=args.head_dim,
        num_attention_heads=args.heads,
        text_width=args.text_width,
        resolution=args.resolution,
        max_sequence_length=args.text_tokens,
        lora_rank=args.lora_rank,
    )
    root = Path(args.model_root or tempfile.mkdtemp(prefix="mtflow-bench-models-"))
    log(f"building / loading the tiny model under {root}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_path = build_model(spec, root)
    policy = load_policy(model_path, spec)
    chains = bench_chains(4 * args.chains, args.turns, size=args.resolution)
    base = {
        "group_size": args.group,
        "num_steps": args.steps,
        "window_size": args.window,
        "forward_batch_size": args.forward_batch,
    }
    ctx = Context(args, spec, model_path, policy, chains, base)
    sections: list[Section] = []
    sections.append(loss_modes(ctx))
    main_overhead, detail = overhead(ctx)
    sections += [main_overhead, detail]
    sections.append(naive_comparison(ctx))
    opt = optimisations(ctx)
    fits, gc_row, compile_row = growth(ctx)
    opt.rows.append(gc_row)
    if compile_row:
        opt.rows.append(compile_row)
    else:
        opt.notes.append("`torch.compile` skipped (`--skip-compile`).")
    sections += [opt, fits]
    sections.insert(0, summary(ctx))
    sections += projection(ctx)
    sections.append(findings(ctx))
    elapsed = time.perf_counter() - started
    command = "python " + " ".join(
        shlex.quote(x) for x in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    )
    header = (
        "# mtflow benchmarks\n\n"
        "Produced by `tools/bench.py` in one run (all numbers below come from it):\n\n"
        f"    {command}\n\n"
        f"Machine: {os.cpu_count()} CPU cores shared with other jobs (load average {load_before:.1f} at start), "
        f"{args.threads} torch thread(s), torch {torch.__version__}, Python {platform.python_version()}; total "
        f"runtime {elapsed / 60:.1f} min. Tiny Kontext model (real diffusers / transformers classes): "
        f"{spec.num_layers} double + {spec.num_single_layers} single blocks, {spec.num_attention_heads} heads x "
        f"{spec.attention_head_dim}, text width {spec.text_width}, {spec.resolution} px "
        f"({(spec.resolution // 4) ** 2} target tokens + as many reference tokens + {spec.max_sequence_length} text "
        f"tokens), LoRA r = {spec.lora_rank}, float32, judge = `BrightnessScorer`. Wall times are medians; CPU "
        "ratios say where time goes, the GPU projection says what it costs at scale.\n"
    )
    report = header + "\n" + "\n".join(s.markdown() for s in sections)
    print(report)
    log(f"done in {elapsed / 60:.1f} min")
    if args.write:
        Path(args.write).write_text(report)
        log(f"wrote {args.write}")
    if args.json:
        Path(args.json).write_text(json.dumps(ctx.results, indent=1, default=str))
    return ctx.results


if __name__ == "__main__":
    main()
