"""The VLM judge: per-turn instruction following (IF) and content consistency (CC) from a vision-language model.

Two scoring modes (docs/design.md section 4):

- ``thinking``: the judge writes an analysis and tagged scores; ``mtflow.reward.parser`` reads them. Turns it
  cannot read are NaN and unscored.
- ``non_thinking``: one prompt per turn asking for a single digit; the score is the expectation of the digit
  under the first answer token's distribution renormalised over the candidate digits (``expected_scores``).

Binary variants ask for 0/1 and report 1 + 4 * answer on the shared 1-5 scale (``mtflow.reward.base``).
CC comes from the same judge with the preservation prompt, or from any ``TurnScorer`` such as
``FeatureSimilarityCC``.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mtflow.reward.backends import JudgeBackend
from mtflow.reward.base import ScoreBatch, ScorerUnavailableError, ScoringItem
from mtflow.reward.parser import parse_single_score, parse_turn_scores
from mtflow.reward.prompts import Criterion, build_prompts, score_range
from mtflow.reward.wire import check_same_turns


@dataclass
class TurnScores:
    """One criterion's scores for N items with K turns.

    Attributes:
        scores: [N, K] float32 on the 1-5 scale; NaN where not scored.
        diagnostics: N dicts explaining each item's scores (raw answers, probabilities, errors).
    """

    scores: torch.Tensor
    diagnostics: list[dict[str, Any]] = field(default_factory=list)


class TurnScorer(ABC):
    """Scores one criterion (e.g. CC) per turn; plugs into ``VLMJudge`` in place of a judge prompt."""

    @abstractmethod
    def score_turns(self, items: Sequence[ScoringItem]) -> TurnScores:
        """Scores [N, K] on the 1-5 scale for ``items`` (all with K turns)."""

    def describe(self) -> dict[str, Any]:
        """Facts for logs and ``/health``."""
        return {"scorer": type(self).__name__}


def expected_scores(
    logprobs: torch.Tensor, values: torch.Tensor, min_mass: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expected score under the candidate tokens' distribution renormalised over the candidates.

    Args:
        logprobs: [P, C] log-probabilities of the C candidate tokens at the first answer position (full-vocabulary
            normalisation; -inf for unreported candidates, NaN rows for failed prompts).
        values: [C] score each candidate stands for on the 1-5 scale (e.g. 1..5, or 1 and 5 for "0"/"1").
        min_mass: prompts whose candidates hold less total probability than this are unscored.

    Returns:
        scores: [P] float64 expected scores; NaN where unscored.
        probs: [P, C] float64 renormalised candidate probabilities (NaN rows where unscored).
        mass: [P] float64 total probability of the candidates before renormalisation.
    """
    logprobs = logprobs.to(torch.float64)
    values = values.to(torch.float64)
    total = torch.logsumexp(logprobs, dim=-1)
    mass = total.exp()
    valid = torch.isfinite(total) & ~logprobs.isnan().any(dim=-1) & (mass >= min_mass)
    probs = torch.softmax(torch.where(valid[:, None], logprobs, torch.zeros_like(logprobs)), dim=-1)
    probs = probs.masked_fill(~valid[:, None], math.nan)
    scores = (probs * values).sum(dim=-1)
    return scores, probs, mass.nan_to_num(0.0)


