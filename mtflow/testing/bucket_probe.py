"""A callback that records, per RL iteration and rank, which chains were rolled out and at which image sizes (for
the aspect-bucket tests, which run ``mtflow fit`` in subprocesses and cannot inspect memory)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class BucketProbe(L.Callback):
    """After every training batch, append one JSON line to ``<folder>/rank<r>.jsonl``: the iteration, the batch's
    chain ids with the policy's edit size of each source, and the rollout's item ids with the (width, height) of
    every row's source and of each of its turn outputs (from ``pl_module.last_rollout``, which keeps 8 rows)."""

    def __init__(self, folder: str) -> None:
        """
        Args:
            folder: where each rank writes its JSON lines.
        """
        self.folder = folder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        preview = pl_module.last_rollout
        if preview is None:
            return
        chains = list(batch.chains) if hasattr(batch, "chains") else list(batch)
        record = {
            "iteration": pl_module.iteration,
            "rank": trainer.global_rank,
            "chains": [chain.chain_id for chain in chains],
            "edit_sizes": [list(pl_module.policy.edit_size(chain.source.size)) for chain in chains],
            "num_trajectories": preview.num_trajectories,
            "item_ids": preview.item_ids,
            "source_sizes": [[int(s.shape[-1]), int(s.shape[-2])] for s in preview.source_images],
            "turn_sizes": [[[int(t.shape[-1]), int(t.shape[-2])] for t in row] for row in preview.images],
        }
        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / f"rank{trainer.global_rank}.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")
