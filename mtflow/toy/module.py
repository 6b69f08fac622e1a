"""``ToyDataModule``: toy-world chains for ``mtflow fit`` (the default job, ``configs/toy.yaml``).

Train chains come from the world's train split, validation / test chains from its held-out split: they share no
source scene. Every chain is generated on demand from (world seed, split, index), so the data module needs no
files and every rank and every resumed run sees the same chains.
"""

from __future__ import annotations

from mtflow.data.loader import ChainSource
from mtflow.data.module import ChainDataModule
from mtflow.toy.data import ToyChainDataset
from mtflow.toy.world import ToyWorld


class ToyDataModule(ChainDataModule):
    """K-turn chains of a ``ToyWorld``: train split for RL, held-out split for validation, test and the
    ``HeldOutEvaluation`` before/after table."""

    def __init__(
        self,
        world: ToyWorld | None = None,
        num_train_chains: int = 4096,
        num_heldout_chains: int = 200,
        num_turns: int | None = None,
        train_num_turns: int | None = None,
        batch_size: int = 4,
        val_batch_size: int = 50,
        seed: int | None = None,
    ) -> None:
        """
        Args:
            world: the toy world (None: ``ToyWorld()``, the world the shipped prior was trained on).
            num_train_chains: training chains (an epoch); indices 0 .. n - 1 of the train split.
            num_heldout_chains: held-out chains for validation and test; indices 0 .. n - 1 of the held-out split.
            num_turns: K (None: the world's ``num_turns``).
            train_num_turns: turns of the training chains only (None: ``num_turns``); 1 trains on single edits of
                the same training split, the way single-turn RL trainers do, while held-out chains keep K turns.
            batch_size: chains per rank per RL iteration (B); each is rolled out G times.
            val_batch_size: chains per rank per validation / test batch.
            seed: seed of the training order (None: the run's ``seed_everything``).
        """
        super().__init__(batch_size=batch_size, val_batch_size=val_batch_size, seed=seed)
        if num_train_chains < 1 or num_heldout_chains < 1:
            raise ValueError(
                f"num_train_chains and num_heldout_chains must be >= 1, got {num_train_chains}, {num_heldout_chains}"
            )
        self.world = world or ToyWorld()
        self.num_train_chains = num_train_chains
        self.num_heldout_chains = num_heldout_chains
        self.num_turns = num_turns
        if train_num_turns is not None and train_num_turns < 1:
            raise ValueError(f"train_num_turns must be >= 1 (or None for num_turns), got {train_num_turns}")
        self.train_num_turns = train_num_turns

    def build_sources(self) -> dict[str, ChainSource | None]:
        heldout = ToyChainDataset(self.world, "heldout", self.num_heldout_chains, self.num_turns)
        return {
            "train": ToyChainDataset(
                self.world, "train", self.num_train_chains, self.train_num_turns or self.num_turns
            ),
            "val": heldout,
            "test": heldout,
        }
