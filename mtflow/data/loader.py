"""Resumable, rank-aware batches of edit chains.

``ChainBatches`` is the training "dataloader": an iterable of ``ChainBatch`` (B whole chains for this rank, so GRPO
groups are never split across ranks). The order is a pure function of (seed, epoch), and its state is the
position of the last batch the trainer *consumed* (the module calls ``batch.mark_consumed()``), not the last one
fetched, so resuming a checkpoint continues exactly where training stopped whatever Lightning prefetches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch

from mtflow.data.records import EditChain


class ChainSource(Protocol):
    """Indexable collection of chains (a manifest dataset, a toy-world split)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> EditChain: ...


class ChainBatch:
    """B chains for one RL iteration on this rank (a plain class: Lightning passes it through untouched)."""

    def __init__(self, chains: list[EditChain], epoch: int, position: int, owner: ChainBatches | None = None):
        self.chains = chains
        self.epoch = epoch
        self.position = position
        self._owner = owner

    def __len__(self) -> int:
        return len(self.chains)

    def __iter__(self) -> Iterator[EditChain]:
        return iter(self.chains)

    def mark_consumed(self) -> None:
        """Record that training finished this batch (what a checkpoint resumes after)."""
        if self._owner is not None:
            self._owner._consumed(self.epoch, self.position)


class ChainBatches:
    """Deterministic, shardable, resumable batches of whole chains.

    Batch p of epoch e on rank r holds chains ``perm_e[(p * world + r) * B : ... + B]`` where ``perm_e`` is a
    permutation seeded by (seed, e), so a world of W ranks sees exactly the chains a single process with batch
    W * B sees, in the same order.
    """

    def __init__(
        self,
        source: ChainSource,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        pad: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.source = source
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.pad = pad
        self.epoch = 0
        self.next_position = 0
        if len(self) == 0:
            raise ValueError(
                f"{len(source)} chains cannot fill one batch of {batch_size} chains on each of {world_size} rank(s)"
            )

    def __len__(self) -> int:
        per_step = self.batch_size * self.world_size
        if self.drop_last:
            return len(self.source) // per_step
        return -(-len(self.source) // per_step)

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            order = list(range(len(self.source)))
        else:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.source), generator=gen).tolist()
        if self.pad:
            # Every rank gets the same number of full batches (sharded models need equal forward calls); the
            # wrapped-around chains are repeats that evaluation removes by chain id.
            total = len(self) * self.batch_size * self.world_size
            order = (order * (total // max(len(order), 1) + 1))[:total]
        return order

    def __iter__(self) -> Iterator[ChainBatch]:
        return self._generate()

    def _generate(self) -> Iterator[ChainBatch]:
        # Read the position lazily: Lightning calls iter() before it restores a checkpoint's loader state.
        epoch, start = self.epoch, self.next_position
        if start >= len(self):
            epoch, start = epoch + 1, 0
        order = self._order(epoch)
        for position in range(start, len(self)):
            first = (position * self.world_size + self.rank) * self.batch_size
            indices = order[first : first + self.batch_size]
            if not indices:
                break
            yield ChainBatch([self.source[i] for i in indices], epoch, position, owner=self)
        # a finished pass starts the next epoch on the next iter()
        if self.epoch == epoch and self.next_position >= len(self):
            self.epoch, self.next_position = epoch + 1, 0

    def _consumed(self, epoch: int, position: int) -> None:
        self.epoch, self.next_position = epoch, position + 1

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "next_position": self.next_position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.next_position = int(state["next_position"])


def chains_of(batch: ChainBatch | Sequence[EditChain]) -> list[EditChain]:
    """The chains of a batch, whatever the loader produced."""
    return list(batch.chains) if isinstance(batch, ChainBatch) else list(batch)
