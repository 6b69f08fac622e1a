"""``FlowRLModule``: one RL iteration reads top to bottom, ``rollout -> score -> advantages -> update``.

Manual optimisation: ``training_step`` receives B whole edit chains (this rank's share), rolls out G trajectories
of K turns each, asks the judge once per trajectory, turns the scores into group-normalised advantages and lets the
algorithm (``mtflow.algorithms``: GRPO, NFT) make ``optim.updates_per_rollout`` optimiser steps. The module keeps
only what every algorithm shares: the loop, gradient clipping and the non-finite guard, the EMA adapter, logging,
evaluation and checkpoint state. Model specifics stay behind the ``EditPolicy`` protocol (``mtflow/models``).

Reproducibility: every random draw comes from a generator seeded by (seed, iteration, purpose[, chain id]), so a
chain's trajectories do not depend on rank layout, and a resumed run continues bit for bit.
"""

from __future__ import annotations

import logging
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, is_dataclass
from typing import Any

import lightning as L
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.utilities import rank_zero_warn

from mtflow.advantage import AdvantageConfig, AdvantageResult, compute_advantages
from mtflow.algorithms import GRPO, Algorithm
from mtflow.data.loader import ChainBatch, chains_of
from mtflow.data.records import EditChain
from mtflow.eval.evaluate import (
    ConditionScores,
    EvalConfig,
    scoring_items,
)
from mtflow.losses import ema_update_
from mtflow.models.base import EMA_ADAPTER, TRAINED_ADAPTER, EditPolicy
from mtflow.reward.base import ScoreBatch, Scorer, ScoringItem
from mtflow.rollout import Rollout, RolloutConfig, RolloutPreview, rollout
from mtflow.seeding import resolve_seed
from mtflow.training.evaluation_steps import EvaluationSteps, _loggable
from mtflow.training.optim import OptimConfig

log = logging.getLogger(__name__)

# Defaults shared by every module: frozen configs and a stateless algorithm (its knobs only), so sharing is safe.
# lazy_instance: jsonargparse can print it (--print_config) as class_path + init_args.
DEFAULT_ALGORITHM, DEFAULT_ROLLOUT, DEFAULT_ADVANTAGE = (
    lazy_instance(GRPO),
    RolloutConfig(),
    AdvantageConfig(),
)
DEFAULT_OPTIM, DEFAULT_EVAL = OptimConfig(), EvalConfig()


