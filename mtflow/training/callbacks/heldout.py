"""The held-out before/after evaluation of a fit."""

from __future__ import annotations

import json
from typing import Any

import lightning as L

from mtflow.training.callbacks.rundir import run_dir


class HeldOutEvaluation(L.Callback):
    """Evaluate held-out chains before RL (the prior) and after it, and print the per-turn before/after table
    (cumulative success C_k, consistency CC_k, overall O_k, marginal M_k). Writes ``<run>/eval/``:
    ``before_after.json``, ``before_after.md``, ``heldout_scores.json`` (every chain's per-turn IF / CC before and
    after, for paired comparisons between runs) and the report of the trained model (``report.json`` ...)."""

    def __init__(self, num_chains: int = 64, batch_size: int = 32, enabled: bool = True) -> None:
        """
        Args:
            num_chains: held-out chains evaluated (the first ones of the data module's validation split).
            batch_size: chains per evaluation rollout.
            enabled: switch the evaluation off without removing the callback.
        """
        self.num_chains = num_chains
        self.batch_size = batch_size
        self.enabled = enabled
        self.before: dict[str, Any] | None = None
        self.before_scores: dict[str, Any] | None = None

    def _evaluate(self, trainer, pl_module, label: str):
        from tqdm.auto import tqdm

        from mtflow.data.loader import ChainBatches
        from mtflow.eval.evaluate import ConditionScores, build_report, rollout_and_score
        from mtflow.eval.metrics import MULTI_TURN

        source = trainer.datamodule.sources.get("val") if trainer.datamodule is not None else None
        if source is None:
            return None
        held_out = _FirstChains(source, min(self.num_chains, len(source)))
        # Chains split across ranks exactly as `mtflow test` splits them (ChainDataModule's evaluation loader):
        # each rank rolls out and scores its own share; every rank gets the same number of batches (sharded models
        # need equal forward calls), padded repeats are removed by chain id when the report is built.
        batches = ChainBatches(
            held_out,
            self.batch_size,
            shuffle=False,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            drop_last=False,
            pad=True,
        )
        local = ConditionScores(kind=MULTI_TURN)
        pl_module.policy.eval()
        # a bar on rank 0 only, and only when the run shows one (enable_progress_bar=false stays quiet)
        show = trainer.is_global_zero and trainer.progress_bar_callback is not None
        for batch in tqdm(batches, desc=label, unit="batch", disable=not show, leave=False):
            scores, items = rollout_and_score(
                pl_module.policy,
                pl_module.eval_scorer,
                batch.chains,
                condition="model",
                adapter=pl_module.eval_adapter,
                num_steps=pl_module.eval_num_steps,
                forward_batch_size=pl_module.rollout_config.forward_batch_size,
                seed=pl_module.seed,
            )
            local.add([c.chain_id for c in batch.chains], scores, items, keep_items=4)
        raw = {"model": _gather_over_ranks(local, trainer)}
        report = build_report(
            raw, threshold=pl_module.eval_config.threshold, num_bootstrap=200, seed=pl_module.seed
        )
        return report, raw

    def on_train_start(self, trainer, pl_module) -> None:
        folder = run_dir(trainer) / "eval"
        if not self.enabled or self.before is not None:
            return  # resumed: keep the prior's numbers from the checkpoint
        result = self._evaluate(trainer, pl_module, "held-out before RL")
        if result is None:
            return
        self.before = result[0].to_dict()
        self.before_scores = per_chain_scores(result[1]["model"])
        if trainer.is_global_zero:
            from mtflow.eval.evaluate import turn_table
            from mtflow.eval.report import EvalReport

            folder.mkdir(parents=True, exist_ok=True)
            print(f"\nheld-out chains before RL (iteration {pl_module.iteration}):")
            print(turn_table(EvalReport.from_dict(self.before)))

    def on_train_end(self, trainer, pl_module) -> None:
        folder = run_dir(trainer) / "eval"
        if not self.enabled or self.before is None:
            return
        result = self._evaluate(trainer, pl_module, "held-out after RL")
        if result is None or not trainer.is_global_zero:
            return
        from mtflow.eval.evaluate import before_after_table
        from mtflow.eval.report import EvalReport, write_report

        after, raw = result
        before = EvalReport.from_dict(self.before)
        table = before_after_table(before, after)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "before_after.md").write_text(table + "\n")
        (folder / "before_after.json").write_text(
            json.dumps({"before": before.to_dict(), "after": after.to_dict()}, indent=2, allow_nan=False)
        )
        if self.before_scores is not None:
            scores = {"before": self.before_scores, "after": per_chain_scores(raw["model"])}
            (folder / "heldout_scores.json").write_text(json.dumps(scores, allow_nan=False))
        # the run-folder contract: <run>/eval/report.json, and chains.png captioned with per-turn scores
        model = raw["model"]
        write_report(folder, after, grid_items=model.items, grid_scores=model.item_scores())
        print(f"\nheld-out chains, before RL -> after {pl_module.iteration} iterations:\n{table}")
        print(f"(written to {folder})")

    def state_dict(self) -> dict[str, Any]:
        return {"before": self.before, "before_scores": self.before_scores}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = state_dict.get("before")
        self.before_scores = state_dict.get("before_scores")


def per_chain_scores(condition) -> dict[str, Any]:
    """A condition's raw scores as JSON-ready lists: ``chain_ids`` [N], ``if`` / ``cc`` [N][K] (None where the judge
    could not score)."""
    scores = condition.scores

    def rows(values) -> list[list[float | None]]:
        return [
            [float(v) if ok else None for v, ok in zip(row, row_ok)]
            for row, row_ok in zip(values.tolist(), scores.scored.tolist())
        ]

    return {
        "chain_ids": list(condition.chain_ids),
        "if": rows(scores.instruction_following),
        "cc": rows(scores.content_consistency),
    }


class _FirstChains:
    """The first ``count`` chains of a source, read lazily (each rank reads only the chains it evaluates)."""

    def __init__(self, source, count: int) -> None:
        self.source, self.count = source, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        if not 0 <= index < self.count:
            raise IndexError(index)
        return self.source[index]


def _gather_over_ranks(local, trainer):
    """Every rank's scores of one condition, on every rank (the images kept for the grid are rank 0's)."""
    if trainer.world_size == 1:
        return local
    import torch

    from mtflow.eval.evaluate import ConditionScores
    from mtflow.reward.base import ScoreBatch

    scores = local.scores
    payload = (local.chain_ids, scores.instruction_following, scores.content_consistency, scores.scored)
    gathered: list = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, payload)
    merged = ConditionScores(kind=local.kind)
    for ids, if_scores, cc_scores, scored in gathered:
        merged.add(ids, ScoreBatch(if_scores, cc_scores, scored), [], keep_items=0)
    merged.items = local.items
    return merged
