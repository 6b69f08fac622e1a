"""The model passes one RL iteration cannot avoid, and their cost measured alone.

``model_passes`` counts, from the iteration's sizes (``IterationShape``, or ``IterationShape.of`` a module's
algorithm and configs), every call the loop has to make to a network (text encoders, VAE encoder and decoder,
transformer with or without gradient), the judge and the optimiser, with the batch size of each call, exactly as
``FlowRLModule`` batches them. ``tools/bench.py`` checks the counts against the calls a real
iteration makes (``timing.count_calls``), times each kind of call alone on the raw modules (``PassTimer``: the
diffusers transformer / VAE / text encoders called directly with prepared inputs, none of mtflow's code in between)
and divides the iteration's wall time by the sum: the framework overhead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from benchkit.timing import time_calls
from mtflow.algorithms import GRPO, NFT, Algorithm
from mtflow.models.base import OLD_ADAPTER, TRAINED_ADAPTER
from mtflow.rollout import RolloutConfig
from mtflow.training.optim import OptimConfig

PassName = Literal[
    "text_encode",
    "vae_encode",
    "rollout_forward",
    "vae_decode",
    "judge",
    "old_forward",
    "reference_forward",
    "train_forward_backward",
    "optimizer_step",
]


@dataclass(frozen=True)
class IterationShape:
    """Sizes of one RL iteration (on one rank).

    Attributes:
        num_chains: B chains.
        group_size: G trajectories per chain.
        num_turns: K turns per chain.
        num_steps: T sampler steps per turn.
        loss: "grpo" or "nft".
        trained_steps: GRPO: recorded (trained) steps per turn, T for full SDE, W in window mode; ignored for NFT.
        nft_draws: NFT: noised copies D of each turn's output (``min(NFT.train_timesteps, T)``).
        forward_batch_size: samples per network call.
        updates_per_rollout: optimiser steps per iteration (capped by the number of (turn, step) keys or draws).
        grpo_reference: GRPO with beta_KL > 0 (reference-policy means are computed).
        nft_reference: NFT with beta_ref > 0 (reference-policy velocities are computed).
        unique_instructions: distinct instructions in the batch (None: B * K, every instruction different).
    """

    num_chains: int
    group_size: int
    num_turns: int
    num_steps: int
    loss: Literal["grpo", "nft"] = "grpo"
    trained_steps: int | None = None
    nft_draws: int = 4
    forward_batch_size: int = 16
    updates_per_rollout: int = 2
    grpo_reference: bool = False
    nft_reference: bool = True
    unique_instructions: int | None = None

    @classmethod
    def of(
        cls,
        algorithm: Algorithm,
        rollout: RolloutConfig,
        num_chains: int,
        num_turns: int,
        optim: OptimConfig | None = None,
        unique_instructions: int | None = None,
    ) -> IterationShape:
        """The shape of one iteration of ``FlowRLModule(algorithm=algorithm, rollout=rollout, optim=optim)`` on
        ``num_chains`` chains of ``num_turns`` turns."""
        common = {
            "num_chains": num_chains,
            "group_size": rollout.group_size,
            "num_turns": num_turns,
            "num_steps": rollout.num_steps,
            "forward_batch_size": rollout.forward_batch_size,
            "updates_per_rollout": (optim or OptimConfig()).updates_per_rollout,
            "unique_instructions": unique_instructions,
        }
        if isinstance(algorithm, GRPO):
            window = algorithm.window_size if algorithm.stochastic == "window" else None
            return cls(loss="grpo", trained_steps=window, grpo_reference=algorithm.beta_kl > 0, **common)
        if isinstance(algorithm, NFT):
            return cls(
                loss="nft",
                nft_draws=min(algorithm.train_timesteps, rollout.num_steps),
                nft_reference=algorithm.beta_ref > 0,
                **common,
            )
        raise TypeError(f"no pass model for {algorithm!r}")

    @property
    def num_trajectories(self) -> int:
        return self.num_chains * self.group_size

    @property
    def recorded_steps(self) -> int:
        if self.loss == "nft":
            return 0
        return self.num_steps if self.trained_steps is None else self.trained_steps


@dataclass(frozen=True)
class PassCount:
    """``calls`` calls of kind ``name`` with ``batch_size`` samples each (0 for the optimiser step)."""

    name: PassName
    batch_size: int
    calls: int


def chunk_sizes(total: int, size: int) -> dict[int, int]:
    """Batch size -> number of batches when ``total`` samples go through in batches of at most ``size``."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    out: dict[int, int] = {}
    if total // size:
        out[size] = total // size
    if total % size:
        out[total % size] = out.get(total % size, 0) + 1
    return out


