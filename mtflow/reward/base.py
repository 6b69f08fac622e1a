"""The one interface every judge implements: per-turn instruction-following (IF) and content-consistency (CC).

A *scoring item* is one trajectory of one edit chain: the source image, its K edited outputs and the K
instructions. A scorer returns, for N items and K turns, IF and CC on the 1-5 judge scale, a ``scored`` mask and
per-item diagnostics. Scores the judge could not produce are NaN and ``scored`` is False there: nobody downstream
ever sees an invented number (docs/design.md section 4; the advantage code excludes unscored trajectories).

Scale convention (shared by every scorer, the advantage code and the evaluation):

- ``instruction_following`` in [1, 5]: 1 failed, 2 minimal, 3 partial, 4 mostly compliant, 5 fully compliant.
  Binary judges report 1 or 5.
- ``content_consistency`` in [1, 5]: 5 means everything the instruction should not touch is preserved.
  Feature-similarity scorers map a similarity s in [0, 1] to 1 + 4 s. Evaluation reports CC in [0, 100] as
  ``(cc - 1) / 4 * 100``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image

SCORE_MIN = 1.0
SCORE_MAX = 5.0


@dataclass
class ScoringItem:
    """One trajectory to judge.

    Attributes:
        item_id: unique id of this trajectory (e.g. ``"<chain_id>/g3"``), echoed back in diagnostics.
        chain_id: id of the edit chain; trajectories of one chain form a group.
        source: the source image y0 (RGB).
        outputs: the K edited images y1..yK of this trajectory, in turn order (RGB, same size as ``source``).
        instructions: the K instructions c1..cK.
        metadata: free-form, JSON-serialisable facts about the chain (edit types, or a toy world's ground truth).
    """

    item_id: str
    chain_id: str
    source: Image.Image
    outputs: list[Image.Image]
    instructions: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.outputs) != len(self.instructions):
            raise ValueError(
                f"item {self.item_id!r}: {len(self.outputs)} output images but {len(self.instructions)} instructions"
            )
        if not self.instructions:
            raise ValueError(f"item {self.item_id!r}: a chain needs at least one turn")

    @property
    def num_turns(self) -> int:
        return len(self.instructions)


@dataclass
class ScoreBatch:
    """Scores of N items with K turns each.

    Attributes:
        instruction_following: [N, K] float32 in [1, 5]; NaN where not scored.
        content_consistency: [N, K] float32 in [1, 5]; NaN where not scored.
        scored: [N, K] bool; True where *both* IF and CC of that turn were scored.
        diagnostics: N dicts (raw judge text or probabilities, parse status, latency, error messages).
        latency_s: wall time of the whole call in seconds.
    """

    instruction_following: torch.Tensor
    content_consistency: torch.Tensor
    scored: torch.Tensor
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        shape = self.instruction_following.shape
        if self.content_consistency.shape != shape or self.scored.shape != shape or len(shape) != 2:
            raise ValueError(
                "ScoreBatch fields must all be [N, K]: got IF "
                f"{tuple(shape)}, CC {tuple(self.content_consistency.shape)}, scored {tuple(self.scored.shape)}"
            )
        if self.diagnostics and len(self.diagnostics) != shape[0]:
            raise ValueError(f"{len(self.diagnostics)} diagnostics for {shape[0]} items")

    @property
    def trajectory_scored(self) -> torch.Tensor:
        """[N] bool: every turn of the trajectory was scored (only these may receive an advantage)."""
        return self.scored.all(dim=1)

    def first(self, rows: int) -> ScoreBatch:
        """The first ``rows`` items' scores (diagnostics too), e.g. for an image grid's captions."""
        return ScoreBatch(
            self.instruction_following[:rows].clone(),
            self.content_consistency[:rows].clone(),
            self.scored[:rows].clone(),
            diagnostics=self.diagnostics[:rows],
        )

    @classmethod
    def unscored(cls, num_items: int, num_turns: int, reason: str) -> ScoreBatch:
        """A batch in which nothing was scored, with ``reason`` in every diagnostic."""
        nan = torch.full((num_items, num_turns), math.nan)
        return cls(
            instruction_following=nan.clone(),
            content_consistency=nan.clone(),
            scored=torch.zeros(num_items, num_turns, dtype=torch.bool),
            diagnostics=[{"status": "unscored", "error": reason} for _ in range(num_items)],
        )

    @classmethod
    def concat(cls, batches: Sequence[ScoreBatch]) -> ScoreBatch:
        """Stack batches with the same number of turns along the item dimension."""
        return cls(
            instruction_following=torch.cat([b.instruction_following for b in batches]),
            content_consistency=torch.cat([b.content_consistency for b in batches]),
            scored=torch.cat([b.scored for b in batches]),
            diagnostics=[d for b in batches for d in b.diagnostics],
            latency_s=sum(b.latency_s for b in batches),
        )


@runtime_checkable
class Scorer(Protocol):
    """Anything that scores trajectories. Implementations: VLM judge (transformers / OpenAI-compatible backends),
    the HTTP ``RemoteScorer``, feature-similarity CC, and the toy world's exact judge."""

    def score(self, items: Sequence[ScoringItem]) -> ScoreBatch:
        """Score ``items`` (all with the same number of turns K). Must not raise for a single bad item: flag it
        in ``scored`` and say why in its diagnostic. May raise ``ScorerUnavailableError`` when the judge itself
        cannot be reached at all."""
        ...


class ScorerUnavailableError(RuntimeError):
    """The judge could not be reached or kept failing after bounded retries (names the URL/backend and cause)."""
