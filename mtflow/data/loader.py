"""Resumable, rank-aware batches of edit chains.

``ChainBatches`` is the training "dataloader": an iterable of ``ChainBatch`` (B whole chains for this rank, so GRPO
groups are never split across ranks). The order is a pure function of (seed, epoch), and its state is the
position of the last batch the trainer *consumed* (the module calls ``batch.mark_consumed()``), not the last one
fetched, so resuming a checkpoint continues exactly where training stopped whatever Lightning prefetches.

Aspect buckets: a rollout edits one image size, so with a ``bucket_of`` (chain index -> the size the policy edits
it at) every batch holds chains of one bucket. The epoch's permutation is walked in order and each chain joins its
bucket's open batch; a batch is emitted when full, and emitted batches are dealt to the ranks in order. With one
bucket this is exactly the unbucketed order.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any, Literal, Protocol

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
    W * B sees, in the same order. With ``bucket_of`` batch p of rank r is the (p * world + r)-th batch of
    ``bucket_batches`` instead (one bucket per batch; a bucket's last, partial batch is dropped in training and
    filled with repeats of its own chains in evaluation).
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
        bucket_of: Callable[[int], Hashable] | None = None,
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
        self.bucket_of = bucket_of
        self._buckets = None if bucket_of is None else [bucket_of(i) for i in range(len(source))]
        self.epoch = 0
        self.next_position = 0
        if len(self) == 0:
            raise ValueError(
                f"{len(source)} chains cannot fill one batch of {batch_size} chains on each of {world_size} rank(s)"
                + (
                    f" with chains of one size per batch ({len(set(self._buckets))} sizes)"
                    if self._buckets
                    else ""
                )
            )

    def __len__(self) -> int:
        if self._buckets is not None:
            return -(-len(self._batches(0)) // self.world_size)
        per_step = self.batch_size * self.world_size
        if self.drop_last:
            return len(self.source) // per_step
        return -(-len(self.source) // per_step)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.source)))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.source), generator=gen).tolist()

    def _order(self, epoch: int) -> list[int]:
        order = self._permutation(epoch)
        if self.pad:
            # Every rank gets the same number of full batches (sharded models need equal forward calls); the
            # wrapped-around chains are repeats that evaluation removes by chain id.
            total = len(self) * self.batch_size * self.world_size
            order = (order * (total // max(len(order), 1) + 1))[:total]
        return order

    def __iter__(self) -> Iterator[ChainBatch]:
        return self._generate()

    def _batches(self, epoch: int) -> list[list[int]]:
        """Every batch of an epoch in dealing order (one bucket each), a multiple of ``world_size`` of them."""
        return bucket_batches(
            self._permutation(epoch),
            self.batch_size,
            self._buckets.__getitem__,
            partial="drop" if self.drop_last else "fill" if self.pad else "keep",
            multiple=self.world_size,
        )

    def _generate(self) -> Iterator[ChainBatch]:
        # Read the position lazily: Lightning calls iter() before it restores a checkpoint's loader state.
        epoch, start = self.epoch, self.next_position
        if start >= len(self):
            epoch, start = epoch + 1, 0
        if self._buckets is not None:
            batches = self._batches(epoch)
            for position in range(start, len(self)):
                if position * self.world_size + self.rank >= len(batches):
                    break
                indices = batches[position * self.world_size + self.rank]
                yield ChainBatch([self.source[i] for i in indices], epoch, position, owner=self)
        else:
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


def bucket_batches(
    order: Iterable[int],
    batch_size: int,
    bucket_of: Callable[[int], Hashable],
    partial: Literal["drop", "keep", "fill"] = "drop",
    multiple: int = 1,
) -> list[list[int]]:
    """Cut ``order`` into batches of ``batch_size`` indices of one bucket each, in the order they fill up: each
    index joins its bucket's open batch, which is emitted when full. What happens to the partial batches left at
    the end: "drop" them and the last incomplete step (``multiple`` batches: one per rank), "keep" them as they
    are, or "fill" them with their bucket's indices again, continuing the bucket's cycle, and complete the last
    step the same way (repeats, which evaluation removes by chain id). With one bucket this is ``order`` cut into
    consecutive batches (cyclically extended with "fill")."""
    batches: list[list[int]] = []
    open_batches: dict[Hashable, list[int]] = {}
    members: dict[Hashable, list[int]] = {}
    for index in order:
        key = bucket_of(index)
        members.setdefault(key, []).append(index)
        current = open_batches.setdefault(key, [])
        current.append(index)
        if len(current) == batch_size:
            batches.append(current)
            open_batches[key] = []
    if partial == "drop":
        return batches[: len(batches) - len(batches) % multiple]
    if partial == "keep":
        return batches + [current for current in open_batches.values() if current]
    cursor = {key: len(indices) for key, indices in members.items()}

    def repeat(key: Hashable) -> int:
        cycle = members[key]
        cursor[key] += 1
        return cycle[(cursor[key] - 1) % len(cycle)]

    last = None
    for key, current in open_batches.items():  # buckets in order of first appearance
        if current:
            current += [repeat(key) for _ in range(batch_size - len(current))]
            batches.append(current)
            last = key
    if last is None and batches:
        last = bucket_of(batches[-1][0])
    while batches and len(batches) % multiple:
        batches.append([repeat(last) for _ in range(batch_size)])
    return batches


def batches_by_size(
    indices: Iterable[int], batch_size: int, size_of: Callable[[int], Hashable]
) -> list[list[int]]:
    """``indices`` in batches of at most ``batch_size`` that share one ``size_of`` (order kept within a size; with
    one size these are plain consecutive slices). For evaluation, where every chain is rolled out once."""
    groups: dict[Hashable, list[int]] = {}
    for index in indices:
        groups.setdefault(size_of(index), []).append(index)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def chains_of(batch: ChainBatch | Sequence[EditChain]) -> list[EditChain]:
    """The chains of a batch, whatever the loader produced."""
    return list(batch.chains) if isinstance(batch, ChainBatch) else list(batch)