def _add(passes: dict[tuple[str, int], int], name: str, sizes: dict[int, int], times: int = 1) -> None:
    for size, calls in sizes.items():
        passes[(name, size)] = passes.get((name, size), 0) + calls * times


def model_passes(shape: IterationShape) -> list[PassCount]:
    """Every network call of one iteration, grouped by (kind, batch size), in loop order.

    Rollout (``mtflow.rollout.rollout``): one text-encoder call for the distinct instructions; the B sources are
    VAE-encoded in one call; per turn and step ceil(N / F) transformer calls; per turn ceil(N / F) decodes and,
    except after the last turn, ceil(N / F) encodes of the outputs. One judge call. GRPO trains every recorded
    transition once (K * S * ceil(N / F) forward+backward calls; with beta_KL > 0 as many reference forwards). NFT
    precomputes old (and reference) velocities of its M = N * K * D samples in ceil(M / F) calls each, then trains
    them split by draw index into ``updates_per_rollout`` parts, each batched by F.
    """
    n, k, f = shape.num_trajectories, shape.num_turns, shape.forward_batch_size
    passes: dict[tuple[str, int], int] = {}
    _add(passes, "text_encode", {shape.unique_instructions or shape.num_chains * k: 1})
    _add(passes, "vae_encode", {shape.num_chains: 1})
    _add(passes, "rollout_forward", chunk_sizes(n, f), times=k * shape.num_steps)
    _add(passes, "vae_decode", chunk_sizes(n, f), times=k)
    _add(passes, "vae_encode", chunk_sizes(n, f), times=k - 1)
    _add(passes, "judge", {n: 1})
    if shape.loss == "grpo":
        steps = shape.recorded_steps
        if not 0 < steps <= shape.num_steps:
            raise ValueError(f"GRPO needs 1..T trained steps per turn, got {steps}")
        if shape.grpo_reference:
            _add(passes, "reference_forward", chunk_sizes(n, f), times=k * steps)
        _add(passes, "train_forward_backward", chunk_sizes(n, f), times=k * steps)
        optimizer_steps = min(shape.updates_per_rollout, k * steps)
    else:
        draws = shape.nft_draws
        if draws < 1:
            raise ValueError(f"NFT needs at least one draw per turn, got {draws}")
        samples = n * k * draws
        _add(passes, "old_forward", chunk_sizes(samples, f))
        if shape.nft_reference:
            _add(passes, "reference_forward", chunk_sizes(samples, f))
        parts = min(shape.updates_per_rollout, draws)
        for part in range(parts):
            draws_in_part = len(range(part, draws, parts))
            _add(passes, "train_forward_backward", chunk_sizes(n * k * draws_in_part, f))
        optimizer_steps = parts
    _add(passes, "optimizer_step", {0: optimizer_steps})
    return [PassCount(name, size, calls) for (name, size), calls in passes.items()]  # type: ignore[arg-type]


