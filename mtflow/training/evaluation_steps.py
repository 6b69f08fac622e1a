"""Validation and test steps of ``FlowRLModule``: deterministic rollouts of held-out chains under the evaluation
conditions (model / base / merged), one judge pass per batch, the EdiVal-style report gathered over ranks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mtflow.data.loader import ChainBatch, chains_of
from mtflow.data.records import EditChain
from mtflow.eval.evaluate import CONDITIONS, ConditionScores, build_report, rollout_and_score
from mtflow.eval.metrics import MULTI_TURN, SINGLE_TURN_MERGED
from mtflow.reward.base import ScoreBatch


class EvaluationSteps:
    """Mixed into ``FlowRLModule`` (uses its policy, eval_scorer, eval_config, seed, rollout_config and trainer)."""

    _eval: dict[str, ConditionScores]

    def _evaluate_batch(self, batch: ChainBatch | list[EditChain], conditions: Sequence[str]) -> None:
        chains = chains_of(batch)
        self.policy.eval()
        for name in conditions:
            if name not in self._eval:
                self._eval[name] = ConditionScores(
                    kind=SINGLE_TURN_MERGED if name == "merged" else MULTI_TURN
                )
            scores, items = rollout_and_score(
                self.policy,
                self.eval_scorer,
                chains,
                condition=name,
                adapter=None if name == "base" else self.eval_adapter,
                num_steps=self.eval_num_steps,
                forward_batch_size=self.rollout_config.forward_batch_size,
                seed=self.seed,
            )
            self._eval[name].add([c.chain_id for c in chains], scores, items, keep_items=4)

    def _gathered_conditions(self) -> dict[str, ConditionScores]:
        """Every rank's scores, on every rank (repeats from padded batches are removed later by chain id)."""
        local, self._eval = self._eval, {}
        if self.trainer.world_size == 1:
            return local
        payload = {
            name: (
                c.kind,
                c.chain_ids,
                c.scores.instruction_following,
                c.scores.content_consistency,
                c.scores.scored,
            )
            for name, c in local.items()
        }
        gathered: list = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(gathered, payload)
        merged: dict[str, ConditionScores] = {}
        for rank_payload in gathered:
            for name, (kind, ids, if_s, cc_s, scored) in rank_payload.items():
                target = merged.setdefault(name, ConditionScores(kind=kind))
                target.add(ids, ScoreBatch(if_s, cc_s, scored), [], keep_items=0)
        for name, condition in local.items():
            merged[name].items = condition.items
        return merged

    def validation_step(self, batch: ChainBatch | list[EditChain], batch_idx: int) -> None:
        self._evaluate_batch(batch, ["model"])

    def on_validation_epoch_end(self) -> None:
        conditions = self._gathered_conditions()
        if not conditions:
            return
        report = build_report(conditions, threshold=self.eval_config.threshold, num_bootstrap=0)
        self.log_dict(_loggable(report.conditions["model"].to_stats("val")), on_step=False, on_epoch=True)

    def test_step(self, batch: ChainBatch | list[EditChain], batch_idx: int) -> None:
        self._evaluate_batch(batch, self.eval_config.conditions or list(CONDITIONS))

    def on_test_epoch_end(self) -> None:
        """Write the EdiVal-style report (json, Markdown, plots, image grid) to ``<run>/eval`` and print it."""
        from mtflow.eval.report import render_markdown, write_report
        from mtflow.training.callbacks import run_dir

        conditions = self._gathered_conditions()
        out_dir = run_dir(self.trainer) / "eval"
        if not conditions:
            return
        report = build_report(
            conditions,
            threshold=self.eval_config.threshold,
            num_bootstrap=self.eval_config.bootstrap,
            seed=self.seed,
            info={
                "pretrained": self.policy.pretrained,
                "adapter": self.eval_adapter,
                "iteration": self.iteration,
                "judge": type(self.eval_scorer).__name__,
                "num_steps": self.eval_num_steps,
            },
        )
        if self.trainer.is_global_zero:
            primary = conditions[report.primary]
            write_report(out_dir, report, grid_items=primary.items, grid_scores=primary.item_scores())
            print(render_markdown(report))
            print(f"evaluation report written to {out_dir}")
        self.log_dict(
            _loggable(report.conditions[report.primary].to_stats("eval")), on_step=False, on_epoch=True
        )


def _loggable(stats: dict[str, float]) -> dict[str, float]:
    """Drop NaN stats (nothing to average) instead of logging invented values."""
    return {k: float(v) for k, v in stats.items() if v is not None and math.isfinite(float(v))}
