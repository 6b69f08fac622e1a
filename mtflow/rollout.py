"""Multi-turn rollouts: B chains x G trajectories x K turns, each turn editing its own trajectory's previous output.

Trajectories are laid out flat, ``n = b * G + g`` (chain b, member g); every tensor below uses that order. Each
turn's output is decoded to uint8 pixels and re-encoded as the next turn's reference, as at inference time
(docs/design.md section 2: exposure bias lives in that round trip). All N trajectories of a turn advance together,
``forward_batch_size`` samples per transformer call.

A batch is edited at one size (the policy's bucket of its sources, ``EditPolicy.edit_size``); every turn keeps it.
For a policy whose text encoder reads the image (``text_reads_image``), each turn's instructions are encoded with
that turn's input images, so ``text`` then holds one row per (instruction, image).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args, get_origin, get_type_hints

import torch
from PIL import Image

from mtflow import kernels
from mtflow.data.records import EditChain
from mtflow.models.base import TRAINED_ADAPTER, EditPolicy, ImageSize, TextEmbeddings
from mtflow.reward.base import ScoreBatch, ScoringItem
from mtflow.sampling import SDEConfig

STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class RolloutConfig:
    """How trajectories are sampled (which steps are stochastic is the algorithm's ``SDEConfig``).

    Attributes:
        group_size: G trajectories per chain.
        num_steps: T sampler steps per turn.
        forward_batch_size: samples per transformer forward in rollouts and updates (memory bound).
        store_dtype: dtype of recorded states ("bfloat16" halves rollout memory; log-probs stay exact).
        kernels: fused Triton kernels for the SDE step and the losses: "auto" (on CUDA), "torch" or "triton".
        chain_through: what turn k+1 is conditioned on: "pixels", turn k's decoded uint8 image re-encoded (what a
            user's next edit sees), or "latents", turn k's final latent as is (skips the VAE round trip: a
            diagnostic that separates the editor's own drift from what decoding and re-encoding do to it).
        unsharded: under FSDP2, gather the sharded base once for the whole training rollout and reshard it before
            the update (one all-gather per block instead of one per transformer call; same outputs): "on", "off",
            or "auto" (on a GPU when its free memory holds the unsharded base with a quarter of it to spare, as
            ``mtflow check``'s plan shows; off on CPU).
    """

    group_size: int = 16
    num_steps: int = 12
    forward_batch_size: int = 16
    store_dtype: Literal["float32", "bfloat16"] = "float32"
    kernels: Literal["auto", "torch", "triton"] = "auto"
    chain_through: Literal["pixels", "latents"] = "pixels"
    unsharded: Literal["auto", "on", "off"] = "auto"

    def __post_init__(self) -> None:
        # Checked here, when a config is built, not minutes later in the first rollout (or never, for some).
        for name in ("group_size", "num_steps", "forward_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"RolloutConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name, annotation in get_type_hints(type(self)).items():  # the Literal fields' own choices
            allowed = get_args(annotation) if get_origin(annotation) is Literal else None
            if allowed and getattr(self, name) not in allowed:
                raise ValueError(f"RolloutConfig.{name}={getattr(self, name)!r}; expected one of {allowed}")

    def check_sde(self, sde: SDEConfig | None) -> None:
        """Refuse an SDE window longer than the turn's stochastic steps, or a turn with none left to train."""
        if sde is None:
            return
        usable = sde.stochastic_steps_of(self.num_steps)
        if usable < 1:
            raise ValueError(
                f"with a deterministic last step a turn of num_steps={self.num_steps} has no SDE step to train on"
            )
        if sde.stochastic == "window" and sde.window_size > usable:
            raise ValueError(
                f"the SDE window ({sde.window_size} steps) exceeds a turn's num_steps ({self.num_steps})"
                + (" minus its deterministic last step" if sde.deterministic_last_step else "")
            )


@dataclass
class Rollout:
    """Everything the judge and the losses need from one rollout. N = B * G, S = recorded (stochastic) steps.

    Attributes:
        chains: the B chains (ids, instructions, metadata for the judge).
        group_size: G.
        text: the unique instructions' embeddings (one row per (instruction, image) for a policy whose text
            encoder reads the image); ``text_index`` points into it.
        text_index: [N, K] long, the text row of trajectory n at turn k.
        source_images: [B, 3, H, W] uint8, sources after resizing to the batch's edit size.
        images: [N, K, 3, H, W] uint8, the output of every turn.
        reference_latents: [N, K, L_ref, C] float32, the conditioning of every turn (turn 1: the source).
        final_latents: [N, K, L, C] float32, the clean latent each turn's sampler ended at.
        states: [N, K, S, L, C] (store dtype), x before each recorded step.
        next_states: [N, K, S, L, C] (store dtype), x' after each recorded step.
        log_probs: [N, K, S] float32, log p(x' | x) under the sampling policy.
        step_indices: [S] long, grid index i of each recorded step.
        sigmas: [T + 1] float32 grid; model_timesteps: [T] float32 transformer time input.
        noise_level: the a used.
        backend: the kernels backend of the sampling steps (recomputing with the same one gives ratio exactly 1).
        stats: timings and counts (``perf/rollout_s``, ...).
        image_size: (width, height) every image and latent of the rollout has (the sources' bucket; None: the
            policy's square resolution).
    """

    chains: list[EditChain]
    group_size: int
    text: TextEmbeddings
    text_index: torch.Tensor
    source_images: torch.Tensor
    images: torch.Tensor
    reference_latents: torch.Tensor
    final_latents: torch.Tensor
    states: torch.Tensor
    next_states: torch.Tensor
    log_probs: torch.Tensor
    step_indices: torch.Tensor
    sigmas: torch.Tensor
    model_timesteps: torch.Tensor
    noise_level: float
    backend: kernels.Backend = "auto"
    stats: dict[str, float] = field(default_factory=dict)
    image_size: ImageSize | None = None

    @property
    def num_chains(self) -> int:
        return len(self.chains)

    @property
    def num_trajectories(self) -> int:
        return self.images.shape[0]

    @property
    def num_turns(self) -> int:
        return self.images.shape[1]

    def chain_of(self, n: int) -> int:
        return n // self.group_size

    def item_id(self, n: int) -> str:
        """Trajectory n's id for the judge and the logs: ``"<chain_id>/g<member>"``."""
        return f"{self.chains[self.chain_of(n)].chain_id}/g{n % self.group_size}"


@dataclass
class RolloutPreview:
    """What logging keeps of a rollout after the update (the full ``Rollout`` is freed: at the paper setting it
    holds hundreds of MB of states). R = number of rows kept: the first trajectories, n = 0 .. R - 1.

    Attributes:
        num_trajectories: N of the rollout.
        source_images: [R, 3, H, W] uint8, the source of each row's chain.
        images: [R, K, 3, H, W] uint8, the row's outputs.
        item_ids: R ids ``"<chain_id>/g<member>"``, as the judge saw them.
        chain_ids: R chain ids.
        instructions: R lists of the K instructions.
        scores: the judge's [R, K] scores of the rows (None before scoring).
    """

    num_trajectories: int
    source_images: torch.Tensor
    images: torch.Tensor
    item_ids: list[str] = field(default_factory=list)
    chain_ids: list[str] = field(default_factory=list)
    instructions: list[list[str]] = field(default_factory=list)
    scores: ScoreBatch | None = None

    @classmethod
    def from_rollout(cls, result: Rollout, scores: ScoreBatch | None = None, rows: int = 8) -> RolloutPreview:
        """Keep the first ``rows`` trajectories of ``result`` and, when given, their rows of ``scores``."""
        rows = min(rows, result.num_trajectories)
        chains = [result.chain_of(n) for n in range(rows)]
        return cls(
            num_trajectories=result.num_trajectories,
            source_images=result.source_images[chains].cpu(),
            images=result.images[:rows].cpu(),
            item_ids=[result.item_id(n) for n in range(rows)],
            chain_ids=[result.chains[b].chain_id for b in chains],
            instructions=[list(result.chains[b].instructions) for b in chains],
            scores=None if scores is None else scores.first(rows),
        )

    def items(self) -> list[ScoringItem]:
        """The rows as judge items (PIL images), e.g. for ``save_chain_grid``."""
        return [
            ScoringItem(
                item_id=self.item_ids[r],
                chain_id=self.chain_ids[r],
                source=uint8_to_pil(self.source_images[r]),
                outputs=[uint8_to_pil(image) for image in self.images[r]],
                instructions=self.instructions[r],
            )
            for r in range(self.images.shape[0])
        ]


def uint8_to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] uint8 -> PIL RGB."""
    return Image.fromarray(image.permute(1, 2, 0).cpu().numpy(), mode="RGB")


def pixels_to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] float in [-1, 1] (from uint8 sources) -> uint8, exact inverse of ``uint8_to_pixels``."""
    return ((pixels.float() + 1.0) / 2.0 * 255.0).round().clamp(0, 255).to(torch.uint8)


def _batched(total: int, size: int):
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


class _NoiseSource:
    """Standard-normal draws for N = B * G trajectories: one shared generator, or one per chain (then chain b's G
    rows always come from generator b, so a chain's trajectories do not depend on its rank or batch-mates)."""

    def __init__(self, generator, num_chains: int, group: int):
        self.group = group
        if generator is None or isinstance(generator, torch.Generator):
            self.generators = [generator]
        else:
            self.generators = list(generator)
            if len(self.generators) != num_chains:
                raise ValueError(f"{len(self.generators)} generators for {num_chains} chains")

    @property
    def first(self) -> torch.Generator | None:
        return self.generators[0]

    def normal(self, num_total: int, shape: tuple[int, ...], device) -> torch.Tensor:
        if len(self.generators) == 1:
            return torch.randn((num_total, *shape), generator=self.first, device=device)
        return torch.cat(
            [torch.randn((self.group, *shape), generator=g, device=device) for g in self.generators]
        )

    def initial(self, policy: EditPolicy, num_total: int, size: ImageSize) -> torch.Tensor:
        if len(self.generators) == 1:
            return policy.initial_noise(num_total, self.first, size)
        return torch.cat([policy.initial_noise(self.group, g, size) for g in self.generators])


@torch.no_grad()
def rollout(
    policy: EditPolicy,
    chains: Sequence[EditChain],
    config: RolloutConfig,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    adapter: str | None = TRAINED_ADAPTER,
    recorded_steps: Sequence[int] | None = None,
    sde: SDEConfig | None = None,
) -> Rollout:
    """Sample G trajectories of K turns for each chain.

    Args:
        policy: the editor (its ``adapter`` is used for sampling: the trained one for GRPO, "old" for NFT).
        chains: B chains with the same number of turns K.
        config: sampling settings.
        generator: one generator for all randomness, or one per chain (see ``_NoiseSource``).
        adapter: adapter to sample with (None: the frozen base).
        recorded_steps: grid indices that use the SDE and are recorded (default: from ``sde.stochastic``, a
            window drawn from the first generator).
        sde: which steps are stochastic and with what noise level (None: deterministic, nothing recorded).
    """
    config.check_sde(sde)
    if not chains:
        raise ValueError("rollout needs at least one chain")
    turns = {c.num_turns for c in chains}
    if len(turns) != 1:
        raise ValueError(f"all chains of a batch must have the same number of turns, got {sorted(turns)}")
    num_turns = turns.pop()
    group = config.group_size
    num_chains = len(chains)
    n_total = num_chains * group
    store_dtype = STORE_DTYPES[config.store_dtype]
    noise = _NoiseSource(generator, num_chains, group)
    started = time.perf_counter()

    with policy.use_adapter(adapter):
        instructions = [c for chain in chains for c in chain.instructions]
        if policy.text_reads_image:
            # turn 1's instructions with each chain's source (shared by its G trajectories); later turns are
            # encoded once their input images exist
            turn_texts = [policy.encode_text([c.instructions[0] for c in chains], [c.source for c in chains])]
            turn_rows = [torch.arange(num_chains).repeat_interleave(group)]  # [N] rows of turn_texts[k]
        else:
            text = policy.encode_text(instructions)
            text_index = (
                text.index_of(instructions).view(num_chains, num_turns).repeat_interleave(group, dim=0)
            )  # [N, K]

        source_pixels = policy.images_to_pixels([chain.source for chain in chains])  # [B, 3, H, W]
        size = (source_pixels.shape[-1], source_pixels.shape[-2])  # the batch's bucket, kept by every turn
        # The source is encoded once per chain, not once per trajectory.
        reference = policy.encode_reference(source_pixels).repeat_interleave(group, dim=0)  # [N, L_ref, C]

        grid = policy.timestep_grid(config.num_steps, size)
        sigmas = grid.sigmas.float()
        if sde is None:
            recorded: list[int] = []
        elif recorded_steps is None:
            recorded = sde.recorded_steps(config.num_steps, noise.first)
        else:
            recorded = sorted(int(i) for i in recorded_steps)
        noise_level = sde.noise_level if sde is not None else 0.0

        images, references, finals, states, next_states, log_probs = [], [], [], [], [], []
        forward_calls = 0
        for k in range(num_turns):
            references.append(reference)
            if policy.text_reads_image:
                turn_text, turn_index = turn_texts[k], turn_rows[k].to(turn_texts[k].prompt_embeds.device)
            else:
                turn_text, turn_index = text, text_index[:, k]
            x = noise.initial(policy, n_total, size)
            turn_states, turn_next, turn_logp = [], [], []
            for i in range(config.num_steps):
                is_recorded = i in recorded
                if is_recorded:
                    # the model sees exactly the state that is stored, so recomputation is bit-exact
                    x = x.to(store_dtype).float()
                velocity = torch.empty_like(x)
                for sl in _batched(n_total, config.forward_batch_size):
                    velocity[sl] = policy.velocity(
                        x[sl], grid.model_timesteps[i], reference[sl], turn_text, turn_index[sl], size
                    )
                    forward_calls += 1
                stochastic = is_recorded and noise_level > 0
                step = kernels.sde_step(
                    x,
                    velocity,
                    sigmas[i],
                    sigmas[i + 1],
                    noise_level if stochastic else 0.0,
                    noise=noise.normal(n_total, tuple(x.shape[1:]), x.device) if stochastic else None,
                    store_dtype=store_dtype if is_recorded else None,
                    backend=config.kernels,
                )
                if is_recorded:
                    turn_states.append(x.to(store_dtype))
                    turn_next.append(step.x_next.to(store_dtype))
                    turn_logp.append(step.log_prob)
                x = step.x_next
            finals.append(x)
            turn_images = torch.cat(
                [policy.decode(x[sl], size) for sl in _batched(n_total, config.forward_batch_size)]
            )
            images.append(turn_images)
            if turn_states:
                states.append(torch.stack(turn_states, dim=1))
                next_states.append(torch.stack(turn_next, dim=1))
                log_probs.append(torch.stack(turn_logp, dim=1))
            if k + 1 < num_turns and policy.text_reads_image:  # the next instructions read these outputs
                turn_texts.append(
                    policy.encode_text(
                        [chains[n // group].instructions[k + 1] for n in range(n_total)],
                        [uint8_to_pil(image) for image in turn_images],
                    )
                )
                turn_rows.append(torch.arange(n_total))
            if k + 1 < num_turns and config.chain_through == "latents":
                reference = x.float().clone()  # [N, L, C]; same packing as the reference latents
            elif k + 1 < num_turns:
                # Chain through pixels: the next turn edits exactly the uint8 image a user would have saved.
                reference = torch.cat(
                    [
                        policy.encode_reference(policy.uint8_to_pixels(turn_images[sl]))
                        for sl in _batched(n_total, config.forward_batch_size)
                    ]
                )

    if policy.text_reads_image:  # every turn's rows in one table; text_index points into it
        offsets = torch.tensor([0] + [t.num_rows for t in turn_texts[:-1]]).cumsum(0)
        text = TextEmbeddings.concat(turn_texts)
        text_index = torch.stack([rows + offset for rows, offset in zip(turn_rows, offsets)], dim=1).to(
            text.prompt_embeds.device
        )
    latent_shape = tuple(finals[0].shape[1:])
    device = finals[0].device
    if recorded:
        states_t = torch.stack(states, dim=1)
        next_t = torch.stack(next_states, dim=1)
        logp_t = torch.stack(log_probs, dim=1)
    else:
        states_t = torch.empty((n_total, num_turns, 0, *latent_shape), dtype=store_dtype, device=device)
        next_t = states_t.clone()
        logp_t = torch.empty((n_total, num_turns, 0), device=device)
    elapsed = time.perf_counter() - started
    return Rollout(
        chains=list(chains),
        group_size=group,
        text=text,
        text_index=text_index,
        source_images=pixels_to_uint8(source_pixels),
        images=torch.stack(images, dim=1),
        reference_latents=torch.stack(references, dim=1),
        final_latents=torch.stack(finals, dim=1),
        states=states_t,
        next_states=next_t,
        log_probs=logp_t,
        step_indices=torch.tensor(recorded, dtype=torch.long),
        sigmas=sigmas,
        model_timesteps=grid.model_timesteps.float(),
        noise_level=noise_level,
        backend=config.kernels,
        image_size=size,
        stats={
            "perf/rollout_s": elapsed,
            "perf/rollout_forward_calls": float(forward_calls),
            "perf/trajectories_per_s": n_total / max(elapsed, 1e-9),
        },
    )


@dataclass(frozen=True)
class TransitionBatch:
    """A micro-batch of recorded transitions: trajectories ``trajectories`` at turn ``turn``, recorded step ``step``.

    Training iterates over exactly the batches the rollout used (same turn, same step, same trajectory slices), so
    that recomputed log-probs with unchanged weights equal the recorded ones bit for bit (ratio exactly 1).
    """

    trajectories: slice
    turn: int
    step: int


def transition_batches(rollout: Rollout, batch_size: int) -> list[TransitionBatch]:
    """All recorded transitions of ``rollout`` as micro-batches of at most ``batch_size`` trajectories, in
    (turn, step, slice) order."""
    num_steps = rollout.step_indices.numel()
    return [
        TransitionBatch(sl, k, s)
        for k in range(rollout.num_turns)
        for s in range(num_steps)
        for sl in _batched(rollout.num_trajectories, batch_size)
    ]


def recompute_transition(
    policy: EditPolicy, rollout: Rollout, batch: TransitionBatch, backend: kernels.Backend | None = None
):
    """Velocity and log-prob of a recorded transition under the policy's active adapter (differentiable), with the
    kernels backend the rollout sampled with unless ``backend`` says otherwise.

    Returns:
        log_prob [M] float32, mean [M, L, C] float32, std (broadcastable), velocity [M, L, C] float32.
    """
    sl, k, s = batch.trajectories, batch.turn, batch.step
    i = int(rollout.step_indices[s])
    x = rollout.states[sl, k, s].float()
    velocity = policy.velocity(
        x,
        rollout.model_timesteps[i],
        rollout.reference_latents[sl, k],
        rollout.text,
        rollout.text_index[sl, k],
        rollout.image_size,
    )
    log_prob, mean, std = kernels.transition_log_prob(
        x,
        velocity,
        rollout.next_states[sl, k, s],
        rollout.sigmas[i],
        rollout.sigmas[i + 1],
        rollout.noise_level,
        backend=backend or rollout.backend,
    )
    return log_prob, mean, std, velocity
