"""The unit of training and evaluation data: one edit chain (a source image and K instructions)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class EditChain:
    """One multi-turn edit chain, as the trainer and the evaluator consume it.

    Attributes:
        chain_id: unique id; trajectories of one chain form a GRPO group (groups are keyed by this, never by text).
        source: the source image y0, RGB.
        instructions: the K instructions c1..cK, in turn order.
        edit_types: optional K edit-type labels (e.g. EdiVal's ``color_alter``).
        metadata: JSON-serialisable facts handed to the judge untouched (e.g. a toy world's ground truth).
    """

    chain_id: str
    source: Image.Image
    instructions: list[str]
    edit_types: list[str] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.instructions:
            raise ValueError(f"chain {self.chain_id!r} has no instructions")
        if self.edit_types is not None and len(self.edit_types) != len(self.instructions):
            raise ValueError(
                f"chain {self.chain_id!r}: {len(self.edit_types)} edit types for {len(self.instructions)} instructions"
            )
        if self.source.mode != "RGB":
            self.source = self.source.convert("RGB")

    @property
    def num_turns(self) -> int:
        return len(self.instructions)


def collate_chains(batch: list[EditChain]) -> list[EditChain]:
    """DataLoader collate function: chains stay a list (images differ in size until the policy resizes them)."""
    return list(batch)
