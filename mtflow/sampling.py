"""Samplers for rectified-flow editors: the timestep grid, the Euler (ODE) step and Flow-GRPO's SDE step.

Notation (docs/design.md sections 2-3): sigma in [0, 1], sigma = 1 is noise, x_sigma = (1 - sigma) x0 + sigma eps, the model
predicts v = eps - x0. A grid 1 = s_0 > s_1 > ... > s_T = 0; step i goes from s = s_i to s' = s_{i+1},
Delta = s - s' > 0.

SDE step with noise level a (Flow-GRPO):

    g      = a * sqrt(s / (1 - s))            (at s = 1 the denominator uses s' instead)
    mu     = x - Delta v - Delta g^2 / (2 s) (x + (1 - s) v)
    x'     = mu + g sqrt(Delta) z,   z ~ N(0, I)
    log p  = mean over non-batch dims of -(x' - mu)^2 / (2 g^2 Delta) - log(g sqrt(Delta)) - log sqrt(2 pi)

All arithmetic is float32 whatever the model's dtype. a = 0 is exactly the Euler step x + (s' - s) v, the update
diffusers' ``FlowMatchEulerDiscreteScheduler.step`` makes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

StochasticMode = Literal["all", "window", "none"]


@dataclass(frozen=True)
class SDEConfig:
    """Which steps of a turn are sampled with the SDE (and recorded for training), and with how much noise. The
    algorithm decides this (GRPO: every step or a window; NFT: none by default); a rollout without an ``SDEConfig``
    is deterministic (Euler / ODE), as evaluation and inference are.

    Attributes:
        noise_level: a of the SDE step (Flow-GRPO's FLUX configs: 0.9); > 0.
        stochastic: "all" steps, or a "window" of ``window_size`` consecutive steps at a position drawn per iteration.
        window_size: W, for window mode.
        deterministic_last_step: the last step of every turn is an Euler (ODE) step, neither recorded nor trained
            (like a step outside the window), so each turn hands the next one a noise-free image, as users' chains
            do; "all" then means the first T - 1 steps, and a window is drawn among them.
    """

    noise_level: float = 0.9
    stochastic: Literal["all", "window"] = "all"
    window_size: int = 2
    deterministic_last_step: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_level) and self.noise_level > 0):
            raise ValueError(
                f"SDEConfig.noise_level must be finite and > 0, got {self.noise_level} (a rollout without an "
                "SDEConfig is the deterministic one)"
            )
        if self.stochastic not in ("all", "window"):
            raise ValueError(f"SDEConfig.stochastic={self.stochastic!r}; expected 'all' or 'window'")
        if int(self.window_size) < 1:
            raise ValueError(f"SDEConfig.window_size must be >= 1, got {self.window_size}")

    def stochastic_steps_of(self, num_steps: int) -> int:
        """How many of a turn's ``num_steps`` steps may be stochastic (all of them, or all but the last)."""
        return num_steps - 1 if self.deterministic_last_step else num_steps

    def recorded_steps(self, num_steps: int, generator: torch.Generator | None = None) -> list[int]:
        """Grid indices of the SDE (recorded, trained) steps of a turn of ``num_steps`` steps; a window position is
        drawn with ``generator`` (``stochastic_steps``)."""
        return stochastic_steps(
            self.stochastic_steps_of(num_steps), self.stochastic, self.window_size, generator
        )


@dataclass
class TimestepGrid:
    """The sampling grid of one resolution.

    Attributes:
        sigmas: [T + 1] float32, from 1 down to the terminal 0 (the scheduler's ``sigmas``).
        model_timesteps: [T] float32, the value the transformer receives at step i (``scheduler.timesteps / 1000``,
            exactly as FluxKontextPipeline passes it).
    """

    sigmas: torch.Tensor
    model_timesteps: torch.Tensor

    @property
    def num_steps(self) -> int:
        return int(self.model_timesteps.numel())


def calculate_shift(
    image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float
) -> float:
    """FLUX's resolution-dependent shift mu: linear in the number of image tokens."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def build_timestep_grid(
    scheduler, num_steps: int, image_seq_len: int, device: torch.device | str = "cpu"
) -> TimestepGrid:
    """The grid FluxKontextPipeline builds: ``linspace(1, 1/T, T)`` shifted by mu(image_seq_len) in the scheduler.

    Args:
        scheduler: a ``FlowMatchEulerDiscreteScheduler`` (not mutated: a copy is configured).
        num_steps: T.
        image_seq_len: number of packed *target* tokens (reference tokens do not count, as in the pipeline).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    scheduler = copy.deepcopy(scheduler)
    cfg = scheduler.config
    mu = calculate_shift(
        image_seq_len,
        cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5),
        cfg.get("max_shift", 1.15),
    )
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
    scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
    return TimestepGrid(
        sigmas=scheduler.sigmas.to(torch.float32),
        model_timesteps=(scheduler.timesteps.to(torch.float32) / 1000),
    )


