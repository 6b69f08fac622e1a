"""The baseline: an RL loop written the way the public single-script anchors (Flow-GRPO, DiffusionNFT, Edit-R1) write
theirs, doing the same work as mtflow's loop and producing the same numbers.

What makes it "naive" (and nothing else differs):
- one trajectory at a time: every network call sees a batch of one sample;
- the instruction is encoded per trajectory and per turn, with no cache;
- the source image is VAE-encoded once per trajectory (not once per chain);
- in the update, log-probs (GRPO) or velocities (NFT) are recomputed one sample at a time, with one backward each.

Same numbers: the rollout draws its noise in exactly the order mtflow's per-chain generators produce it
(``draw_rollout_noise``), uses the same policy methods, sampler and losses, and returns an ``mtflow.rollout.Rollout``,
so ``tools/bench.py`` and ``tests/test_bench.py`` assert that images, latents and log-probs agree with mtflow's
batched rollout on the same seeds (up to float32 reduction-order differences between batch sizes).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mtflow.advantage import AdvantageConfig, compute_advantages
from mtflow.algorithms import GRPO, NFT
from mtflow.data.records import EditChain
from mtflow.eval.evaluate import scoring_items
from mtflow.losses import NFTConfig, grpo_loss, nft_loss, old_adapter_decay, soft_update_
from mtflow.models.base import OLD_ADAPTER, TRAINED_ADAPTER, TextEmbeddings
from mtflow.reward.base import Scorer
from mtflow.rollout import STORE_DTYPES, Rollout, RolloutConfig, pixels_to_uint8
from mtflow.sampling import SDEConfig, sde_step, stochastic_steps, transition_log_prob
from mtflow.training.optim import OptimConfig


@dataclass
class RolloutNoise:
    """All Gaussian draws of one rollout, in trajectory layout n = b * G + g. S' = stochastic steps per turn.

    Attributes:
        initial: [N, K, L, C] float32 starting noise of every turn.
        steps: [N, K, S', L, C] float32 SDE noise z of every stochastic step.
    """

    initial: torch.Tensor
    steps: torch.Tensor


def draw_rollout_noise(
    policy,
    num_chains: int,
    num_turns: int,
    config: RolloutConfig,
    recorded: Sequence[int],
    generator: torch.Generator | Sequence[torch.Generator] | None,
) -> RolloutNoise:
    """Draw the noise of a rollout in the order ``mtflow.rollout.rollout`` consumes its generator(s): per turn, the
    initial noise of the turn, then one draw per stochastic step; with one generator per chain, chain b's G rows
    of every draw come from generator b (so each generator's sequence does not depend on the other chains).
    Every ``recorded`` step is stochastic (an ``SDEConfig`` has a noise level > 0; a deterministic rollout records
    no step)."""
    group = config.group_size
    stochastic = list(recorded)
    if generator is None or isinstance(generator, torch.Generator):
        sources, rows = [generator], num_chains * group
    else:
        sources, rows = list(generator), group
        if len(sources) != num_chains:
            raise ValueError(f"{len(sources)} generators for {num_chains} chains")
    initial, steps = [], []
    for gen in sources:
        gen_initial, gen_steps = [], []
        for _ in range(num_turns):
            gen_initial.append(policy.initial_noise(rows, gen))
            x = gen_initial[-1]
            gen_steps.append(
                torch.stack([torch.randn(x.shape, generator=gen, device=x.device) for _ in stochastic], dim=1)
                if stochastic
                else x.new_zeros((rows, 0, *x.shape[1:]))
            )
        initial.append(torch.stack(gen_initial, dim=1))
        steps.append(torch.stack(gen_steps, dim=1))
    return RolloutNoise(initial=torch.cat(initial), steps=torch.cat(steps))


@torch.no_grad()
def naive_rollout(
    policy,
    chains: Sequence[EditChain],
    config: RolloutConfig,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    adapter: str | None = TRAINED_ADAPTER,
    recorded_steps: Sequence[int] | None = None,
    sde: SDEConfig | None = None,
) -> Rollout:
    """Anchor-style rollout: trajectory by trajectory, batch size 1 everywhere, text encoded per trajectory and
    turn, the source encoded per trajectory. Same arguments and same result as ``mtflow.rollout.rollout``
    (``config.forward_batch_size`` is ignored: every call has one sample; ``sde=None`` is deterministic)."""
    config.check_sde(sde)
    started = time.perf_counter()
    num_chains, group = len(chains), config.group_size
    num_turns = chains[0].num_turns
    n_total = num_chains * group
    store_dtype = STORE_DTYPES[config.store_dtype]
    grid = policy.timestep_grid(config.num_steps)
    sigmas = grid.sigmas.float()
    first = generator if generator is None or isinstance(generator, torch.Generator) else generator[0]
    if sde is None:
        recorded: list[int] = []
    elif recorded_steps is None:
        recorded = stochastic_steps(config.num_steps, sde.stochastic, sde.window_size, first)
    else:
        recorded = sorted(int(i) for i in recorded_steps)
    noise_level = sde.noise_level if sde is not None else 0.0
    noise = draw_rollout_noise(policy, num_chains, num_turns, config, recorded, generator)

    prompt_rows, pooled_rows, texts = [], [], []
    images, references, finals, states, next_states, log_probs = [], [], [], [], [], []
    sources = []
    forward_calls = 0
    with policy.use_adapter(adapter):
        for b, chain in enumerate(chains):
            for g in range(group):
                n = b * group + g
                source_pixels = policy.images_to_pixels([chain.source])
                if g == 0:
                    sources.append(source_pixels)
                reference = policy.encode_reference(source_pixels)  # per trajectory, as the anchors do
                t_images, t_refs, t_finals, t_states, t_next, t_logp = [], [], [], [], [], []
                for k in range(num_turns):
                    policy.clear_text_cache()  # no caching: encoded again for every trajectory and turn
                    text = policy.encode_text([chain.instructions[k]])
                    prompt_rows.append(text.prompt_embeds[0])
                    pooled_rows.append(text.pooled_embeds[0])
                    texts.append(chain.instructions[k])
                    row = torch.zeros(1, dtype=torch.long, device=text.prompt_embeds.device)
                    t_refs.append(reference[0])
                    x = noise.initial[n, k][None]
                    s_states, s_next, s_logp = [], [], []
                    j = 0
                    for i in range(config.num_steps):
                        is_recorded = i in recorded
                        if is_recorded:
                            x = x.to(store_dtype).float()
                        velocity = policy.velocity(x, grid.model_timesteps[i], reference, text, row)
                        forward_calls += 1
                        stochastic = is_recorded and noise_level > 0
                        step = sde_step(
                            x,
                            velocity,
                            sigmas[i],
                            sigmas[i + 1],
                            noise_level if stochastic else 0.0,
                            noise=noise.steps[n, k, j][None] if stochastic else None,
                            store_dtype=store_dtype if is_recorded else None,
                        )
                        if stochastic:
                            j += 1
                        if is_recorded:
                            s_states.append(x[0].to(store_dtype))
                            s_next.append(step.x_next[0].to(store_dtype))
                            s_logp.append(step.log_prob[0])
                        x = step.x_next
                    t_finals.append(x[0])
                    image = policy.decode(x)
                    t_images.append(image[0])
                    if s_states:
                        t_states.append(torch.stack(s_states))
                        t_next.append(torch.stack(s_next))
                        t_logp.append(torch.stack(s_logp))
                    if k + 1 < num_turns:
                        reference = policy.encode_reference(policy.uint8_to_pixels(image))
                images.append(torch.stack(t_images))
                references.append(torch.stack(t_refs))
                finals.append(torch.stack(t_finals))
                if t_states:
                    states.append(torch.stack(t_states))
                    next_states.append(torch.stack(t_next))
                    log_probs.append(torch.stack(t_logp))

    latent_shape = tuple(finals[0].shape[1:])
    if recorded:
        states_t, next_t, logp_t = torch.stack(states), torch.stack(next_states), torch.stack(log_probs)
    else:
        states_t = torch.empty((n_total, num_turns, 0, *latent_shape), dtype=store_dtype)
        next_t = states_t.clone()
        logp_t = torch.empty((n_total, num_turns, 0))
    text = TextEmbeddings(
        texts=texts,
        prompt_embeds=torch.stack(prompt_rows),
        pooled_embeds=torch.stack(pooled_rows),
        text_ids=torch.zeros(prompt_rows[0].shape[0], 3, dtype=prompt_rows[0].dtype),
    )
    elapsed = time.perf_counter() - started
    return Rollout(
        chains=list(chains),
        group_size=group,
        text=text,
        text_index=torch.arange(n_total * num_turns).view(n_total, num_turns),  # one row per (n, k)
        source_images=pixels_to_uint8(torch.cat(sources)),
        images=torch.stack(images),
        reference_latents=torch.stack(references),
        final_latents=torch.stack(finals),
        states=states_t,
        next_states=next_t,
        log_probs=logp_t,
        step_indices=torch.tensor(recorded, dtype=torch.long),
        sigmas=sigmas,
        model_timesteps=grid.model_timesteps.float(),
        noise_level=noise_level,
        backend="torch",  # the steps above are mtflow.sampling's torch ops
        stats={"perf/rollout_s": elapsed, "perf/rollout_forward_calls": float(forward_calls)},
    )


def naive_log_prob(policy, rollout: Rollout, n: int, k: int, s: int):
    """Recompute one recorded transition (batch of one) under the active adapter.

    Returns:
        log_prob [1] float32, mean [1, L, C] float32, std (broadcastable).
    """
    i = int(rollout.step_indices[s])
    x = rollout.states[n : n + 1, k, s].float()
    velocity = policy.velocity(
        x,
        rollout.model_timesteps[i],
        rollout.reference_latents[n : n + 1, k],
        rollout.text,
        rollout.text_index[n : n + 1, k],
    )
    return transition_log_prob(
        x,
        velocity,
        rollout.next_states[n : n + 1, k, s],
        rollout.sigmas[i],
        rollout.sigmas[i + 1],
        rollout.noise_level,
    )


def split_keys(keys: list, parts: int, generator: torch.Generator | None) -> list[list]:
    """Shuffle ``keys`` and deal them into ``min(parts, len(keys))`` optimiser steps (as ``FlowRLModule`` does)."""
    order = torch.randperm(len(keys), generator=generator).tolist()
    parts = min(parts, len(keys))
    return [[keys[i] for i in order[p::parts]] for p in range(parts)]


class NaiveLoop:
    """One anchor-style RL iteration: naive rollout -> judge -> advantages -> per-sample update.

    Args:
        policy: a loaded ``KontextPolicy`` (with an "old" adapter for NFT).
        scorer: the judge.
        algorithm: ``GRPO`` or ``NFT`` with its knobs: sampling adapter and SDE of the rollout, loss settings
            (GRPO clip / KL; NFT beta / beta_ref, noised copies per turn output ``train_timesteps``, old-adapter
            decay), exactly as ``FlowRLModule`` uses them.
        rollout_config: sampling settings (``forward_batch_size`` is ignored).
        advantage_config: advantage settings (its ``a_max`` is NFT's too, as in ``NFT.loss_config``).
        optim: AdamW settings, gradient clipping (``max_grad_norm``, 0 disables) and optimiser steps per iteration.
        seed: seed of the chunk shuffling and NFT draws.
    """

    def __init__(
        self,
        policy,
        scorer: Scorer,
        algorithm: GRPO | NFT,
        rollout_config: RolloutConfig,
        advantage_config: AdvantageConfig | None = None,
        optim: OptimConfig | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(algorithm, (GRPO, NFT)):
            raise TypeError(f"the naive loop implements GRPO and NFT, got {algorithm!r}")
        self.policy = policy
        self.scorer = scorer
        self.algorithm = algorithm
        self.rollout_config = rollout_config
        self.advantage_config = advantage_config or AdvantageConfig()
        self.optim = optim or OptimConfig()
        self.updates_per_rollout = self.optim.updates_per_rollout
        self.max_grad_norm = self.optim.max_grad_norm
        self.params = policy.adapter_parameters(TRAINED_ADAPTER)
        self.optimizer = torch.optim.AdamW(
            self.params, lr=self.optim.lr, betas=tuple(self.optim.betas), weight_decay=self.optim.weight_decay
        )
        self.generator = torch.Generator().manual_seed(seed)
        self.iteration = 0

    def run(self, chains: Sequence[EditChain], generator=None) -> dict[str, float]:
        """One iteration over ``chains``; returns perf stats."""
        algorithm = self.algorithm
        started = time.perf_counter()
        self.policy.eval()
        result = naive_rollout(
            self.policy,
            chains,
            self.rollout_config,
            generator,
            adapter=algorithm.sampling_adapter,
            sde=algorithm.sde(),
        )
        judged = time.perf_counter()
        scores = self.scorer.score(scoring_items(result))
        shape = (result.num_chains, result.group_size, result.num_turns)
        adv, _ = compute_advantages(
            scores.instruction_following.reshape(shape),
            scores.content_consistency.reshape(shape),
            scores.scored.reshape(shape),
            self.advantage_config,
        )
        advantages = adv.advantages.reshape(result.num_trajectories, result.num_turns)
        weights = adv.valid.reshape(result.num_trajectories, result.num_turns).float()
        updating = time.perf_counter()
        self.policy.train()
        if isinstance(algorithm, GRPO):
            self._grpo_update(result, advantages, weights)
        else:
            self._nft_update(result, advantages, weights)
            eta = old_adapter_decay(
                self.iteration, algorithm.old_adapter_rate, algorithm.old_adapter_max_decay
            )
            soft_update_(self.policy.adapter_parameters(OLD_ADAPTER), self.params, eta)
        self.policy.eval()
        self.iteration += 1
        done = time.perf_counter()
        return {
            "perf/rollout_s": judged - started,
            "perf/judge_s": updating - judged,
            "perf/update_s": done - updating,
            "perf/iteration_s": done - started,
        }

    def _step(self) -> None:
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _grpo_update(self, result: Rollout, advantages: torch.Tensor, weights: torch.Tensor) -> None:
        keys = [(k, s) for k in range(result.num_turns) for s in range(result.step_indices.numel())]
        for chunk in split_keys(keys, self.updates_per_rollout, self.generator):
            total = float(sum(weights[:, k].sum() for k, _ in chunk))
            for k, s in chunk:
                for n in range(result.num_trajectories):  # one sample at a time
                    log_prob, mean, std = naive_log_prob(self.policy, result, n, k, s)
                    ref_mean = None
                    if self.algorithm.beta_kl > 0:
                        with torch.no_grad(), self.policy.use_adapter(None):
                            _, ref_mean, _ = naive_log_prob(self.policy, result, n, k, s)
                    weight = weights[n : n + 1, k]
                    loss, _ = grpo_loss(
                        log_prob,
                        result.log_probs[n : n + 1, k, s],
                        advantages[n : n + 1, k],
                        self.algorithm.loss_config,
                        weight=weight,
                        mean=mean if ref_mean is not None else None,
                        ref_mean=ref_mean,
                        std=std if ref_mean is not None else None,
                    )
                    share = float(weight.sum()) / total if total > 0 else 0.0
                    (loss * share).backward()
            self._step()

    def _nft_update(self, result: Rollout, advantages: torch.Tensor, weights: torch.Tensor) -> None:
        policy = self.policy
        grid = policy.timestep_grid(self.rollout_config.num_steps)
        draws = min(self.algorithm.train_timesteps, self.rollout_config.num_steps)
        config = NFTConfig(
            beta=self.algorithm.beta, a_max=self.advantage_config.a_max, beta_ref=self.algorithm.beta_ref
        )
        samples = []  # (n, k, d, sigma, x_t, x0, v_old, v_ref), built one sample at a time
        for n in range(result.num_trajectories):
            for k in range(result.num_turns):
                steps = torch.randperm(self.rollout_config.num_steps, generator=self.generator)[:draws]
                for d in range(draws):
                    sigma = grid.sigmas[steps[d]].float().reshape(1)
                    x0 = result.final_latents[n : n + 1, k]
                    eps = torch.randn(x0.shape, generator=self.generator)
                    x_t = (1 - sigma) * x0 + sigma * eps
                    args = (x_t, sigma, result.reference_latents[n : n + 1, k], result.text)
                    row = result.text_index[n : n + 1, k]
                    with torch.no_grad():
                        with policy.use_adapter(OLD_ADAPTER):
                            v_old = policy.velocity(*args, row)
                        v_ref = None
                        if config.beta_ref > 0:
                            with policy.use_adapter(None):
                                v_ref = policy.velocity(*args, row)
                    samples.append((n, k, d, sigma, x_t, x0, v_old, v_ref))
        for chunk in split_keys(list(range(draws)), self.updates_per_rollout, self.generator):
            chosen = [smp for smp in samples if smp[2] in chunk]
            total = float(sum(weights[smp[0], smp[1]] for smp in chosen))
            for n, k, _, sigma, x_t, x0, v_old, v_ref in chosen:  # one sample at a time
                v_theta = policy.velocity(
                    x_t,
                    sigma,
                    result.reference_latents[n : n + 1, k],
                    result.text,
                    result.text_index[n : n + 1, k],
                )
                weight = weights[n : n + 1, k]
                loss, _ = nft_loss(
                    v_theta,
                    v_old,
                    x_t,
                    x0,
                    sigma,
                    advantages[n : n + 1, k],
                    config,
                    v_ref=v_ref,
                    weight=weight,
                )
                share = float(weight.sum()) / total if total > 0 else 0.0
                (loss * share).backward()
            self._step()
