"""Lightning data modules: chains from a JSONL manifest (or any ``ChainSource``) as resumable per-rank batches.

A rollout edits one image size, so when the source reports its images' sizes (``image_size(index)``, as
``ManifestDataset`` does) and the model's policy has aspect buckets (``edit_size``), every batch holds chains of
one bucket (``ChainBatches(bucket_of=...)``); whole chains stay on one rank, so a GRPO group is never split.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import lightning as L

from mtflow.data.loader import ChainBatches, ChainSource
from mtflow.data.manifest import DEFAULT_MAX_PIXELS, ManifestDataset
from mtflow.seeding import resolve_seed


class ChainDataModule(L.LightningDataModule):
    """Base class: subclasses build the train / val / test ``ChainSource`` in ``build_sources``."""

    def __init__(self, batch_size: int = 1, val_batch_size: int = 4, seed: int | None = None) -> None:
        """
        Args:
            batch_size: chains per rank per RL iteration (B); each is rolled out G times.
            val_batch_size: chains per rank per validation / test batch.
            seed: seed of the training order (epoch e uses a permutation seeded by (seed, e)); None: the run's
                ``seed_everything``.
        """
        super().__init__()
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.seed = resolve_seed(seed)
        self.sources: dict[str, ChainSource | None] = {}

    def build_sources(self) -> dict[str, ChainSource | None]:
        """Return {"train": ..., "val": ..., "test": ...} (None where a split is not available)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if not self.sources:
            self.sources = self.build_sources()

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _bucket_of(self, source: ChainSource) -> Callable[[int], Hashable] | None:
        """Chain index -> (width, height) the model's policy edits it at, when the source knows its images' sizes
        and a model with a policy is attached (None: one bucket, e.g. the toy world's square images)."""
        size_of = getattr(source, "image_size", None)
        module = getattr(getattr(self, "trainer", None), "lightning_module", None)
        edit_size = getattr(getattr(module, "policy", None), "edit_size", None)
        if size_of is None or edit_size is None:
            return None
        return lambda index: tuple(edit_size(size_of(index)))

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> ChainBatches:
        self.setup()
        source = self.sources.get(split)
        if source is None:
            raise ValueError(f"{type(self).__name__} has no {split!r} split configured")
        rank, world = self._rank_world()
        return ChainBatches(
            source,
            batch_size,
            shuffle=shuffle,
            seed=self.seed,
            rank=rank,
            world_size=world,
            drop_last=shuffle,
            pad=not shuffle,  # evaluation: equal batches on every rank; repeats are removed by chain id
            bucket_of=self._bucket_of(source),
        )

    def train_dataloader(self) -> ChainBatches:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> ChainBatches | list:
        self.setup()
        if self.sources.get("val") is None:
            return []  # no held-out chains: Lightning skips validation
        return self._loader("val", self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> ChainBatches:
        return self._loader(
            "test" if self.sources.get("test") is not None else "val", self.val_batch_size, False
        )


class ManifestDataModule(ChainDataModule):
    """Chains from JSONL manifests (docs/design.md section 9), validated in full before training starts."""

    def __init__(
        self,
        train_manifest: str | None = None,
        val_manifest: str | None = None,
        test_manifest: str | None = None,
        num_turns: int = 3,
        train_split: str | None = None,
        val_split: str | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        allow_outside_paths: bool = False,
        batch_size: int = 1,
        val_batch_size: int = 4,
        seed: int | None = None,
    ) -> None:
        """
        Args:
            train_manifest: JSONL manifest of training chains.
            val_manifest: JSONL manifest of held-out chains (may equal ``train_manifest`` with splits).
            test_manifest: JSONL manifest for ``mtflow test`` (default: the validation chains).
            num_turns: K; every chain must have exactly K instructions.
            train_split: keep only lines whose "split" equals this in the training manifest.
            val_split: keep only lines whose "split" equals this in the validation manifest.
            max_pixels: largest accepted source image (width * height).
            allow_outside_paths: accept manifest image paths outside the manifest's folder (absolute, "..", links
                out); off, a manifest cannot make training read arbitrary files.
            batch_size: chains per rank per RL iteration (B).
            val_batch_size: chains per rank per validation batch.
            seed: seed of the training order (None: the run's ``seed_everything``).
        """
        super().__init__(batch_size=batch_size, val_batch_size=val_batch_size, seed=seed)
        self.train_manifest = train_manifest
        self.val_manifest = val_manifest
        self.test_manifest = test_manifest
        self.num_turns = num_turns
        self.train_split = train_split
        self.val_split = val_split
        self.max_pixels = max_pixels
        self.allow_outside_paths = allow_outside_paths

    def build_sources(self) -> dict[str, ChainSource | None]:
        def load(path: str | None, split: str | None) -> ChainSource | None:
            if path is None:
                return None
            return ManifestDataset(
                path,
                self.num_turns,
                split=split,
                max_pixels=self.max_pixels,
                allow_outside_paths=self.allow_outside_paths,
            )

        return {
            "train": load(self.train_manifest, self.train_split),
            "val": load(self.val_manifest, self.val_split),
            "test": load(self.test_manifest, None),
        }
