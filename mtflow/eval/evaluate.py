"""Evaluation rollouts: deterministic K-turn edits of held-out chains, one judge pass, EdiVal-style report.

Conditions (each a deterministic rollout of the same chains with the same per-chain noise, so they are paired):

- ``model``: the trained (or EMA) adapter, turn by turn on its own outputs;
- ``base``: the frozen base (adapters disabled);
- ``merged``: the single-turn-merged baseline: all K instructions delivered as one edit (ImageEdit-R1's
  delivery), judged against the final target.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from mtflow.data.loader import batches_by_size
from mtflow.data.records import EditChain
from mtflow.eval.metrics import MULTI_TURN, SINGLE_TURN_MERGED, compute_eval_metrics, paired_final_difference
from mtflow.eval.report import EvalReport
from mtflow.models.base import EditPolicy
from mtflow.reward.base import ScoreBatch, Scorer, ScoringItem
from mtflow.rollout import Rollout, RolloutConfig, rollout, uint8_to_pil

CONDITIONS = ("model", "base", "merged")


@dataclass(frozen=True)
class EvalConfig:
    """Deterministic held-out evaluation (``mtflow validate`` / ``test`` and the held-out table of ``fit``).

    Attributes:
        threshold: IF score that counts as a successful turn.
        num_steps: sampler steps of evaluation rollouts (None: the rollout's ``num_steps``).
        conditions: what ``mtflow test`` evaluates: any of "model", "base" (adapters disabled) and "merged" (all K
            instructions as one edit); None: all three.
        bootstrap: bootstrap resamples for the confidence intervals of ``mtflow test``.
    """

    threshold: float = 4.0
    num_steps: int | None = None
    conditions: list[str] | None = None
    bootstrap: int = 1000

    def __post_init__(self) -> None:
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(
                f"EvalConfig.num_steps must be >= 1 (or None for the rollout's), got {self.num_steps}"
            )
        unknown = [c for c in self.conditions or () if c not in CONDITIONS]
        if unknown:
            raise ValueError(f"EvalConfig.conditions: unknown {unknown}; expected any of {CONDITIONS}")
        if self.bootstrap < 0:
            raise ValueError(f"EvalConfig.bootstrap must be >= 0, got {self.bootstrap}")


def merged_chain(chain: EditChain, scorer: Scorer | None = None) -> EditChain:
    """One-turn chain whose instruction is the K instructions in order ("A. Then B. Then C."). A judge that reads
    ground truth from the chain's metadata (the toy world's exact judge) provides ``merged_metadata(metadata,
    instruction)`` to turn it into the merged edit's; other judges see the metadata unchanged."""
    parts = [text.strip().rstrip(".") for text in chain.instructions]
    instruction = ". Then ".join(parts) + "."
    metadata = dict(chain.metadata)
    merge = getattr(scorer, "merged_metadata", None)
    if merge is not None:
        metadata = merge(metadata, instruction)
    return EditChain(f"{chain.chain_id}", chain.source, [instruction], None, metadata)


def scoring_items(result: Rollout) -> list[ScoringItem]:
    """One judge item per trajectory: its chain's source, its K outputs, the K instructions."""
    images = result.images.cpu()  # one device-to-host copy for every output
    sources = [
        uint8_to_pil(source) for source in result.source_images.cpu()
    ]  # one per chain, shared by its G
    items = []
    for n in range(result.num_trajectories):
        b = result.chain_of(n)
        chain = result.chains[b]
        items.append(
            ScoringItem(
                item_id=result.item_id(n),
                chain_id=chain.chain_id,
                source=sources[b],
                outputs=[uint8_to_pil(images[n, k]) for k in range(result.num_turns)],
                instructions=list(chain.instructions),
                metadata=chain.metadata,
            )
        )
    return items


def eval_generator(chain_id: str, seed: int, device: torch.device | str) -> torch.Generator:
    """The evaluation generator of one chain: seeded by (seed, chain id) only."""
    return torch.Generator(device=device).manual_seed(zlib.crc32(f"{seed}/eval/{chain_id}".encode()))


def eval_generators(
    chains: Sequence[EditChain], seed: int, device: torch.device | str
) -> list[torch.Generator]:
    """Fixed noise per chain (independent of iteration, batch and condition): evaluations are paired."""
    return [eval_generator(c.chain_id, seed, device) for c in chains]


