"""mtflow's batched loop vs an anchor-style loop (``benchkit.naive``: one trajectory at a time, text encoded per
sample and turn, no caching, the source encoded per trajectory, per-sample recomputation), after checking both produce
the same rollout on the same seeds."""

from __future__ import annotations

import statistics
from dataclasses import replace

import torch

from benchkit.context import Context
from benchkit.harness import RunResult, run_iterations
from benchkit.naive import NaiveLoop, naive_log_prob, naive_rollout
from benchkit.report import Section, fmt_s, fmt_x, log
from benchkit.timing import count_calls
from mtflow.algorithms import NFT
from mtflow.rollout import rollout
from mtflow.testing.scorers import BrightnessScorer


def naive_comparison(ctx: Context) -> Section:
    """Check that the naive loop reproduces mtflow's rollout on the same seeds, then time naive iterations
    interleaved with mtflow fits (GRPO, and NFT at the largest D unless ``--no-naive-nft``)."""
    a = ctx.args
    policy = ctx.policy
    chains = ctx.chains[: a.chains]
    config = ctx.rollout
    sde = ctx.grpo().sde()  # GRPO's rollout: every step stochastic and recorded
    log("naive: same-seed rollout check")

    def gens():
        return [torch.Generator().manual_seed(1000 + b) for b in range(len(chains))]

    batched = rollout(policy, chains, config, generator=gens(), sde=sde)
    naive = naive_rollout(policy, chains, config, generator=gens(), sde=sde)
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
    for loss, algorithm in (("grpo", ctx.grpo()), ("nft", NFT(train_timesteps=largest))):
        if loss == "nft" and not a.naive_nft:
            continue
        loop = NaiveLoop(policy, BrightnessScorer(), algorithm, replace(ctx.rollout, forward_batch_size=1))
        module = ctx.module(algorithm)
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
        rows.append([label, fmt_s(naive_s), fmt_s(mine.iteration_s), fmt_x(naive_s / mine.iteration_s)])
        ctx.results.setdefault("naive", {})[loss] = {
            "naive_walls": naive_walls,
            "mtflow_walls": [w + mine.gap for w in mine.walls],
        }
    ctx.results.setdefault("naive", {})["checks"] = checks
    ctx.results["naive"]["counts"] = counts
    section = Section(
        "mtflow vs the anchor-style loop",
        f"Same work, same numbers, B = {a.chains}, G = {a.group}, K = {a.turns}, T = {a.steps}. The naive loop "
        "(`tools/benchkit/naive.py`) runs one trajectory at a time (batch 1 everywhere), encodes the instruction per "
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