def _per_sample(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or [N] tensor to [N, 1, ..., 1] float32 on ``like``'s device."""
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if t.ndim == 0:
        return t
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """Deterministic step x + (s' - s) v.

    Args:
        x, velocity: [N, ...]; sigma, sigma_next: scalars or [N].
    Returns:
        x_next: [N, ...] float32.
    """
    s = _per_sample(sigma, x)
    s_next = _per_sample(sigma_next, x)
    return x.float() + (s_next - s) * velocity.float()


def sde_mean_std(x: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next, noise_level: float):
    """Mean and standard deviation of the Flow-GRPO transition p(x' | x).

    Args:
        x, velocity: [N, ...]; sigma, sigma_next: scalars or [N] (sigma > sigma_next >= 0).
        noise_level: a >= 0.
    Returns:
        mean: [N, ...] float32; std: [N, 1, ..., 1] or 0-d float32 (= g sqrt(Delta)).
    """
    x = x.float()
    v = velocity.float()
    s = _per_sample(sigma, x)
    s_next = _per_sample(sigma_next, x)
    delta = s - s_next
    # g diverges at s = 1; Flow-GRPO evaluates the denominator at the next grid value there.
    denominator = 1.0 - torch.where(s >= 1.0, s_next, s)
    g = noise_level * torch.sqrt(s / denominator)
    mean = x - delta * v - delta * g.square() / (2.0 * s) * (x + (1.0 - s) * v)
    std = g * torch.sqrt(delta)
    return mean, std


def gaussian_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Isotropic Gaussian log-density, averaged over non-batch dims (float32).

    Args:
        x_next, mean: [N, ...]; std: broadcastable to them, > 0.
    Returns:
        [N] float32.
    """
    x_next = x_next.float()
    per_element = -((x_next - mean) ** 2) / (2.0 * std.square()) - torch.log(std) - LOG_SQRT_2PI
    return per_element.flatten(1).mean(dim=1)


@dataclass
class SDEStep:
    """Result of one stochastic step over N samples.

    Attributes:
        x_next: [N, ...] float32 (rounded through ``store_dtype`` when one was given).
        mean: [N, ...] float32, the Gaussian mean mu.
        std: std broadcastable to [N, ...] (0-d or [N, 1, ...]).
        log_prob: [N] float32 log p(x_next | x); zeros when the step is deterministic (noise level 0).
    """

    x_next: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor


def sde_step(
    x: torch.Tensor,
    velocity: torch.Tensor,
    sigma,
    sigma_next,
    noise_level: float,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    store_dtype: torch.dtype | None = None,
) -> SDEStep:
    """One Flow-GRPO SDE step with its exact log-probability.

    Args:
        x, velocity: [N, ...] (any dtype; math in float32).
        sigma, sigma_next: scalars or [N].
        noise_level: a; 0 gives the Euler step (and log_prob zeros: deterministic steps are never trained).
        noise: optional z [N, ...]; otherwise drawn with ``generator``.
        store_dtype: if given, x' is rounded to this dtype *before* its log-prob is computed, so that a rollout
            stored compactly (e.g. bf16) recomputes to exactly the recorded log-prob.
    """
    if noise_level == 0.0:
        x_next = euler_step(x, velocity, sigma, sigma_next)
        if store_dtype is not None:
            x_next = x_next.to(store_dtype).float()
        zeros = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        return SDEStep(x_next=x_next, mean=x_next, std=torch.zeros((), device=x.device), log_prob=zeros)
    mean, std = sde_mean_std(x, velocity, sigma, sigma_next, noise_level)
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
    x_next = mean + std * noise.float()
    if store_dtype is not None:
        x_next = x_next.to(store_dtype).float()
    return SDEStep(x_next=x_next, mean=mean, std=std, log_prob=gaussian_log_prob(x_next, mean, std))


def transition_log_prob(
    x: torch.Tensor, velocity: torch.Tensor, x_next: torch.Tensor, sigma, sigma_next, noise_level: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-prob of a recorded transition x -> x_next under a (new) velocity; differentiable in ``velocity``.

    Args:
        x, velocity, x_next: [N, ...]; sigma, sigma_next: scalars or [N]; noise_level > 0.
    Returns:
        log_prob [N] float32, mean [N, ...] float32, std (broadcastable).
    """
    if noise_level <= 0.0:
        raise ValueError("transition_log_prob needs a stochastic step (noise_level > 0)")
    mean, std = sde_mean_std(x, velocity, sigma, sigma_next, noise_level)
    return gaussian_log_prob(x_next, mean, std), mean, std


def stochastic_steps(
    num_steps: int,
    mode: StochasticMode,
    window_size: int = 2,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Indices of the steps that use the SDE (and are trained).

    Args:
        num_steps: T.
        mode: "all" (every step), "window" (W consecutive steps at a position drawn with ``generator``, the same for
            every trajectory of the iteration: MixGRPO / Flow-GRPO-Fast), or "none" (deterministic, for NFT).
        window_size: W, for "window".
    """
    if mode == "all":
        return list(range(num_steps))
    if mode == "none":
        return []
    if mode != "window":
        raise ValueError(f"unknown stochastic mode {mode!r}; expected 'all', 'window' or 'none'")
    if not 1 <= window_size <= num_steps:
        raise ValueError(f"window_size must be in [1, {num_steps}], got {window_size}")
    start = int(torch.randint(0, num_steps - window_size + 1, (1,), generator=generator).item())
    return list(range(start, start + window_size))
