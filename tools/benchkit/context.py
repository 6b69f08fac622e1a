"""What the sections of ``tools/bench.py`` share: the parsed options, the tiny model and its policy, the chains,
the base configuration of every fit, the runs measured so far and the raw results; plus the timing of the passes
one configuration cannot avoid."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from benchkit.harness import ModelSpec, RunResult
from benchkit.passes import IterationShape, PassTimer, model_passes, pass_adapter
from benchkit.timing import time_calls
from mtflow.algorithms import GRPO, Algorithm
from mtflow.eval.evaluate import scoring_items
from mtflow.rollout import RolloutConfig, rollout
from mtflow.sampling import SDEConfig
from mtflow.testing.scorers import BrightnessScorer

ROLLOUT_PASSES = ("text_encode", "vae_encode", "rollout_forward", "vae_decode")
UPDATE_PASSES = ("train_forward_backward", "optimizer_step")


@dataclass
class Context:
    """State shared by the report's sections.

    Attributes:
        args: the command line (``tools/bench.py``'s ``parse_args``).
        spec: the tiny model's sizes.
        model_path: its folder.
        policy: the loaded ``KontextPolicy`` every in-process measurement uses.
        chains: benchmark chains (more than one iteration's worth).
        rollout: the base ``RolloutConfig`` (G, T, forward batch) of every fit.
        runs: merged runs per loss mode ("grpo", "grpo_window", "nft_d<D>").
        algorithms: the algorithm of each loss mode.
        rounds, pass_totals: per round, each mode's run and the seconds of its unavoidable passes by kind.
        grpo_pass_seconds: seconds per call of each pass of full-SDE GRPO (last round).
        judge_items: one rollout's judge items, built once.
        shapes: each loss mode's ``IterationShape``.
        results: raw numbers (``--json``).
    """

    args: argparse.Namespace
    spec: ModelSpec
    model_path: Path
    policy: Any
    chains: list
    rollout: RolloutConfig
    runs: dict[str, RunResult] = field(default_factory=dict)
    algorithms: dict[str, Algorithm] = field(default_factory=dict)
    rounds: list[dict[str, RunResult]] = field(default_factory=list)
    pass_totals: list[dict[str, dict[str, float]]] = field(default_factory=list)
    grpo_pass_seconds: dict[str, float] = field(default_factory=dict)
    judge_items: list | None = None
    shapes: dict[str, IterationShape] = field(default_factory=dict)
    results: dict = field(default_factory=dict)

    def grpo(self, **knobs: Any) -> GRPO:
        """GRPO with the benchmark's window size W (used in window mode only)."""
        return GRPO(window_size=self.args.window, **knobs)

    def module(self, algorithm: Algorithm, **rollout: Any) -> dict[str, Any]:
        """``FlowRLModule`` keyword arguments: ``algorithm`` on the base rollout config with ``rollout`` changed."""
        return {"algorithm": algorithm, "rollout": replace(self.rollout, **rollout)}

    def shape(self, algorithm: Algorithm) -> IterationShape:
        """The pass model of one iteration of ``algorithm`` at the benchmark's B, K and rollout config."""
        return IterationShape.of(algorithm, self.rollout, self.args.chains, self.args.turns)


def judge_items(ctx: Context) -> list:
    """Judge items of one rollout of the benchmark's size (an SDE rollout of the trained adapter, built once)."""
    if ctx.judge_items is None:
        sample = rollout(
            ctx.policy,
            ctx.chains[: ctx.args.chains],
            ctx.rollout,
            generator=torch.Generator().manual_seed(0),
            sde=SDEConfig(),
        )
        ctx.judge_items = scoring_items(sample)
    return ctx.judge_items


def time_passes(
    ctx: Context, shape: IterationShape, sampling_adapter: str
) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds of every unavoidable pass of one configuration (rollouts with ``sampling_adapter``), each kind timed
    alone now (fresh timer).

    Returns:
        (seconds per pass kind summed over its calls, seconds per single call keyed "name@batch/adapter")
    """
    a = ctx.args
    timer = PassTimer(ctx.policy, repeats=a.pass_repeats)
    items = judge_items(ctx)
    judge_s = time_calls(lambda: BrightnessScorer().score(items), a.pass_repeats).median
    totals: dict[str, float] = {}
    for p in model_passes(shape):
        if p.name == "judge":
            seconds = judge_s
        else:
            seconds = timer.seconds(p.name, p.batch_size, pass_adapter(p.name, sampling_adapter))
        totals[p.name] = totals.get(p.name, 0.0) + seconds * p.calls
    per_call = {f"{k[0]}@{k[1]}/{k[2]}": v for k, v in timer.cache.items()}
    per_call["judge"] = judge_s
    return totals, per_call
