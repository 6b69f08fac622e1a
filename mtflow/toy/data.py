"""Datasets over the toy world: K-turn ``EditChain``s for RL / evaluation and single-turn pairs for the prior.

Both are map-style and random-access: item ``i`` is generated on demand from (world seed, split, i), so datasets
cost no storage, are identical in every worker and across runs, and any index can be regenerated to inspect it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mtflow.data.records import EditChain
from mtflow.toy.world import SPLITS, ToyWorld


def _check(split: str, count: int, what: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if count < 1:
        raise ValueError(f"{what} must be >= 1, got {count}")


class ToyChainDataset(Dataset):
    """``EditChain``s of the toy world; ``metadata["toy"]`` carries the ground truth the ``ToyJudge`` scores."""

    def __init__(
        self,
        world: ToyWorld | None = None,
        split: str = "train",
        num_chains: int = 1024,
        num_turns: int | None = None,
        offset: int = 0,
    ) -> None:
        """
        Args:
            world: the toy world (None: ``ToyWorld()`` defaults).
            split: "train" or "heldout"; the two share no source scene.
            num_chains: dataset length.
            num_turns: K (None: the world's ``num_turns``).
            offset: index of the first chain (disjoint ranges give disjoint chain ids).
        """
        _check(split, num_chains, "num_chains")
        self.world = world or ToyWorld()
        self.split = split
        self.num_chains = num_chains
        self.num_turns = num_turns
        self.offset = offset

    def __len__(self) -> int:
        return self.num_chains

    def __getitem__(self, index: int) -> EditChain:
        if not 0 <= index < self.num_chains:
            raise IndexError(f"chain index {index} out of range [0, {self.num_chains})")
        return self.world.chain(self.offset + index, self.split, self.num_turns).to_edit_chain()


@dataclass
class ToyPair:
    """One single-turn supervised example: edit ``source`` by ``instruction`` into ``target``."""

    pair_id: str
    source: Image.Image
    instruction: str
    target: Image.Image
    edit_type: str
    metadata: dict[str, Any] = field(default_factory=dict)


class ToyPairDataset(Dataset):
    """Single-turn (source, instruction, target) pairs on clean renderings (for the supervised editor prior)."""

    def __init__(self, world: ToyWorld | None = None, split: str = "train", num_pairs: int = 100_000) -> None:
        """
        Args:
            world: the toy world (None: ``ToyWorld()`` defaults).
            split: source scenes come from this split only.
            num_pairs: dataset length (an epoch).
        """
        _check(split, num_pairs, "num_pairs")
        self.world = world or ToyWorld()
        self.split = split
        self.num_pairs = num_pairs

    def __len__(self) -> int:
        return self.num_pairs

    def __getitem__(self, index: int) -> ToyPair:
        if not 0 <= index < self.num_pairs:
            raise IndexError(f"pair index {index} out of range [0, {self.num_pairs})")
        sample = self.world.pair(index, self.split)
        source, target = sample.images()
        return ToyPair(
            pair_id=sample.chain_id,
            source=source,
            instruction=sample.instructions[0],
            target=target,
            edit_type=sample.edits[0].type,
            metadata=sample.metadata(),
        )


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> [3, H, W] float32 in [-1, 1] (the VAE's input range)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """[3, H, W] float in [-1, 1] -> RGB image (values clipped, rounded to the nearest byte)."""
    array = ((tensor.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy(), mode="RGB")


@dataclass
class ToyPairBatch:
    """A collated batch of ``ToyPair``s.

    Attributes:
        pair_ids: B ids.
        source: [B, 3, H, W] float32 in [-1, 1].
        target: [B, 3, H, W] float32 in [-1, 1].
        instructions: B strings.
        edit_types: B edit-type labels.
    """

    pair_ids: list[str]
    source: torch.Tensor
    target: torch.Tensor
    instructions: list[str]
    edit_types: list[str]


def collate_toy_pairs(batch: list[ToyPair]) -> ToyPairBatch:
    """DataLoader collate function for ``ToyPairDataset``."""
    return ToyPairBatch(
        pair_ids=[p.pair_id for p in batch],
        source=torch.stack([image_to_tensor(p.source) for p in batch]),
        target=torch.stack([image_to_tensor(p.target) for p in batch]),
        instructions=[p.instruction for p in batch],
        edit_types=[p.edit_type for p in batch],
    )
