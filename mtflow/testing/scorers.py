"""Deterministic, model-free scorers for tests and benchmarks of the trainer on random tiny models.

They implement the ``Scorer`` protocol with simple, documented image statistics, so that a training test has a
reward the policy can measurably move (a random tiny editor has no instruction to follow).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from mtflow.reward.base import ScoreBatch, ScoringItem


class BrightnessScorer:
    """IF = 1 + 4 * mean brightness of the output in [0, 1]; CC = 5 - 4 * mean |output - source| in [0, 1].

    Optionally refuses items whose id ends with one of ``unscorable_suffixes`` (flagged, never scored), to test
    the trainer's handling of unscored trajectories.
    """

    def __init__(self, unscorable_suffixes: list[str] | None = None, delay_s: float = 0.0) -> None:
        """
        Args:
            unscorable_suffixes: item ids ending with any of these are reported unscored.
            delay_s: sleep this long per call (to exercise overlap with the judge).
        """
        self.unscorable_suffixes = tuple(unscorable_suffixes or ())
        self.delay_s = delay_s
        self.calls = 0

    def score(self, items: Sequence[ScoringItem]) -> ScoreBatch:
        started = time.perf_counter()
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        turns = items[0].num_turns if items else 0
        instruction = torch.full((len(items), turns), float("nan"))
        consistency = torch.full((len(items), turns), float("nan"))
        scored = torch.zeros((len(items), turns), dtype=torch.bool)
        diagnostics = []
        for i, item in enumerate(items):
            if self.unscorable_suffixes and item.item_id.endswith(self.unscorable_suffixes):
                diagnostics.append({"status": "unscored", "error": "refused by test scorer"})
                continue
            source = np.asarray(item.source, dtype=np.float32) / 255.0
            for k, output in enumerate(item.outputs):
                out = np.asarray(output, dtype=np.float32) / 255.0
                instruction[i, k] = 1.0 + 4.0 * float(out.mean())
                consistency[i, k] = 5.0 - 4.0 * float(np.abs(out - source).mean())
                scored[i, k] = True
            diagnostics.append({"status": "ok"})
        return ScoreBatch(instruction, consistency, scored, diagnostics, time.perf_counter() - started)
