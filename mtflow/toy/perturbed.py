"""Judges with documented flaws, for measuring what RL learns from an imperfect judge (docs/ablations.md).

``PerturbedJudge`` wraps an exact ``Scorer`` (the toy world's ``ToyJudge``) and turns every scored IF / CC value s
into a flawed one, in this order:

- **shrink** (bias toward the middle, like an expected score read from digit probabilities of an unsure VLM):
  s <- 3 + (1 - shrink) (s - 3);
- **saturation bias** (a systematic preference a VLM could plausibly have: vivid outputs look "edited"): IF gets
  ``saturation_bias`` x (mean HSV saturation of turn k's output - mean saturation of the source), saturation in
  [0, 1], whatever the instruction asked;
- **noise** (high variance, like sampled "thinking" answers): s <- s + noise_std z, z ~ N(0, 1) drawn from a
  generator seeded by (seed, item id, turn, the output's pixels): the same output always gets the same noise (so a
  run is reproducible and resumes exactly), two different outputs get independent noise;
- the result is clipped to the judge scale [1, 5].

Unscored entries stay unscored (NaN); a perturbation never scores what the exact judge refused.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from mtflow.reward.base import SCORE_MAX, SCORE_MIN, ScoreBatch, Scorer, ScoringItem


def mean_saturation(image: Image.Image) -> float:
    """Mean HSV saturation of an image, in [0, 1]."""
    hsv = np.asarray(image.convert("RGB").convert("HSV"), dtype=np.float64)
    return float(hsv[..., 1].mean() / 255.0)


def _noise(seed: int, item_id: str, turn: int, image: Image.Image) -> float:
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{seed}/{item_id}/{turn}/".encode("utf-8", "surrogatepass"))
    digest.update(np.asarray(image.convert("RGB")).tobytes())
    return float(np.random.default_rng(int.from_bytes(digest.digest(), "little")).standard_normal())


class PerturbedJudge:
    """An exact judge made deliberately imperfect (module docstring): noise, shrink and a saturation bias."""

    def __init__(
        self,
        judge: Scorer,
        noise_std: float = 0.0,
        shrink: float = 0.0,
        saturation_bias: float = 0.0,
        seed: int = 0,
    ) -> None:
        """
        Args:
            judge: the exact judge whose scores are perturbed (e.g. ``mtflow.toy.judge.ToyJudge``).
            noise_std: standard deviation of the zero-mean Gaussian added to IF and CC (judge points).
            shrink: pull toward the middle of the scale, in [0, 1) (0: none; 0.5 halves every distance to 3).
            saturation_bias: IF points per unit of saturation gained over the source (0: none).
            seed: seed of the noise (the noise is a function of seed, item, turn and output pixels).
        """
        if noise_std < 0 or not 0.0 <= shrink < 1.0:
            raise ValueError(f"need noise_std >= 0 and 0 <= shrink < 1, got {noise_std}, {shrink}")
        self.judge = judge
        self.noise_std = noise_std
        self.shrink = shrink
        self.saturation_bias = saturation_bias
        self.seed = seed

    def merged_metadata(self, metadata: dict, instruction: str) -> dict:
        """The wrapped judge's ground truth for the single-turn-merged baseline (see ``ToyJudge``)."""
        merge = getattr(self.judge, "merged_metadata", None)
        return merge(metadata, instruction) if merge is not None else metadata

    def score(self, items: Sequence[ScoringItem]) -> ScoreBatch:
        started = time.perf_counter()
        exact = self.judge.score(items)
        instruction = exact.instruction_following.double().clone()
        consistency = exact.content_consistency.double().clone()
        middle = (SCORE_MIN + SCORE_MAX) / 2
        for scores in (instruction, consistency):
            scores.sub_(middle).mul_(1.0 - self.shrink).add_(middle)
        if self.saturation_bias:
            for i, item in enumerate(items):
                source = mean_saturation(item.source)
                for k, output in enumerate(item.outputs):
                    instruction[i, k] += self.saturation_bias * (mean_saturation(output) - source)
        if self.noise_std:
            for i, item in enumerate(items):
                for k, output in enumerate(item.outputs):
                    instruction[i, k] += self.noise_std * _noise(self.seed, item.item_id, 2 * k, output)
                    consistency[i, k] += self.noise_std * _noise(self.seed, item.item_id, 2 * k + 1, output)
        scored = exact.scored
        instruction = torch.where(scored, instruction.clamp(SCORE_MIN, SCORE_MAX), torch.nan).float()
        consistency = torch.where(scored, consistency.clamp(SCORE_MIN, SCORE_MAX), torch.nan).float()
        return ScoreBatch(
            instruction_following=instruction,
            content_consistency=consistency,
            scored=scored,
            diagnostics=exact.diagnostics,
            latency_s=time.perf_counter() - started,
        )