def paired_eval_generators(
    policy: EditPolicy,
    noise_from: Sequence[tuple[str, int]],
    seed: int,
    sizes: Sequence[tuple[int, int]] | None = None,
) -> list[torch.Generator]:
    """Per chain, the generator of chain ``chain_id`` (``eval_generators``) advanced past the initial noise of its
    first ``turn`` turns: a 1-turn chain then starts from exactly the noise turn ``turn + 1`` of that chain started
    from (deterministic sampling draws only one initial noise per turn). Pairs teacher-forced turns with the
    model's own chained turns, so the two differ only in their input image. ``sizes``: each chain's edit size
    (the noise's shape; None: the policy's square)."""
    generators = []
    for index, (chain_id, turn) in enumerate(noise_from):
        generator = eval_generator(chain_id, seed, policy.device)
        for _ in range(turn):
            policy.initial_noise(1, generator, None if sizes is None else sizes[index])
        generators.append(generator)
    return generators


@dataclass
class ConditionScores:
    """Scores of one condition. ``chain_ids`` [N] align with the rows of ``scores`` ([N, K])."""

    kind: str
    chain_ids: list[str] = field(default_factory=list)
    batches: list[ScoreBatch] = field(default_factory=list)
    items: list[ScoringItem] = field(default_factory=list)

    def add(
        self, chain_ids: list[str], scores: ScoreBatch, items: list[ScoringItem], keep_items: int
    ) -> None:
        self.chain_ids += chain_ids
        self.batches.append(scores)
        room = max(keep_items - len(self.items), 0)
        self.items += items[:room]

    @property
    def scores(self) -> ScoreBatch:
        return ScoreBatch.concat(self.batches)

    def item_scores(self) -> ScoreBatch | None:
        """[len(items), K] scores of the kept ``items`` (``add`` keeps the first rows, in order), for the image
        grid's captions; None when no item is kept."""
        if not self.items:
            return None
        return self.scores.first(len(self.items))


