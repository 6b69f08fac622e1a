"""Callbacks that record facts about a run for tests (used in subprocess runs, where tests cannot inspect memory)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class ShardingProbe(L.Callback):
    """At the end of fit, write ``<folder>/rank<r>.json`` with the local and global size of every transformer
    parameter (a DTensor under FSDP2; its mesh shape and placements) and the number of transformer forward calls
    this rank made."""

    def __init__(self, folder: str) -> None:
        """
        Args:
            folder: where each rank writes its JSON file.
        """
        self.folder = folder
        self.forward_calls = 0
        self._handle = None

    def on_fit_start(self, trainer, pl_module) -> None:
        def count(*_):
            self.forward_calls += 1

        self._handle = pl_module.policy.transformer.register_forward_hook(count)

    def on_fit_end(self, trainer, pl_module) -> None:
        params = {}
        for name, param in pl_module.policy.transformer.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            params[name] = {
                "local": local.numel(),
                "global": param.numel(),
                "dtensor": hasattr(param, "to_local"),
                "mesh": list(param.device_mesh.shape) if hasattr(param, "device_mesh") else None,
                "placements": [str(p) for p in param.placements] if hasattr(param, "placements") else None,
            }
        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        payload = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "forward_calls": self.forward_calls,
            "params": params,
        }
        (folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(payload))
        if self._handle is not None:
            self._handle.remove()