class PassTimer:
    """Times one call of each kind of pass on the policy's raw modules, with inputs prepared outside the timing.

    Args:
        policy: a loaded ``KontextPolicy``.
        repeats: timed calls per measurement (the median is kept); one untimed warm-up call precedes them.
        text_length: instruction length in words of the text-encoder input.
    """

    def __init__(self, policy, repeats: int = 5, text_length: int = 6) -> None:
        self.policy = policy
        self.repeats = repeats
        self.text_length = text_length
        self.cache: dict[tuple[str, int, str | None], float] = {}

    def _transformer_inputs(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        policy = self.policy
        config = policy.transformer.config
        dtype = policy.model_dtype
        length = policy.image_seq_len
        channels = config.in_channels
        text_tokens = policy.max_sequence_length
        inputs = {
            "hidden_states": torch.randn((batch, 2 * length, channels), generator=generator).to(dtype),
            "timestep": torch.full((batch,), 0.5, dtype=dtype),
            "guidance": torch.full((batch,), policy.guidance_scale, dtype=torch.float32),
            "pooled_projections": torch.randn((batch, config.pooled_projection_dim), generator=generator).to(
                dtype
            ),
            "encoder_hidden_states": torch.randn(
                (batch, text_tokens, config.joint_attention_dim), generator=generator
            ).to(dtype),
            "txt_ids": torch.zeros((text_tokens, 3), dtype=dtype),
            "img_ids": policy._image_ids(torch.device("cpu")),
        }
        if not config.guidance_embeds:
            inputs["guidance"] = None
        return {k: (v.to(policy.device) if v is not None else v) for k, v in inputs.items()}

    def _measure(self, fn: Callable[[], object]) -> float:
        return time_calls(fn, self.repeats, warmup=1).median

    def seconds(self, name: PassName, batch_size: int, adapter: str | None = TRAINED_ADAPTER) -> float:
        """Median seconds of one call of ``name`` at ``batch_size`` (cached per (name, size, adapter))."""
        key = (name, batch_size, adapter)
        if key not in self.cache:
            self.cache[key] = self._time(name, batch_size, adapter)
        return self.cache[key]

    def _time(self, name: PassName, batch: int, adapter: str | None) -> float:
        policy = self.policy
        pipe = policy._require_loaded()
        gen = torch.Generator().manual_seed(batch)
        if name in ("rollout_forward", "old_forward", "reference_forward", "train_forward_backward"):
            inputs = self._transformer_inputs(batch, gen)
            length = policy.image_seq_len
            if name == "train_forward_backward":
                weight = torch.randn((batch, length, policy.transformer.config.in_channels), generator=gen)
                params = policy.adapter_parameters(adapter or TRAINED_ADAPTER)

                def train_call() -> None:
                    out = policy.transformer(**inputs, return_dict=False)[0]
                    (out[:, :length].float() * weight).mean().backward()

                policy.train()
                try:
                    with policy.use_adapter(adapter):
                        return self._measure(train_call)
                finally:
                    for p in params:
                        p.grad = None
                    policy.eval()

            def forward_call() -> None:
                with torch.no_grad():
                    policy.transformer(**inputs, return_dict=False)[0][:, :length].float()

            policy.eval()
            with policy.use_adapter(adapter):
                return self._measure(forward_call)
        if name == "vae_encode":
            pixels = (torch.rand((batch, 3, policy.resolution, policy.resolution), generator=gen) * 2 - 1).to(
                policy.device, policy.vae.dtype
            )

            def encode_call() -> None:
                with torch.no_grad():
                    policy.vae.encode(pixels).latent_dist.mode()

            return self._measure(encode_call)
        if name == "vae_decode":
            h, w = policy.latent_hw
            z = torch.randn((batch, policy.latent_channels, h, w), generator=gen).to(
                policy.device, policy.vae.dtype
            )

            def decode_call() -> None:
                with torch.no_grad():
                    policy.vae.decode(z, return_dict=False)

            return self._measure(decode_call)
        if name == "text_encode":
            words = ["make", "red", "add", "circle", "remove", "square", "blue", "left", "star", "tree"]
            prompts = [
                " ".join(words[(i + j) % len(words)] for j in range(self.text_length)) + f" {i}"
                for i in range(batch)
            ]

            def text_call() -> None:
                with torch.no_grad():
                    pipe.encode_prompt(
                        prompt=prompts,
                        prompt_2=None,
                        device=policy.device,
                        max_sequence_length=policy.max_sequence_length,
                    )

            return self._measure(text_call)
        if name == "optimizer_step":
            params = [p for p in policy.adapter_parameters(TRAINED_ADAPTER)]
            saved = [p.detach().clone() for p in params]
            optimizer = torch.optim.AdamW(params, lr=1e-12)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)

            def step_call() -> None:
                optimizer.step()

            try:
                return self._measure(step_call)
            finally:
                with torch.no_grad():
                    for p, s in zip(params, saved):
                        p.copy_(s)
                        p.grad = None
        raise ValueError(f"PassTimer cannot time {name!r} (the judge is timed by the caller)")


TRANSFORMER_KEYS = {
    "old_forward": f"transformer/no_grad/{OLD_ADAPTER}",
    "reference_forward": "transformer/no_grad/none",
    "train_forward_backward": f"transformer/grad/{TRAINED_ADAPTER}",
}


def pass_adapter(name: PassName, sampling_adapter: str) -> str | None:
    """The adapter a transformer pass of kind ``name`` runs with (None: the frozen base)."""
    return {"rollout_forward": sampling_adapter, "old_forward": OLD_ADAPTER, "reference_forward": None}.get(
        name, TRAINED_ADAPTER
    )


def expected_calls(passes: list[PassCount], sampling_adapter: str) -> dict[str, dict[int, int]]:
    """``passes`` in the form ``recorder.IterationRecorder`` logs real calls: transformer calls keyed by grad mode
    and active adapter (``transformer/no_grad/<adapter>``, ``none`` = adapters disabled), other calls by pass
    name, each mapping batch size -> calls."""
    keys = {**TRANSFORMER_KEYS, "rollout_forward": f"transformer/no_grad/{sampling_adapter}"}
    out: dict[str, dict[int, int]] = {}
    for p in passes:
        hist = out.setdefault(keys.get(p.name, p.name), {})
        hist[p.batch_size] = hist.get(p.batch_size, 0) + p.calls
    return {name: dict(sorted(hist.items())) for name, hist in out.items()}