def rollout_and_score(
    policy: EditPolicy,
    scorer: Scorer,
    chains: Sequence[EditChain],
    *,
    condition: str,
    adapter: str | None,
    num_steps: int,
    forward_batch_size: int,
    seed: int,
    chain_through: str = "pixels",
    noise_from: Sequence[tuple[str, int]] | None = None,
) -> tuple[ScoreBatch, list[ScoringItem]]:
    """Deterministic rollout of ``chains`` under one condition, then one judge call (``chain_through``: see
    ``RolloutConfig``; ``noise_from``: see ``paired_eval_generators``, None: each chain's own noise)."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown evaluation condition {condition!r}; expected one of {CONDITIONS}")
    if condition == "merged":
        chains = [merged_chain(c, scorer) for c in chains]
    config = RolloutConfig(
        group_size=1, num_steps=num_steps, forward_batch_size=forward_batch_size, chain_through=chain_through
    )  # no SDEConfig: deterministic
    if noise_from is None:
        generators = eval_generators(chains, seed, policy.device)
    else:  # a length mismatch is refused by rollout (one generator per chain)
        sizes = [policy.edit_size(chain.source.size) for chain in chains]
        generators = paired_eval_generators(policy, noise_from, seed, sizes)
    result = rollout(policy, chains, config, generator=generators, adapter=adapter)
    items = scoring_items(result)
    return scorer.score(items), items


def build_report(
    conditions: dict[str, ConditionScores],
    *,
    threshold: float = 4.0,
    num_bootstrap: int = 1000,
    seed: int = 0,
    info: dict | None = None,
) -> EvalReport:
    """Metrics per condition (duplicates removed by chain id, rows aligned across conditions) and the paired
    last-turn comparisons model - base and model - merged."""
    aligned: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    reference_ids: list[str] | None = None
    for name, condition in conditions.items():
        scores = condition.scores
        first: dict[str, int] = {}
        for row, chain_id in enumerate(condition.chain_ids):
            first.setdefault(chain_id, row)
        ids = sorted(first)
        if reference_ids is None:
            reference_ids = ids
        elif ids != reference_ids:
            raise ValueError(f"condition {name!r} scored different chains than the others")
        rows = torch.tensor([first[i] for i in ids], dtype=torch.long)
        aligned[name] = (
            scores.instruction_following[rows],
            scores.content_consistency[rows],
            scores.scored[rows],
        )
    metrics = {
        name: compute_eval_metrics(
            *aligned[name],
            threshold=threshold,
            num_bootstrap=num_bootstrap,
            seed=seed,
            kind=conditions[name].kind,
        )
        for name in conditions
    }
    comparisons = {}
    if "model" in aligned:
        for other in ("base", "merged"):
            if other in aligned:
                comparisons[f"model-{other}"] = paired_final_difference(
                    aligned["model"],
                    aligned[other],
                    threshold=threshold,
                    num_bootstrap=num_bootstrap,
                    seed=seed,
                )
    primary = "model" if "model" in metrics else next(iter(metrics))
    return EvalReport(conditions=metrics, primary=primary, comparisons=comparisons, info=dict(info or {}))


def evaluate_chains(
    policy: EditPolicy,
    scorer: Scorer,
    chains: Sequence[EditChain],
    *,
    conditions: Sequence[str] = ("model", "base", "merged"),
    model_adapter: str | None = "default",
    num_steps: int = 12,
    batch_size: int = 8,
    forward_batch_size: int = 16,
    seed: int = 0,
    threshold: float = 4.0,
    num_bootstrap: int = 1000,
    keep_items: int = 4,
    info: dict | None = None,
    chain_through: str = "pixels",
    noise_from: Sequence[tuple[str, int]] | None = None,
    progress: str | None = None,
) -> tuple[EvalReport, dict[str, ConditionScores]]:
    """Evaluate ``chains`` under each condition, ``batch_size`` chains per rollout; returns the report and the
    raw per-condition scores (with the first ``keep_items`` trajectories for an image grid). ``chain_through``:
    what turn k+1 is conditioned on (see ``RolloutConfig``; "pixels" is what users get). ``noise_from``: per
    chain, whose noise to start from (``paired_eval_generators``; None: each chain's own). ``progress``: a label
    for a progress bar over the chains on stderr (None: silent)."""
    if noise_from is not None and len(noise_from) != len(chains):
        raise ValueError(f"noise_from has {len(noise_from)} entries for {len(chains)} chains")
    collected = {
        name: ConditionScores(kind=SINGLE_TURN_MERGED if name == "merged" else MULTI_TURN)
        for name in conditions
    }
    bar = tqdm(
        total=len(chains) * len(conditions),
        desc=progress,
        unit="chain",
        disable=progress is None,
        leave=False,
    )
    # a rollout edits one size: chains are batched within their policy bucket (in order; one bucket: plain slices)
    for rows in batches_by_size(
        range(len(chains)), batch_size, lambda i: policy.edit_size(chains[i].source.size)
    ):
        batch = [chains[i] for i in rows]
        for name in conditions:
            adapter = None if name == "base" else model_adapter
            scores, items = rollout_and_score(
                policy,
                scorer,
                batch,
                condition=name,
                adapter=adapter,
                num_steps=num_steps,
                forward_batch_size=forward_batch_size,
                seed=seed,
                chain_through=chain_through,
                noise_from=None if noise_from is None else [noise_from[i] for i in rows],
            )
            collected[name].add([c.chain_id for c in batch], scores, items, keep_items)
            bar.update(len(batch))
    bar.close()
    report = build_report(collected, threshold=threshold, num_bootstrap=num_bootstrap, seed=seed, info=info)
    return report, collected


def turn_table(report: EvalReport, names: Sequence[str] | None = None) -> str:
    """Plain-text table of per-turn cumulative success C_k, consistency CC_k and overall O_k per condition."""
    names = list(names or report.conditions)
    lines = [f"{'condition':<12}{'turn':>5}{'C_k %':>9}{'CC_k':>8}{'O_k':>8}{'M_k %':>9}"]
    for name in names:
        metrics = report.conditions[name]
        for k in range(metrics.num_turns):
            row = [
                metrics.cumulative_success[k],
                metrics.consistency[k],
                metrics.overall[k],
                metrics.marginal_success[k],
            ]
            values = "".join(f"{_fmt(e.value):>{w}}" for e, w in zip(row, (9, 8, 8, 9)))
            lines.append(f"{name:<12}{k + 1:>5}{values}")
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def before_after_table(before: EvalReport, after: EvalReport, condition: str = "model") -> str:
    """Markdown table: per turn, C_k / CC_k / O_k / M_k before and after, with the change in points."""
    a, b = before.conditions[condition], after.conditions[condition]
    lines = [
        "| turn | C_k before | C_k after | CC_k before | CC_k after | O_k before | O_k after | O_k change |"
        " M_k before | M_k after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for k in range(a.num_turns):
        change = b.overall[k].value - a.overall[k].value
        cells = [
            a.cumulative_success[k].value,
            b.cumulative_success[k].value,
            a.consistency[k].value,
            b.consistency[k].value,
            a.overall[k].value,
            b.overall[k].value,
        ]
        row = " | ".join(_fmt(v) for v in cells)
        lines.append(
            f"| {k + 1} | {row} | {change:+.1f} | {_fmt(a.marginal_success[k].value)} |"
            f" {_fmt(b.marginal_success[k].value)} |"
        )
    lines.append(
        f"\nexposure bias M_1 - M_K: {_fmt(a.exposure_bias.value)} before, {_fmt(b.exposure_bias.value)} after "
        f"({a.num_scored_chains} chains)"
    )
    return "\n".join(lines)
