"""``FlowRLModule``: one RL iteration reads top to bottom, ``rollout -> score -> advantages -> update``.

Manual optimisation: ``training_step`` receives B whole edit chains (this rank's share), rolls out G trajectories
of K turns each, asks the judge once per trajectory, turns the scores into group-normalised advantages and makes
``updates_per_rollout`` optimiser steps over the recorded samples (GRPO: the SDE transitions; NFT: noised copies
of each turn's clean output). All model-specific work goes through the policy adapter (``mtflow/models``).

Reproducibility: every random draw comes from a generator seeded by (seed, iteration, purpose[, chain id]), so a
chain's trajectories do not depend on rank layout, and a resumed run continues bit for bit.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from mtflow.advantage import AdvantageConfig, AdvantageResult, Aggregation, compute_advantages
from mtflow.data.loader import ChainBatch, chains_of
from mtflow.data.records import EditChain
from mtflow.eval.evaluate import CONDITIONS, ConditionScores, build_report, rollout_and_score, scoring_items
from mtflow.eval.metrics import MULTI_TURN, SINGLE_TURN_MERGED
from mtflow.kernels import grpo_loss, nft_loss
from mtflow.losses import (
    GRPOConfig,
    NFTConfig,
    ema_update_,
    old_adapter_decay,
    sampling_adapter,
    soft_update_,
)
from mtflow.models.kontext import KontextPolicy
from mtflow.reward.base import ScoreBatch, Scorer, ScoringItem
from mtflow.rollout import (
    Rollout,
    RolloutConfig,
    RolloutPreview,
    recompute_transition,
    rollout,
    transition_batches,
)
from mtflow.sampling import stochastic_steps
from mtflow.seeding import resolve_seed

log = logging.getLogger(__name__)

TRAINED, OLD, EMA = "default", "old", "ema"


@dataclass
class NFTSamples:
    """Training samples of one NFT iteration: D noised copies of every turn's clean output. M = N * K * D.

    Attributes:
        trajectory, turn: [M] long, which (n, k) each sample comes from.
        sigma: [M] float32 noise level; x_t: [M, L, C] float32 noised latents; x0: [M, L, C] clean latents.
        v_old, v_ref: [M, L, C] float32 velocities of the old adapter and the frozen base (precomputed, no grad).
    """

    trajectory: torch.Tensor
    turn: torch.Tensor
    sigma: torch.Tensor
    x_t: torch.Tensor
    x0: torch.Tensor
    v_old: torch.Tensor
    v_ref: torch.Tensor | None


class FlowRLModule(L.LightningModule):
    """Multi-turn RL (GRPO or NFT) of a flow-matching editor with LoRA."""

    def __init__(
        self,
        policy: KontextPolicy,
        scorer: Scorer,
        loss: Literal["grpo", "nft"] = "grpo",
        group_size: int = 16,
        num_steps: int = 12,
        noise_level: float = 0.9,
        stochastic: Literal["all", "window"] = "all",
        window_size: int = 2,
        lambda_cc: float = 0.3,
        aggregation: Aggregation = "mean",
        fusion: Literal["advantage", "reward"] = "advantage",
        broadcast: Literal["trajectory", "turn"] = "trajectory",
        std_mode: Literal["group", "batch"] = "group",
        adv_clip: float = 5.0,
        min_group_std: float = 0.0,
        clip_eps: float = 1e-4,
        beta_kl: float = 0.0,
        nft_beta: float = 1.0,
        nft_beta_ref: float = 1e-4,
        nft_train_timesteps: int = 1,
        nft_stochastic_rollout: bool = False,
        old_adapter_rate: float = 0.001,
        old_adapter_max_decay: float = 0.5,
        ema_decay: float | None = None,
        lr: float = 3e-4,
        weight_decay: float = 1e-4,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        max_grad_norm: float = 1.0,
        updates_per_rollout: int = 2,
        forward_batch_size: int = 16,
        store_dtype: Literal["float32", "bfloat16"] = "float32",
        overlap_scoring: bool = True,
        max_iterations: int | None = None,
        max_nonfinite_skips: int = 3,
        eval_threshold: float = 4.0,
        eval_num_steps: int | None = None,
        eval_conditions: list[str] | None = None,
        eval_bootstrap: int = 1000,
        kernels: Literal["auto", "torch", "triton"] = "auto",
        seed: int | None = None,
    ) -> None:
        """
        Args:
            policy: the editor and its LoRA settings (resolution, guidance, rank, ...).
            scorer: the judge (in-process VLM, ``RemoteScorer`` over HTTP, toy exact judge).
            loss: "grpo" (Flow-GRPO, SDE rollouts with log-probs) or "nft" (DiffusionNFT, ODE rollouts).
            group_size: G trajectories per chain.
            num_steps: T sampler steps per turn.
            noise_level: SDE noise level a (Flow-GRPO FLUX configs: 0.9).
            stochastic: GRPO: SDE on "all" steps or on a "window" of ``window_size`` steps (position drawn per
                iteration).
            window_size: W for window mode.
            lambda_cc: weight of content consistency in the fusion.
            aggregation: turn aggregation of each component: mean, min, last or product.
            fusion: fuse IF and CC at the "advantage" level (default) or the "reward" level.
            broadcast: "trajectory" (one advantage to every turn and step) or "turn" (per-turn advantages).
            std_mode: normalise by the "group" std or the whole "batch" std (gathered over ranks).
            adv_clip: A_max; advantages are clipped to [-A_max, A_max] (NFT maps them to r with it too).
            min_group_std: drop groups whose fused reward std is below this (0 keeps all).
            clip_eps: GRPO ratio clip range eps.
            beta_kl: GRPO KL weight to the frozen base (Gaussian-mean KL with the Delta factor).
            nft_beta: NFT beta (distance of the implicit positive/negative policies).
            nft_beta_ref: NFT weight of the squared velocity distance to the frozen base.
            nft_train_timesteps: NFT noised copies D per turn output (grid timesteps drawn without replacement);
                each costs an old, a reference and a trained forward: D = 1 keeps NFT >= 2x cheaper than full-SDE
                GRPO per iteration (BENCHMARKS.md), larger D learns more per rollout.
            nft_stochastic_rollout: NFT rolls out with the SDE instead of the ODE.
            old_adapter_rate: NFT old-adapter decay eta = min(rate * iteration, max).
            old_adapter_max_decay: cap of eta.
            ema_decay: decay of an EMA adapter for evaluation and export (None: no EMA).
            lr: AdamW learning rate.
            weight_decay: AdamW weight decay.
            adam_betas: AdamW betas.
            max_grad_norm: gradient clipping (total norm; 0 disables).
            updates_per_rollout: optimiser steps per rollout; the samples are split by timestep into this many parts.
            forward_batch_size: samples per transformer call in rollout and update (memory bound).
            store_dtype: dtype of stored rollout states ("bfloat16" halves memory; log-probs stay exact).
            overlap_scoring: run the judge in a background thread while reward-independent work proceeds.
            max_iterations: stop after this many RL iterations (None: the Trainer's limits decide).
            max_nonfinite_skips: abort after this many consecutive iterations whose update was non-finite.
            eval_threshold: IF score that counts as a successful turn in validation metrics.
            eval_num_steps: sampler steps for validation rollouts (None: ``num_steps``).
            eval_conditions: what ``mtflow test`` evaluates: any of "model", "base" (adapters disabled) and
                "merged" (all K instructions as one edit); None: all three.
            eval_bootstrap: bootstrap resamples for the confidence intervals of ``mtflow test``.
            kernels: fused Triton kernels for the SDE step and the losses: "auto" (on CUDA), "torch", "triton".
            seed: base seed of every random draw (None: the run's ``seed_everything``; the checkpoint records the
                resolved value).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["policy", "scorer"])
        self.hparams.seed = resolve_seed(seed)
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the LoRA adapters
        self.policy = policy
        self.scorer = scorer
        self.loss_type = loss
        self.group_size = group_size
        self.num_steps = num_steps
        self.window_size = window_size
        if loss == "nft":
            stochastic_mode = "all" if nft_stochastic_rollout else "none"
        else:
            stochastic_mode = stochastic
        self.rollout_config = RolloutConfig(
            group_size=group_size,
            num_steps=num_steps,
            noise_level=noise_level,
            stochastic=stochastic_mode,
            window_size=window_size,
            forward_batch_size=forward_batch_size,
            store_dtype=store_dtype,
            kernels=kernels,
        )
        self.advantage_config = AdvantageConfig(
            aggregation=aggregation,
            std_mode=std_mode,
            fusion=fusion,
            lambda_cc=lambda_cc,
            a_max=adv_clip,
            broadcast=broadcast,
            min_group_std=min_group_std,
        )
        self.grpo_config = GRPOConfig(clip_eps=clip_eps, beta_kl=beta_kl)
        self.nft_config = NFTConfig(beta=nft_beta, a_max=adv_clip, beta_ref=nft_beta_ref)
        if updates_per_rollout < 1:
            raise ValueError(f"updates_per_rollout must be >= 1, got {updates_per_rollout}")
        if group_size < 2:
            raise ValueError(
                f"group_size must be >= 2, got {group_size}: advantages are measured against the mean of the "
                "chain's group, so with one trajectory per chain every advantage is 0 and nothing is learned"
            )
        if loss == "grpo" and noise_level <= 0:
            raise ValueError(
                f"GRPO needs stochastic (SDE) steps to train on: noise_level must be > 0, got {noise_level} "
                "(NFT, loss: nft, trains from deterministic rollouts)"
            )
        if eval_num_steps is not None and eval_num_steps < 1:
            raise ValueError(f"eval_num_steps must be >= 1 (or None for num_steps), got {eval_num_steps}")
        self.iteration = 0
        self.nonfinite_streak = 0
        self.last_rollout: RolloutPreview | None = None  # the first rows' images and scores, for logging
        self._executor: ThreadPoolExecutor | None = None
        self._eval: dict[str, ConditionScores] = {}

    # ================================================================== setup
    @property
    def extra_adapters(self) -> list[str]:
        extra = [OLD] if self.loss_type == "nft" else []
        return extra + ([EMA] if self.hparams.ema_decay is not None else [])

    @property
    def sampling_adapter(self) -> str:
        return sampling_adapter(self.loss_type)

    @property
    def eval_adapter(self) -> str:
        return EMA if self.hparams.ema_decay is not None else TRAINED

    def configure_model(self) -> None:
        if self.policy.is_loaded:
            return
        self.policy.load(extra_adapters=self.extra_adapters)
        if self.device_mesh is not None:
            from mtflow.training.distributed import shard_policy

            shard_policy(self.policy, self.device_mesh)
        self.policy.compile_if_requested()  # no-op unless policy.compile_transformer

    def configure_optimizers(self):
        params = self.policy.adapter_parameters(TRAINED)
        return torch.optim.AdamW(
            params,
            lr=self.hparams.lr,
            betas=tuple(self.hparams.adam_betas),
            weight_decay=self.hparams.weight_decay,
        )

    # ================================================================== the iteration
    def training_step(self, batch: ChainBatch | list[EditChain], batch_idx: int) -> None:
        started = time.perf_counter()
        chains = chains_of(batch)
        result = self.rollout_chains(chains)
        scores, prepared, judge_stats = self.score_and_prepare(result)
        advantages, adv_stats = self.compute_advantages(scores, result)
        update_stats = self.update(result, advantages, prepared)
        self.after_update()
        if isinstance(batch, ChainBatch):
            batch.mark_consumed()
        self.iteration += 1
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
        }
        self.log_dict(
            _loggable(self._mean_over_ranks(stats)), on_step=True, on_epoch=False, batch_size=len(chains)
        )

    def rollout_chains(self, chains: list[EditChain]) -> Rollout:
        """G trajectories per chain with the sampling adapter; noise seeded per (iteration, chain)."""
        config = self.rollout_config
        recorded = None
        if config.stochastic == "window":  # one window position for the whole iteration, on every rank
            recorded = stochastic_steps(
                config.num_steps, "window", config.window_size, self._generator("window", host=True)
            )
        generators = [self._generator("rollout", chain.chain_id) for chain in chains]
        self.policy.eval()
        return rollout(
            self.policy,
            chains,
            config,
            generator=generators,
            adapter=self.sampling_adapter,
            recorded_steps=recorded,
        )

    def score_and_prepare(self, result: Rollout) -> tuple[ScoreBatch, Any, dict[str, float]]:
        """Ask the judge (in a background thread when ``overlap_scoring``) while the reward-independent tensors of
        the update are computed; then wait for the scores."""
        items = scoring_items(result)
        submitted = time.perf_counter()
        future: Future | None = None
        if self.hparams.overlap_scoring:
            future = self._pool().submit(_timed_score, self.scorer, items)
            prepared = self.prepare_update(result)
            waited = time.perf_counter()
            scores, judge_s = future.result()
            wait_s = time.perf_counter() - waited
        else:
            scores, judge_s = _timed_score(self.scorer, items)
            wait_s = judge_s
            prepared = self.prepare_update(result)
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
        """``updates_per_rollout`` optimiser steps over the recorded samples; skipped (on every rank) when no sample
        has a valid advantage, or when the loss or gradients are not finite."""
        started = time.perf_counter()
        if not self._any_rank(bool(advantages.valid.any())):
            log.warning("iteration %d: no trajectory has a usable advantage; update skipped", self.iteration)
            return {"perf/update_s": time.perf_counter() - started, "train/skipped_update": 1.0}
        self.policy.train()
        if self.loss_type == "grpo":
            stats = self._grpo_update(result, advantages, prepared)
        else:
            stats = self._nft_update(result, advantages, prepared)
        stats["perf/update_s"] = time.perf_counter() - started
        stats["train/skipped_update"] = 0.0
        return stats

    def after_update(self) -> None:
        """NFT: the old (sampling) adapter moves toward the trained one; the EMA adapter tracks it."""
        trained = self.policy.adapter_parameters(TRAINED)
        if self.loss_type == "nft":
            eta = old_adapter_decay(
                self.iteration, self.hparams.old_adapter_rate, self.hparams.old_adapter_max_decay
            )
            soft_update_(self.policy.adapter_parameters(OLD), trained, eta)
        if self.hparams.ema_decay is not None:
            ema_update_(self.policy.adapter_parameters(EMA), trained, self.hparams.ema_decay)

    # ================================================================== GRPO
    def prepare_update(self, result: Rollout) -> Any:
        """Reward-independent work done while the judge runs: NFT samples with old/reference velocities, or the
        reference means of GRPO's KL term."""
        with torch.no_grad():
            if self.loss_type == "nft":
                return self._nft_samples(result)
            if self.grpo_config.beta_kl > 0:
                return self._reference_means(result)
        return None

    def _reference_means(self, result: Rollout) -> dict[tuple[int, int, int], torch.Tensor]:
        means = {}
        with self.policy.use_adapter(None):
            for batch in transition_batches(result, self.rollout_config.forward_batch_size):
                _, mean, _, _ = recompute_transition(self.policy, result, batch)
                means[_batch_key(batch)] = mean
        return means

    def _update_chunks(self, keys: list[Any]) -> list[list[Any]]:
        """Shuffle (with the iteration's generator, identical on every rank) and split into optimiser steps."""
        order = torch.randperm(len(keys), generator=self._generator("update", host=True)).tolist()
        parts = min(self.hparams.updates_per_rollout, len(keys))
        return [[keys[i] for i in order[p::parts]] for p in range(parts)]

    def _grpo_update(
        self,
        result: Rollout,
        adv: AdvantageResult,
        ref_means: dict[tuple[int, int, int], torch.Tensor] | None,
    ) -> dict[str, float]:
        advantages = adv.advantages.reshape(result.num_trajectories, result.num_turns)
        weights = adv.valid.reshape(result.num_trajectories, result.num_turns).float()
        host_weights = weights.cpu()  # one device sync; the micro-batch shares below are host arithmetic
        batches = transition_batches(result, self.rollout_config.forward_batch_size)
        steps = sorted({(b.turn, b.step) for b in batches})
        collected: dict[str, list[torch.Tensor]] = {}
        for chunk in self._update_chunks(steps):
            chosen = set(chunk)
            micro = [b for b in batches if (b.turn, b.step) in chosen]
            micro_weights = [float(host_weights[b.trajectories, b.turn].sum()) for b in micro]
            total_weight = sum(micro_weights)
            losses = []
            for batch, batch_weight in zip(micro, micro_weights):
                log_prob, mean, std, _ = recompute_transition(self.policy, result, batch)
                weight = weights[batch.trajectories, batch.turn]
                ref_mean = ref_means[_batch_key(batch)] if ref_means else None
                loss, stats = grpo_loss(
                    log_prob,
                    result.log_probs[batch.trajectories, batch.turn, batch.step],
                    advantages[batch.trajectories, batch.turn],
                    self.grpo_config,
                    weight=weight,
                    mean=mean if ref_mean is not None else None,
                    ref_mean=ref_mean,
                    std=std if ref_mean is not None else None,
                    backend=self.hparams.kernels,
                )
                # Each micro-batch loss is a weighted mean; rescale so the step sees the chunk's weighted mean.
                share = batch_weight / total_weight if total_weight else 0.0
                self.manual_backward(loss * share)
                losses.append(loss.detach())
                _collect(collected, stats)
            self._optimizer_step(losses)
        return _mean_stats(collected)

    # ================================================================== NFT
    def _nft_samples(self, result: Rollout) -> NFTSamples:
        """D noised copies of every (trajectory, turn) clean output, at grid noise levels drawn per chain."""
        n_total, turns = result.num_trajectories, result.num_turns
        draws = min(self.hparams.nft_train_timesteps, self.num_steps)
        grid = self.policy.timestep_grid(self.num_steps)
        trajectory, turn, sigma, noise = [], [], [], []
        for b, chain in enumerate(result.chains):
            gen = self._generator("nft", chain.chain_id, host=True)
            for g in range(result.group_size):
                n = b * result.group_size + g
                for k in range(turns):
                    steps = torch.randperm(self.num_steps, generator=gen)[:draws]
                    trajectory += [n] * draws
                    turn += [k] * draws
                    sigma.append(grid.sigmas[steps.to(grid.sigmas.device)])
                    noise.append(torch.randn((draws, *result.final_latents.shape[2:]), generator=gen))
        trajectory_t = torch.tensor(trajectory, device=self.device)
        turn_t = torch.tensor(turn, device=self.device)
        sigma_t = torch.cat(sigma).float().to(self.device)
        x0 = result.final_latents[trajectory_t, turn_t]
        eps = torch.cat(noise).to(self.device)
        s = sigma_t.view(-1, 1, 1)
        x_t = (1 - s) * x0 + s * eps
        v_old = torch.empty_like(x_t)
        v_ref = torch.empty_like(x_t) if self.nft_config.beta_ref > 0 else None
        size = self.rollout_config.forward_batch_size
        for start in range(0, x_t.shape[0], size):
            sl = slice(start, start + size)
            args = (
                x_t[sl],
                sigma_t[sl],
                result.reference_latents[trajectory_t[sl], turn_t[sl]],
                result.text,
                result.text_index[trajectory_t[sl], turn_t[sl]],
            )
            with self.policy.use_adapter(OLD):
                v_old[sl] = self.policy.velocity(*args)
            if v_ref is not None:
                with self.policy.use_adapter(None):
                    v_ref[sl] = self.policy.velocity(*args)
        assert n_total * turns * draws == x_t.shape[0]
        return NFTSamples(trajectory_t, turn_t, sigma_t, x_t, x0, v_old, v_ref)

    def _nft_update(self, result: Rollout, adv: AdvantageResult, samples: NFTSamples) -> dict[str, float]:
        advantages = adv.advantages.reshape(result.num_trajectories, result.num_turns)
        weights = adv.valid.reshape(result.num_trajectories, result.num_turns).float()
        size = self.rollout_config.forward_batch_size
        draws = samples.x_t.shape[0] // (result.num_trajectories * result.num_turns)
        draw_of = (
            torch.arange(samples.x_t.shape[0]) % draws
        )  # layout (n, k, d); host index arithmetic, no syncs
        sample_weights = weights[
            samples.trajectory, samples.turn
        ].cpu()  # one sync; shares are host arithmetic
        collected: dict[str, list[torch.Tensor]] = {}
        # Optimiser steps are split by draw index (as GRPO splits by timestep), so a step's samples do not depend
        # on how chains are spread over ranks.
        for chunk in self._update_chunks(list(range(draws))):
            host_rows = torch.nonzero(torch.isin(draw_of, torch.tensor(chunk))).flatten()
            rows = host_rows.to(samples.x_t.device, non_blocking=True)
            total_weight = float(sample_weights[host_rows].sum())
            losses = []
            for start in range(0, rows.numel(), size):
                idx = rows[start : start + size]
                host_idx = host_rows[start : start + size]
                n, k = samples.trajectory[idx], samples.turn[idx]
                v_theta = self.policy.velocity(
                    samples.x_t[idx],
                    samples.sigma[idx],
                    result.reference_latents[n, k],
                    result.text,
                    result.text_index[n, k],
                )
                weight = weights[n, k]
                loss, stats = nft_loss(
                    v_theta,
                    samples.v_old[idx],
                    samples.x_t[idx],
                    samples.x0[idx],
                    samples.sigma[idx],
                    advantages[n, k],
                    self.nft_config,
                    v_ref=None if samples.v_ref is None else samples.v_ref[idx],
                    weight=weight,
                    backend=self.hparams.kernels,
                )
                share = float(sample_weights[host_idx].sum()) / total_weight if total_weight > 0 else 0.0
                self.manual_backward(loss * share)
                losses.append(loss.detach())
                _collect(collected, stats)
            self._optimizer_step(losses)
        stats = _mean_stats(collected)
        stats["nft/draws_per_turn"] = float(draws)
        return stats

    # ================================================================== optimiser plumbing
    def _optimizer_step(self, losses: list[torch.Tensor]) -> None:
        """Clip and step, unless some rank saw a non-finite loss or gradient: then skip on every rank."""
        optimizer = self.optimizers()
        params = self.policy.adapter_parameters(TRAINED)
        # Clipping runs on every rank whatever its losses (under FSDP the norm is a collective); a step with a
        # non-finite loss is skipped below anyway, so clipping its gradients changes nothing.
        max_norm = self.hparams.max_grad_norm if self.hparams.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        finite = torch.isfinite(torch.stack(losses)).all() & torch.isfinite(_local(grad_norm))
        if self._all_ranks(bool(finite)):  # one host sync per optimiser step
            optimizer.step()
            self.nonfinite_streak = 0
        else:
            self.nonfinite_streak += 1
            log.warning(
                "iteration %d: non-finite loss or gradient; optimiser step skipped (%d in a row, abort after %d)",
                self.iteration,
                self.nonfinite_streak,
                self.hparams.max_nonfinite_skips,
            )
            if self.nonfinite_streak >= self.hparams.max_nonfinite_skips:
                optimizer.zero_grad(set_to_none=True)
                raise FloatingPointError(
                    f"{self.nonfinite_streak} consecutive non-finite updates at iteration {self.iteration}; "
                    "training stopped (the last checkpoint is intact). Lower the learning rate or check the judge."
                )
        optimizer.zero_grad(set_to_none=True)

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

    def _generator(self, purpose: str, key: str = "", host: bool = False) -> torch.Generator:
        """A generator seeded by (seed, iteration, purpose, key): identical on every rank and after a resume. On the
        module's device, or on the CPU (``host``) for draws that produce CPU tensors (torch refuses a CUDA generator
        there)."""
        device = torch.device("cpu") if host else self.device
        return _seeded(f"{self.hparams.seed}/{self.iteration}/{purpose}/{key}", device)

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtflow-judge")
        return self._executor

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        limit = self.hparams.max_iterations
        if limit is not None and self.iteration >= limit:
            self.trainer.should_stop = True
            return -1  # ends the epoch; should_stop ends fit
        return None

    def on_fit_end(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    # ================================================================== validation
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
                self.scorer,
                chains,
                condition=name,
                adapter=None if name == "base" else self.eval_adapter,
                num_steps=self.hparams.eval_num_steps or self.num_steps,
                forward_batch_size=self.rollout_config.forward_batch_size,
                seed=self.hparams.seed,
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
        report = build_report(conditions, threshold=self.hparams.eval_threshold, num_bootstrap=0)
        self.log_dict(_loggable(report.conditions["model"].to_stats("val")), on_step=False, on_epoch=True)

    def test_step(self, batch: ChainBatch | list[EditChain], batch_idx: int) -> None:
        self._evaluate_batch(batch, self.hparams.eval_conditions or list(CONDITIONS))

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
            threshold=self.hparams.eval_threshold,
            num_bootstrap=self.hparams.eval_bootstrap,
            seed=self.hparams.seed,
            info={
                "pretrained": self.policy.pretrained,
                "adapter": self.eval_adapter,
                "iteration": self.iteration,
                "judge": type(self.scorer).__name__,
                "num_steps": self.hparams.eval_num_steps or self.num_steps,
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

    # ================================================================== checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Only adapters are worth saving: the base is reloaded from ``policy.pretrained``.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if "lora_" in k}
        checkpoint["mtflow"] = {
            "iteration": self.iteration,
            "nonfinite_streak": self.nonfinite_streak,
            "adapters": [TRAINED, *self.extra_adapters],
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
        needed = [TRAINED, *self.extra_adapters]
        lacking = [a for a in needed if a not in state.get("adapters", [])]
        if lacking:
            problems.append(
                f"adapters {state.get('adapters')} in the checkpoint, but this run ({self.loss_type}"
                f"{', EMA' if EMA in needed else ''}) also needs {lacking}"
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
def _seeded(key: str, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(zlib.crc32(key.encode()))


def _timed_score(scorer: Scorer, items: list[ScoringItem]) -> tuple[ScoreBatch, float]:
    started = time.perf_counter()
    scores = scorer.score(items)
    return scores, time.perf_counter() - started


def _slice_result(result: AdvantageResult, rows: slice) -> AdvantageResult:
    return AdvantageResult(**{name: getattr(result, name)[rows] for name in result.__dataclass_fields__})


def _batch_key(batch) -> tuple[int, int, int]:
    return (batch.turn, batch.step, batch.trajectories.start)


def _collect(collected: dict[str, list[torch.Tensor]], stats: dict[str, torch.Tensor]) -> None:
    """Keep the micro-batch stats as detached tensors (no host sync per micro-batch on GPUs)."""
    for key, value in stats.items():
        collected.setdefault(key, []).append(torch.as_tensor(value).detach().float().reshape(()))


def _mean_stats(collected: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Mean of each stat over micro-batches, ignoring NaN entries (one host transfer for all stats)."""
    if not collected:
        return {}
    keys = list(collected)
    values = torch.stack([torch.stack(collected[k]) for k in keys]).double().cpu()  # [num_keys, num_micro]
    finite = torch.isfinite(values)
    counts = finite.sum(dim=1)
    sums = torch.where(finite, values, torch.zeros_like(values)).sum(dim=1)
    return {k: (float(sums[i] / counts[i]) if counts[i] > 0 else float("nan")) for i, k in enumerate(keys)}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _loggable(stats: dict[str, float]) -> dict[str, float]:
    """Drop NaN stats (nothing to average this iteration) instead of logging invented values."""
    return {k: float(v) for k, v in stats.items() if v is not None and math.isfinite(float(v))}