class FlowRLModule(EvaluationSteps, L.LightningModule):
    """Multi-turn RL of a flow-matching editor with LoRA; the algorithm is a component (``model.algorithm``)."""

    def __init__(
        self,
        policy: EditPolicy,
        scorer: Scorer,
        algorithm: Algorithm = DEFAULT_ALGORITHM,
        rollout: RolloutConfig = DEFAULT_ROLLOUT,
        advantage: AdvantageConfig = DEFAULT_ADVANTAGE,
        optim: OptimConfig = DEFAULT_OPTIM,
        evaluation: EvalConfig = DEFAULT_EVAL,
        ema_decay: float | None = None,
        overlap_scoring: bool = True,
        max_iterations: int | None = None,
        seed: int | None = None,
        eval_scorer: Scorer | None = None,
    ) -> None:
        """
        Args:
            policy: the editor and its LoRA settings (resolution, guidance, rank, ...).
            scorer: the judge (in-process VLM, ``RemoteScorer`` over HTTP, toy exact judge).
            algorithm: the RL algorithm and its own knobs: ``mtflow.algorithms.GRPO`` or ``mtflow.algorithms.NFT``.
            rollout: G, T, micro-batch size and storage of rollouts (which steps are stochastic: the algorithm).
            advantage: how judge scores become advantages (fusion, lambda_CC, aggregation, broadcast, a_max, ...).
            optim: AdamW and the optimiser steps per rollout.
            evaluation: held-out evaluation (validation, ``mtflow test``, ``fit``'s before/after table).
            ema_decay: decay of an EMA adapter that evaluation and export use (None: no EMA).
            overlap_scoring: run the judge in a background thread while the algorithm prepares its update.
            max_iterations: stop after this many RL iterations (None: the Trainer's limits decide).
            seed: base seed of every random draw (None: the run's ``seed_everything``; the checkpoint records the
                resolved value).
            eval_scorer: the judge of held-out evaluation (validate, test, the before/after table of ``fit``), e.g. an
                exact or stronger judge than the one training is rewarded by (None: ``scorer``).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["policy", "scorer", "eval_scorer"])
        # Given in Python (tests, tools) the groups are objects; LightningCLI passes its config dicts. Checkpoints and
        # hparams.yaml hold plain values either way (no unpickling of classes on load).
        for key, value in list(self.hparams.items()):
            self.hparams[key] = _plain(value)
        self.seed = resolve_seed(seed)
        self.hparams.seed = self.seed
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the LoRA adapters
        if rollout.group_size < 2:
            raise ValueError(
                f"rollout.group_size must be >= 2, got {rollout.group_size}: advantages are measured against the "
                "mean of the chain's group, so with one trajectory per chain every advantage is 0 and nothing is learned"
            )
        if ema_decay is not None and not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1] (or None for no EMA), got {ema_decay}")
        algorithm.check(rollout, advantage)
        optim.check_schedule(max_iterations)
        self.policy = policy
        self.scorer = scorer
        self.eval_scorer = eval_scorer if eval_scorer is not None else scorer
        self.algorithm = algorithm
        self.rollout_config = rollout
        self.advantage_config = advantage
        self.optim_config = optim
        self.eval_config = evaluation
        self.ema_decay = ema_decay
        self.overlap_scoring = overlap_scoring
        self.max_iterations = max_iterations
        self.iteration = 0
        self.samples_seen = 0  # trajectories over all ranks; status.json and checkpoints read this one count
        self.nonfinite_streak = 0
        self.last_rollout: RolloutPreview | None = None  # the first rows' images and scores, for logging
        self._executor: ThreadPoolExecutor | None = None
        self._eval: dict[str, ConditionScores] = {}

    # ================================================================== setup
    @property
    def adapters(self) -> list[str]:
        """Every LoRA adapter this run keeps: the trained one, the algorithm's extras, the EMA."""
        extra = list(self.algorithm.extra_adapters) + ([EMA_ADAPTER] if self.ema_decay is not None else [])
        return [TRAINED_ADAPTER, *extra]

    @property
    def eval_adapter(self) -> str:
        return EMA_ADAPTER if self.ema_decay is not None else TRAINED_ADAPTER

    @property
    def eval_num_steps(self) -> int:
        return self.eval_config.num_steps or self.rollout_config.num_steps

    def configure_model(self) -> None:
        if self.policy.is_loaded:
            return
        self.policy.load(extra_adapters=self.adapters[1:])
        if self.device_mesh is not None:
            from mtflow.training.distributed import shard_policy

            shard_policy(self.policy, self.device_mesh)
        materialize = getattr(self.policy, "materialize_from_rank0", None)
        if (
            materialize is not None
        ):  # policies that read the checkpoint on rank 0 only (KontextPolicy.load_once)
            materialize(self.trainer.strategy.root_device if self._trainer is not None else "cpu")
        self.policy.compile_if_requested()  # no-op unless the policy asks for it

    def configure_optimizers(self):
        optim = self.optim_config
        optimizer = torch.optim.AdamW(
            self.policy.adapter_parameters(TRAINED_ADAPTER),
            lr=optim.lr,
            betas=tuple(optim.betas),
            weight_decay=optim.weight_decay,
        )
        if not optim.has_schedule:
            return optimizer
        # stepped by step_optimizer (manual optimisation); Lightning checkpoints and restores its state
        scheduler = optim.build_scheduler(optimizer, self.max_iterations)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ================================================================== the iteration
    def training_step(self, batch: ChainBatch | list[EditChain], batch_idx: int) -> None:
        started = time.perf_counter()
        lr = self._learning_rate()  # of this iteration's first optimiser step
        chains = chains_of(batch)
        result = self.rollout_chains(chains)
        scores, prepared, judge_stats = self.score_and_prepare(result)
        advantages, adv_stats = self.compute_advantages(scores, result)
        update_stats = self.update(result, advantages, prepared)
        self.after_update()
        if isinstance(batch, ChainBatch):
            batch.mark_consumed()
        self.iteration += 1
        self.samples_seen += result.num_trajectories * self.trainer.world_size
        self.last_rollout = RolloutPreview.from_rollout(result, scores)
        elapsed = time.perf_counter() - started
        stats = {
            **result.stats,
            **judge_stats,
            **adv_stats,
            **update_stats,
            "perf/iteration_s": elapsed,
            "perf/trajectories_per_s": result.num_trajectories / elapsed,
            "train/iteration": float(self.iteration),
            "train/lr": lr,
        }
        self.log_dict(
            _loggable(self._mean_over_ranks(stats)), on_step=True, on_epoch=False, batch_size=len(chains)
        )

    def rollout_chains(self, chains: list[EditChain]) -> Rollout:
        """G trajectories per chain with the algorithm's sampling adapter and SDE; noise seeded per (iteration,
        chain)."""
        sde = self.algorithm.sde()
        recorded = None
        if (
            sde is not None and sde.stochastic == "window"
        ):  # one window position for the iteration, on every rank
            recorded = sde.recorded_steps(self.rollout_config.num_steps, self.generator("window", host=True))
        generators = [self.generator("rollout", chain.chain_id) for chain in chains]
        self.policy.eval()
        from mtflow.training.unsharded import unsharded

        units = self.policy.fsdp_units() if self._rollout_unsharded() else []
        with unsharded(units):  # no units: FSDP2's per-call all-gathers as usual
            return rollout(
                self.policy,
                chains,
                self.rollout_config,
                generator=generators,
                adapter=self.algorithm.sampling_adapter,
                recorded_steps=recorded,
                sde=sde,
            )

    def _rollout_unsharded(self) -> bool:
        """``rollout.unsharded`` resolved: "auto" is on only on a GPU whose free memory holds the unsharded base
        and leaves a quarter of the GPU for the rollout (the same decision on every rank)."""
        mode = getattr(self.rollout_config, "unsharded", "off")
        if mode != "auto" or self.device.type != "cuda" or self.device_mesh is None:
            return mode == "on"
        from mtflow.training.unsharded import unsharded_bytes

        free, total = torch.cuda.mem_get_info(self.device)
        need = unsharded_bytes(self.policy.fsdp_units(), self.policy.model_dtype)
        return self._all_ranks(free - need >= total // 4)

    def score_and_prepare(self, result: Rollout) -> tuple[ScoreBatch, Any, dict[str, float]]:
        """Ask the judge (in a background thread when ``overlap_scoring``) while the algorithm prepares the
        reward-independent part of its update; then wait for the scores."""
        items = scoring_items(result)
        submitted = time.perf_counter()
        future: Future | None = None
        if self.overlap_scoring:
            future = self._pool().submit(_timed_score, self.scorer, items)
            prepared = self._prepare(result)
            waited = time.perf_counter()
            scores, judge_s = future.result()
            wait_s = time.perf_counter() - waited
        else:
            scores, judge_s = _timed_score(self.scorer, items)
            wait_s = judge_s
            prepared = self._prepare(result)
        if scores.instruction_following.shape != (result.num_trajectories, result.num_turns):
            raise RuntimeError(
                f"scorer {type(self.scorer).__name__} returned {tuple(scores.instruction_following.shape)} scores "
                f"for {result.num_trajectories} trajectories x {result.num_turns} turns"
            )
        unscored = int((~scores.trajectory_scored).sum())
        if unscored:
            reasons = sorted(
                {str(d.get("error") or d.get("status")) for d in scores.diagnostics if d.get("error")}
            )
            log.warning(
                "iteration %d: the judge could not score %d of %d trajectories; they are excluded (%s)",
                self.iteration,
                unscored,
                result.num_trajectories,
                "; ".join(reasons[:3]) or "no reason given",
            )
        stats = {
            "perf/judge_s": judge_s,
            "perf/judge_wait_s": wait_s,
            "perf/score_and_prepare_s": time.perf_counter() - submitted,
            "reward/num_unscored": float(unscored),
        }
        return scores, prepared, stats

    def _prepare(self, result: Rollout) -> Any:
        with torch.no_grad():
            return self.algorithm.prepare(self, result)

    def compute_advantages(
        self, scores: ScoreBatch, result: Rollout
    ) -> tuple[AdvantageResult, dict[str, float]]:
        """[N, K] scores -> [B, G, K] advantages (gathered over ranks for batch-std normalisation)."""
        shape = (result.num_chains, result.group_size, result.num_turns)
        if_scores = scores.instruction_following.reshape(shape).to(self.device)
        cc_scores = scores.content_consistency.reshape(shape).to(self.device)
        scored = scores.scored.reshape(shape).to(self.device)
        if self.advantage_config.std_mode == "batch" and self.trainer.world_size > 1:
            gathered = [self.all_gather(t).flatten(0, 1) for t in (if_scores, cc_scores, scored)]
            full, stats = compute_advantages(*gathered, self.advantage_config)
            rank = self.trainer.global_rank
            local = slice(rank * shape[0], (rank + 1) * shape[0])
            return _slice_result(full, local), stats
        return compute_advantages(if_scores, cc_scores, scored, self.advantage_config)

    def update(self, result: Rollout, advantages: AdvantageResult, prepared: Any) -> dict[str, float]:
        """The algorithm's optimiser steps; skipped (on every rank) when no sample has a valid advantage."""
        started = time.perf_counter()
        if not self._any_rank(bool(advantages.valid.any())):
            log.warning("iteration %d: no trajectory has a usable advantage; update skipped", self.iteration)
            return {"perf/update_s": time.perf_counter() - started, "train/skipped_update": 1.0}
        self.policy.train()
        stats = self.algorithm.update(self, result, advantages, prepared)
        stats["perf/update_s"] = time.perf_counter() - started
        stats["train/skipped_update"] = 0.0
        return stats

    def after_update(self) -> None:
        """The algorithm's averaging (NFT: the old adapter follows), then the EMA adapter tracks the trained one."""
        self.algorithm.after_update(self)
        if self.ema_decay is not None:
            ema_update_(
                self.policy.adapter_parameters(EMA_ADAPTER),
                self.policy.adapter_parameters(TRAINED_ADAPTER),
                self.ema_decay,
            )

    # ================================================================== UpdateContext (mtflow.algorithms)
    def generator(self, purpose: str, key: str = "", host: bool = False) -> torch.Generator:
        """A generator seeded by (seed, iteration, purpose, key): identical on every rank and after a resume. On the
        module's device, or on the CPU (``host``) for draws that produce CPU tensors (torch refuses a CUDA generator
        there)."""
        device = torch.device("cpu") if host else self.device
        return _seeded(f"{self.seed}/{self.iteration}/{purpose}/{key}", device)

    def update_chunks(self, keys: list[Any]) -> list[list[Any]]:
        """Shuffle (with the iteration's generator, identical on every rank) and split into optimiser steps."""
        order = torch.randperm(len(keys), generator=self.generator("update", host=True)).tolist()
        parts = min(self.optim_config.updates_per_rollout, len(keys))
        return [[keys[i] for i in order[p::parts]] for p in range(parts)]

    def accumulate_gradient(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch loss (Lightning's ``manual_backward``: precision and strategy aware)."""
        self.manual_backward(loss)

    def step_optimizer(self, losses: list[torch.Tensor]) -> None:
        """Clip and step, unless some rank saw a non-finite loss or gradient: then skip on every rank."""
        optimizer = self.optimizers()
        params = self.policy.adapter_parameters(TRAINED_ADAPTER)
        # Clipping runs on every rank whatever its losses (under FSDP the norm is a collective); a step with a
        # non-finite loss is skipped below anyway, so clipping its gradients changes nothing.
        max_norm = self.optim_config.max_grad_norm if self.optim_config.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        finite = torch.isfinite(torch.stack(losses)).all() & torch.isfinite(_local(grad_norm))
        if self._all_ranks(bool(finite)):  # one host sync per optimiser step
            optimizer.step()
            self.nonfinite_streak = 0
            scheduler = self.lr_schedulers()
            if scheduler is not None:  # per optimiser step taken (a skipped step does not advance it)
                scheduler.step()
        else:
            self.nonfinite_streak += 1
            limit = self.optim_config.max_nonfinite_skips
            log.warning(
                "iteration %d: non-finite loss or gradient; optimiser step skipped (%d in a row, abort after %d)",
                self.iteration,
                self.nonfinite_streak,
                limit,
            )
            if self.nonfinite_streak >= limit:
                optimizer.zero_grad(set_to_none=True)
                raise FloatingPointError(
                    f"{self.nonfinite_streak} consecutive non-finite updates at iteration {self.iteration}; "
                    "training stopped (the last checkpoint is intact). Lower the learning rate or check the judge."
                )
        optimizer.zero_grad(set_to_none=True)

    def _learning_rate(self) -> float:
        if self._trainer is None:  # driven by hand (benchmarks): no optimiser attached
            return float("nan")
        return float(self.optimizers().param_groups[0]["lr"])

    # ================================================================== collectives and plumbing
    def _all_ranks(self, flag: bool) -> bool:
        """True only if ``flag`` holds on every rank (one all-reduce)."""
        if self.trainer.world_size == 1:
            return flag
        value = torch.tensor(float(flag), device=self.device)
        return bool(self.trainer.strategy.reduce(value, reduce_op="min") > 0.5)

    def _any_rank(self, flag: bool) -> bool:
        if self.trainer.world_size == 1:
            return flag
        value = torch.tensor(float(flag), device=self.device)
        return bool(self.trainer.strategy.reduce(value, reduce_op="max") > 0.5)

    def _mean_over_ranks(self, stats: dict[str, float]) -> dict[str, float]:
        """NaN-aware mean of every stat over ranks (one all-gather; keys are identical on every rank)."""
        if self.trainer.world_size == 1:
            return stats
        keys = sorted(stats)
        values = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=self.device)
        gathered = self.all_gather(values)  # [world, num_keys]
        return dict(zip(keys, torch.nanmean(gathered, dim=0).tolist()))

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtflow-judge")
        return self._executor

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        if self.max_iterations is not None and self.iteration >= self.max_iterations:
            self.trainer.should_stop = True
            return -1  # ends the epoch; should_stop ends fit
        return None

    def on_fit_end(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    # ================================================================== checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Only adapters are worth saving: the base is reloaded from ``policy.pretrained``.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if "lora_" in k}
        checkpoint["mtflow"] = {
            "iteration": self.iteration,
            "samples_seen": self.samples_seen,
            "nonfinite_streak": self.nonfinite_streak,
            "adapters": self.adapters,
            "lora": {
                "rank": self.policy.lora_rank,
                "alpha": self.policy.lora_alpha,
                "targets": list(self.policy.lora_targets),
            },
            "pretrained": self.policy.pretrained,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("mtflow", {})
        self._check_resumable(state)
        self.iteration = int(state.get("iteration", 0))
        # checkpoints written before the module kept the count hold it in the status callback's state
        legacy = (checkpoint.get("callbacks") or {}).get("RunStatus") or {}
        self.samples_seen = int(state.get("samples_seen", legacy.get("samples_seen", 0)))
        self.nonfinite_streak = int(state.get("nonfinite_streak", 0))
        saved = checkpoint.get("state_dict")  # FSDP strategies load it themselves and pop it
        if saved is None:
            return
        missing = [k for k, _ in self.named_parameters() if "lora_" in k and k not in saved]
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} LoRA tensors of this model, e.g. {missing[:3]}")

    def _check_resumable(self, state: dict[str, Any]) -> None:
        """Refuse, in one readable message, a checkpoint whose LoRA or adapters this run cannot take (instead of
        a tensor-by-tensor size-mismatch dump); a different base path is only warned about (models move)."""
        lora = state.get("lora")
        if lora is None:
            return  # not written by this trainer's on_save_checkpoint: the tensor checks below still apply
        here = {
            "rank": self.policy.lora_rank,
            "alpha": self.policy.lora_alpha,
            "targets": list(self.policy.lora_targets),
        }
        problems = [
            f"LoRA {key} {lora.get(key)!r} in the checkpoint, {value!r} in this run"
            for key, value in here.items()
            if lora.get(key) != value
        ]
        needed = self.adapters
        lacking = [a for a in needed if a not in state.get("adapters", [])]
        if lacking:
            problems.append(
                f"adapters {state.get('adapters')} in the checkpoint, but this run ({self.algorithm.name}"
                f"{', EMA' if EMA_ADAPTER in needed else ''}) also needs {lacking}"
            )
        if problems:
            raise ValueError(
                "cannot resume from this checkpoint: "
                + "; ".join(problems)
                + ". Resume with the settings it was trained with, or start a new run from its adapter "
                "(mtflow export writes it for diffusers)."
            )
        if state.get("pretrained") not in (None, self.policy.pretrained):
            rank_zero_warn(
                f"resuming adapters trained on {state['pretrained']!r} on top of {self.policy.pretrained!r}; "
                "this is only right if both are the same base model"
            )


# ====================================================================== helpers
def _plain(value: Any) -> Any:
    """A hyperparameter as plain data: dataclass groups as dicts, an algorithm as its class path and arguments."""
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, Algorithm):
        return {"class_path": value.class_path, "init_args": value.config()}
    return value


def _seeded(key: str, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(zlib.crc32(key.encode()))


def _timed_score(scorer: Scorer, items: list[ScoringItem]) -> tuple[ScoreBatch, float]:
    started = time.perf_counter()
    scores = scorer.score(items)
    return scores, time.perf_counter() - started


def _slice_result(result: AdvantageResult, rows: slice) -> AdvantageResult:
    return AdvantageResult(**{name: getattr(result, name)[rows] for name in result.__dataclass_fields__})


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t
