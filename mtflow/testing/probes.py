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


class WorkProbe(L.Callback):
    """At the end of fit, write ``<folder>/rank<r>.json`` with what this rank did: judge items scored and
    transformer calls outside training batches (the held-out evaluation) and inside them, and the all-gathers of
    training iterations (FSDP2's unshards), counted by wrapping ``torch.distributed``'s all-gather entry points."""

    GATHERS = ("all_gather_single", "all_gather_into_tensor")

    def __init__(self, folder: str) -> None:
        """
        Args:
            folder: where each rank writes its JSON file.
        """
        self.folder = folder
        self.in_batch = False
        self.in_rollout = False
        self.counts = {
            "eval_items": 0,
            "train_items": 0,
            "eval_forwards": 0,
            "train_forwards": 0,
            "gathers": 0,
            "rollout_gathers": 0,
            "rollout_s": 0.0,
        }
        self.iterations = 0
        self._restore: list = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        import torch.distributed as dist

        self.counts["rss_before_load"] = _status_bytes("VmRSS")  # before configure_model reads the weights
        scorer = pl_module.scorer
        score = scorer.score

        def counted_score(items):
            self.counts["train_items" if self.in_batch else "eval_items"] += len(items)
            return score(items)

        scorer.score = counted_score
        self._restore.append(lambda: setattr(scorer, "score", score))
        for name in self.GATHERS:
            original = getattr(dist, name, None)
            if original is None:
                continue

            def counted(*args, _original=original, **kwargs):
                if self.in_batch:
                    self.counts["gathers"] += 1
                if self.in_rollout:
                    self.counts["rollout_gathers"] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
            self._restore.append(lambda n=name, o=original: setattr(dist, n, o))
        rollout_chains = pl_module.rollout_chains

        def timed_rollout(chains):
            import time

            self.in_rollout = True
            started = time.perf_counter()
            try:
                return rollout_chains(chains)
            finally:
                self.counts["rollout_s"] += time.perf_counter() - started
                self.in_rollout = False

        pl_module.rollout_chains = timed_rollout
        self._restore.append(lambda: delattr(pl_module, "rollout_chains"))

    def on_fit_start(self, trainer, pl_module) -> None:
        # the resident-set high-water mark so far: its peak while loading (and sharding) the model
        self.counts["load_peak_rss"] = _status_bytes("VmHWM")
        policy = pl_module.policy
        encoders = {
            id(p) for name in ("text_encoder", "text_encoder_2") for p in getattr(policy, name).parameters()
        }
        # parameters the module owns go wherever Lightning / FSDP put the module (the training device)
        self.counts["text_encoder_params_on_training_device"] = sum(
            1 for p in pl_module.parameters() if id(p) in encoders
        )

        def count(*_):
            self.counts["train_forwards" if self.in_batch else "eval_forwards"] += 1

        handle = pl_module.policy.transformer.register_forward_hook(count)
        self._restore.append(handle.remove)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # the module skips the batch after its last iteration (and on_train_batch_end never comes)
        limit = pl_module.max_iterations
        self.in_batch = limit is None or pl_module.iteration < limit

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.in_batch = False
        self.iterations += 1

    def on_fit_end(self, trainer, pl_module) -> None:
        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        policy = pl_module.policy
        payload = {
            "rank": trainer.global_rank,
            "iterations": self.iterations,
            "text_encoder_devices": sorted(
                {
                    str(p.device)
                    for name in ("text_encoder", "text_encoder_2")
                    for p in getattr(policy, name).parameters()
                }
            ),
            **self.counts,
        }
        (folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(payload))
        for restore in reversed(self._restore):
            restore()


def _status_bytes(field: str) -> int:
    """A memory line of ``/proc/self/status`` (Linux), in bytes."""
    lines = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field))
