"""The held-out before/after evaluation of a fit."""

from __future__ import annotations

import json
import math
from typing import Any

import lightning as L
from PIL import Image

from mtflow.training.callbacks.rundir import run_dir


class HeldOutEvaluation(L.Callback):
    """Evaluate held-out chains before RL (the prior) and after it, and print the per-turn before/after table
    (cumulative success C_k, consistency CC_k, overall O_k, marginal M_k). Writes ``<run>/eval/``:
    ``before_after.json``, ``before_after.md``, ``heldout_scores.json`` (every chain's per-turn IF / CC before and
    after, for paired comparisons between runs; ``before`` is null when the before-RL numbers were reused from a
    record), the report of the trained model (``report.json`` ...), the
    before/after turn curves (``turn_curves.png``) and the first chains' images before and after
    (``heldout_before.json`` / ``heldout_after.json``, for ``mtflow runs gallery``). The after-RL metrics
    (``eval/overall_final`` ...), the table and the figures also go to the run's loggers."""

    NUM_BOOTSTRAP = 200
    GRID_CHAINS = 4

    def __init__(
        self,
        num_chains: int = 64,
        batch_size: int = 32,
        enabled: bool = True,
        reuse_recorded: bool = True,
        forward_batch_size: int | None = None,
    ) -> None:
        """
        Args:
            num_chains: held-out chains evaluated (the first ones of the data module's validation split).
            batch_size: chains per evaluation rollout.
            enabled: switch the evaluation off without removing the callback.
            reuse_recorded: take the before-RL numbers from the base model's recorded ``heldout.json`` (the toy
                prior's) when every evaluation setting matches the recorded ones; otherwise evaluate.
            forward_batch_size: samples per transformer call of the evaluation (None: ``model.rollout``'s).
        """
        self.num_chains = num_chains
        self.batch_size = batch_size
        self.enabled = enabled
        self.reuse_recorded = reuse_recorded
        self.forward_batch_size = forward_batch_size
        self.before: dict[str, Any] | None = None
        self.before_source: str | None = None  # "evaluated" or where the recorded numbers came from
        self.before_scores: dict[str, Any] | None = None

    def _forward_batch_size(self, pl_module) -> int:
        return self.forward_batch_size or pl_module.rollout_config.forward_batch_size

    def _source(self, trainer):
        return trainer.datamodule.sources.get("val") if trainer.datamodule is not None else None

    def _settings(self, trainer, pl_module) -> dict[str, Any]:
        """The settings that decide the held-out numbers (compared field by field with a recorded evaluation)."""
        return {
            "num_chains": min(self.num_chains, len(self._source(trainer))),
            "num_steps": pl_module.eval_num_steps,
            "seed": pl_module.seed,
            "batch_size": self.batch_size,
            "forward_batch_size": self._forward_batch_size(pl_module),
            "threshold": pl_module.eval_config.threshold,
            "num_bootstrap": self.NUM_BOOTSTRAP,
        }

    def _recorded(self, trainer, pl_module) -> dict[str, Any] | None:
        """The recorded before-RL report when reuse is on, nothing was trained yet and every setting matches."""
        if not self.reuse_recorded or pl_module.iteration != 0:
            return None
        from mtflow.toy.recorded import match_recorded

        report, why = match_recorded(
            pl_module.policy, pl_module.eval_scorer, self._source(trainer), self._settings(trainer, pl_module)
        )
        if trainer.is_global_zero and report is not None:
            print(f"\nheld-out chains before RL: reusing the numbers {why} (same settings, field by field)")
        elif trainer.is_global_zero and why != "not a toy-world evaluation":
            print(f"\nheld-out chains before RL: evaluating ({why})")
        if report is not None:
            self.before_source = why
        return report

    def _evaluate(self, trainer, pl_module, label: str, num_chains: int | None = None):
        from tqdm.auto import tqdm

        from mtflow.data.loader import ChainBatches
        from mtflow.eval.evaluate import ConditionScores, build_report, rollout_and_score
        from mtflow.eval.metrics import MULTI_TURN

        source = self._source(trainer)
        if source is None:
            return None
        count = min(self.num_chains if num_chains is None else num_chains, len(source))
        # Chains split across ranks exactly as `mtflow test` splits them (ChainDataModule's evaluation loader):
        # each rank rolls out and scores its own share; every rank gets the same number of batches (sharded models
        # need equal forward calls), padded repeats are removed by chain id when the report is built.
        batches = ChainBatches(
            _FirstChains(source, count),
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
                forward_batch_size=self._forward_batch_size(pl_module),
                seed=pl_module.seed,
            )
            local.add([c.chain_id for c in batch.chains], scores, items, keep_items=self.GRID_CHAINS)
        raw = {"model": _gather_over_ranks(local, trainer)}
        report = build_report(
            raw,
            threshold=pl_module.eval_config.threshold,
            num_bootstrap=self.NUM_BOOTSTRAP,
            seed=pl_module.seed,
        )
        return report, raw

    def on_train_start(self, trainer, pl_module) -> None:
        folder = run_dir(trainer) / "eval"
        if not self.enabled or self.before is not None:
            return  # resumed: keep the prior's numbers from the checkpoint
        if self._source(trainer) is None:
            return
        recorded = self._recorded(trainer, pl_module)
        if recorded is not None:
            # only the first chains' images for the gallery (the same per-chain noise as the recorded run)
            result = self._evaluate(trainer, pl_module, "held-out before RL (images)", self.GRID_CHAINS)
            self.before = recorded
        else:
            result = self._evaluate(trainer, pl_module, "held-out before RL")
            self.before = result[0].to_dict()
            self.before_scores = per_chain_scores(result[1]["model"])
            self.before_source = "evaluated"
        if trainer.is_global_zero:
            from mtflow.eval.evaluate import turn_table
            from mtflow.eval.report import EvalReport
            from mtflow.training.callbacks.images import log_metrics, save_chains

            folder.mkdir(parents=True, exist_ok=True)
            model = result[1]["model"]
            save_chains(
                folder, "heldout_before", model.items, model.item_scores(), iteration=pl_module.iteration
            )
            before = EvalReport.from_dict(self.before)
            log_metrics(
                trainer, _finite(before.conditions["model"].to_stats("eval/before")), pl_module.iteration
            )
            print(f"\nheld-out chains before RL (iteration {pl_module.iteration}):")
            print(turn_table(before))

    def on_train_end(self, trainer, pl_module) -> None:
        folder = run_dir(trainer) / "eval"
        if not self.enabled or self.before is None:
            return
        result = self._evaluate(trainer, pl_module, "held-out after RL")
        if result is None or not trainer.is_global_zero:
            return
        from mtflow.eval.evaluate import before_after_table
        from mtflow.eval.report import (
            CURVES_PNG,
            EvalReport,
            before_after_rows,
            make_before_after_figure,
            write_report,
        )
        from mtflow.training.callbacks.images import log_image, log_metrics, log_table, save_chains

        after, raw = result
        before = EvalReport.from_dict(self.before)
        table = before_after_table(before, after)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "before_after.md").write_text(table + "\n")
        (folder / "before_after.json").write_text(
            json.dumps({"before": before.to_dict(), "after": after.to_dict()}, indent=2, allow_nan=False)
        )
        scores = {"before": self.before_scores, "after": per_chain_scores(raw["model"])}
        (folder / "heldout_scores.json").write_text(json.dumps(scores, allow_nan=False))
        # the run-folder contract: <run>/eval/report.json, and chains.png captioned with per-turn scores
        model = raw["model"]
        files = write_report(folder, after, grid_items=model.items, grid_scores=model.item_scores())
        make_before_after_figure(before, after).savefig(
            files.curves, dpi=100
        )  # replaces the after-only curves
        save_chains(folder, "heldout_after", model.items, model.item_scores(), iteration=pl_module.iteration)
        # the loggers get what the folder gets: the sweep metric eval/overall_final, the table, the figures
        step = pl_module.iteration
        log_metrics(trainer, _finite(after.conditions["model"].to_stats("eval")), step)
        log_table(trainer, "eval/before_after", *before_after_rows(before, after), step)
        log_image(trainer, f"eval/{CURVES_PNG.removesuffix('.png')}", Image.open(files.curves), step)
        if files.grid is not None:
            log_image(trainer, "eval/chains", Image.open(files.grid), step)
        print(f"\nheld-out chains, before RL -> after {pl_module.iteration} iterations:\n{table}")
        print(f"(written to {folder})")

    def state_dict(self) -> dict[str, Any]:
        return {
            "before": self.before,
            "before_source": self.before_source,
            "before_scores": self.before_scores,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = state_dict.get("before")
        self.before_source = state_dict.get("before_source")
        self.before_scores = state_dict.get("before_scores")


def _finite(stats: dict[str, float]) -> dict[str, float]:
    """Drop undefined (NaN) stats instead of logging invented values."""
    return {k: float(v) for k, v in stats.items() if v is not None and math.isfinite(float(v))}


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