class VLMJudge:
    """Scores trajectories with a vision-language judge (IF and, unless ``cc_scorer`` is set, CC)."""

    def __init__(
        self,
        backend: JudgeBackend,
        mode: Literal["thinking", "non_thinking"] = "non_thinking",
        prompt_style: Literal["multi_turn", "single_turn"] = "multi_turn",
        scale: Literal["likert", "binary"] = "likert",
        cc_scorer: TurnScorer | None = None,
        max_new_tokens: int = 1024,
        min_digit_mass: float = 0.0,
        criteria_together: bool = True,
    ) -> None:
        """
        Args:
            backend: where the judge model runs (``TransformersBackend`` or ``OpenAIBackend``).
            mode: ``thinking`` (generate and parse tagged scores) or ``non_thinking`` (expected digit).
            prompt_style: ``multi_turn`` (judge sees the whole trajectory) or ``single_turn`` (one edit at a time).
            scale: ``likert`` (1-5 rubric) or ``binary`` (0/1, reported as 1/5).
            cc_scorer: CC from this scorer (e.g. ``FeatureSimilarityCC``); None asks the judge's preservation prompt.
            max_new_tokens: answer budget in thinking mode.
            min_digit_mass: non-thinking turns whose digits hold less first-token probability are unscored.
            criteria_together: send a trajectory's IF and CC prompts to the backend in one call, so a
                continuously batching server (vLLM) sees them at once; False sends IF, then CC.
        """
        if mode not in ("thinking", "non_thinking"):
            raise ValueError(f"mode must be 'thinking' or 'non_thinking', got {mode!r}")
        if prompt_style not in ("multi_turn", "single_turn"):
            raise ValueError(f"prompt_style must be 'multi_turn' or 'single_turn', got {prompt_style!r}")
        if scale not in ("likert", "binary"):
            raise ValueError(f"scale must be 'likert' or 'binary', got {scale!r}")
        self.backend = backend
        self.mode = mode
        self.prompt_style = prompt_style
        self.scale = scale
        self.cc_scorer = cc_scorer
        self.max_new_tokens = max_new_tokens
        self.min_digit_mass = min_digit_mass
        self.criteria_together = criteria_together
        low, high = score_range(scale)
        self.candidates = [str(v) for v in range(low, high + 1)]
        self.candidate_values = torch.tensor([self.to_judge_scale(v) for v in range(low, high + 1)])

    def to_judge_scale(self, answer: float) -> float:
        """Map an answer of the asked scale to the shared 1-5 scale (binary 0/1 -> 1/5)."""
        return answer if self.scale == "likert" else 1.0 + 4.0 * answer

    @property
    def input_max_side(self) -> int | None:
        """The longer side every image is downscaled to before the judge sees it (``wire.resize_to_max_side``), so
        the reward service may downscale earlier without changing a score; None when unknown."""
        side = getattr(self.backend, "image_max_side", None)
        return side if self.cc_scorer is None and isinstance(side, int) else None

    def describe(self) -> dict[str, Any]:
        cc = "vlm" if self.cc_scorer is None else self.cc_scorer.describe()
        return {
            "scorer": "VLMJudge",
            "mode": self.mode,
            "prompt_style": self.prompt_style,
            "scale": self.scale,
            "cc": cc,
            **self.backend.describe(),
        }

    def score(self, items: Sequence[ScoringItem]) -> ScoreBatch:
        start = time.perf_counter()
        num_turns = check_same_turns(items, "VLMJudge")
        if self.cc_scorer is None and self.criteria_together:
            (instruction_following, if_prompts, if_errors), (content_consistency, cc_prompts, cc_errors) = (
                self.score_criteria(["if", "cc"], items, num_turns)
            )
        elif self.cc_scorer is None:
            instruction_following, if_prompts, if_errors = self.score_criterion("if", items, num_turns)
            content_consistency, cc_prompts, cc_errors = self.score_criterion("cc", items, num_turns)
        else:
            instruction_following, if_prompts, if_errors = self.score_criterion("if", items, num_turns)
            content_consistency, cc_prompts, cc_errors = self.cc_scorer.score_turns(items), 0, []
        # Some answers came back: the judge is reachable and the failures are per prompt (flagged below).
        # None came back: the judge is down or misconfigured, which the caller must hear about.
        if if_prompts + cc_prompts > 0 and len(if_errors) + len(cc_errors) == if_prompts + cc_prompts:
            raise ScorerUnavailableError(
                f"judge backend {self.backend.describe()} failed on all {if_prompts + cc_prompts} prompts; "
                f"first error: {(if_errors + cc_errors)[0]}"
            )
        if_scores = instruction_following.scores.float()
        cc_scores = content_consistency.scores.float()
        scored = ~(if_scores.isnan() | cc_scores.isnan())
        latency = time.perf_counter() - start
        diagnostics = []
        for i, item in enumerate(items):
            read = int(scored[i].sum())
            status = "ok" if read == num_turns else ("unscored" if read == 0 else "partial")
            diagnostics.append(
                {
                    "item_id": item.item_id,
                    "status": status,
                    "if": instruction_following.diagnostics[i],
                    "cc": content_consistency.diagnostics[i],
                    "latency_s": latency,
                }
            )
        return ScoreBatch(
            instruction_following=if_scores.masked_fill(~scored, math.nan),
            content_consistency=cc_scores.masked_fill(~scored, math.nan),
            scored=scored,
            diagnostics=diagnostics,
            latency_s=latency,
        )

    def score_criterion(
        self, criterion: Criterion, items: Sequence[ScoringItem], num_turns: int
    ) -> tuple[TurnScores, int, list[str]]:
        """[N, K] scores of one criterion from the judge model, the number of prompts sent and their errors."""
        return self.score_criteria([criterion], items, num_turns)[0]

    def score_criteria(
        self, criteria: Sequence[Criterion], items: Sequence[ScoringItem], num_turns: int
    ) -> list[tuple[TurnScores, int, list[str]]]:
        """``score_criterion`` for several criteria, with all their prompts sent in one backend call."""
        per_criterion = [
            [
                build_prompts(
                    criterion,
                    self.prompt_style,
                    self.scale,
                    self.mode,
                    item.source,
                    item.outputs,
                    item.instructions,
                )
                for item in items
            ]
            for criterion in criteria
        ]
        prompts = [prompt for per_item in per_criterion for group in per_item for prompt in group]
        if self.mode == "thinking":
            results = self.backend.generate(prompts, self.max_new_tokens)
        else:
            results = self.backend.first_token_logprobs(prompts, self.candidates)
        outcomes, offset = [], 0
        for per_item in per_criterion:
            count = sum(len(group) for group in per_item)
            outcomes.append(
                self._read_criterion(per_item, results[offset : offset + count], items, num_turns)
            )
            offset += count
        return outcomes

    def _read_criterion(
        self, per_item: list[list], results: list, items: Sequence[ScoringItem], num_turns: int
    ) -> tuple[TurnScores, int, list[str]]:
        errors = [r.error for r in results if r.error is not None]
        scores = torch.full((len(items), num_turns), math.nan, dtype=torch.float64)
        diagnostics: list[dict[str, Any]] = []
        offset = 0
        for i, group in enumerate(per_item):
            group_results = results[offset : offset + len(group)]
            offset += len(group)
            if self.mode == "thinking":
                row, diagnostic = self._read_answers(group_results, num_turns)
            else:
                row, diagnostic = self._read_logprobs(group_results)
            scores[i] = torch.tensor(row, dtype=torch.float64)
            diagnostics.append(diagnostic)
        return TurnScores(scores.float(), diagnostics), len(results), errors

    def _read_answers(self, results: list, num_turns: int) -> tuple[list[float], dict[str, Any]]:
        low, high = score_range(self.scale)
        texts = [r.text for r in results]
        errors = [r.error for r in results if r.error is not None]
        if self.prompt_style == "multi_turn":
            (result,) = results
            parsed = parse_turn_scores(result.text, num_turns, low, high) if result.text is not None else None
            values = parsed.scores if parsed else [math.nan] * num_turns
            status = parsed.status if parsed else "unscored"
            problems = parsed.problems if parsed else []
        else:
            values, problems, statuses = [], [], []
            for k, result in enumerate(results, start=1):
                if result.text is None:
                    values.append(math.nan)
                    statuses.append("unscored")
                    continue
                parsed = parse_single_score(result.text, low, high)
                values += parsed.scores
                statuses.append(parsed.status)
                problems += [f"turn {k}: {p}" for p in parsed.problems]
            read = sum(s == "ok" for s in statuses)
            status = "ok" if read == num_turns else ("unscored" if read == 0 else "partial")
        judged = [math.nan if math.isnan(v) else self.to_judge_scale(v) for v in values]
        diagnostic: dict[str, Any] = {"raw": texts, "parse": status, "problems": problems}
        if errors:
            diagnostic["errors"] = errors
        return judged, diagnostic

    def _read_logprobs(self, results: list) -> tuple[list[float], dict[str, Any]]:
        num = len(self.candidates)
        rows = [r.logprobs if r.logprobs is not None else [math.nan] * num for r in results]
        scores, probs, mass = expected_scores(
            torch.tensor(rows, dtype=torch.float64), self.candidate_values, self.min_digit_mass
        )
        diagnostic: dict[str, Any] = {
            "probs": probs.tolist(),
            "digit_mass": mass.tolist(),
            "candidates": list(self.candidates),
        }
        errors = [r.error for r in results if r.error is not None]
        if errors:
            diagnostic["errors"] = errors
        return scores.tolist(), diagnostic
