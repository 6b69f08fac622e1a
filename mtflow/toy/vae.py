"""A tiny diffusers ``AutoencoderKL`` for the toy world: build, train on random world images, measure, save.

The editor prior and the RL policy go through the real Kontext latent path (VAE encode, ``(z - shift) * scale``,
2x2 packing), so the toy world needs a VAE that reconstructs its flat-coloured images well. This one is trained
from scratch in minutes on a CPU: loss = mean |x - x_hat| + mean (x - x_hat)^2 on decoded samples of the
posterior, plus ``kl_weight`` times the mean per-element KL to N(0, I). The encoder's posterior is sampled during
training so the decoder tolerates imprecise latents (the editor never produces exact ones). Afterwards
``shift_factor`` and ``scaling_factor`` are set from the latent statistics of fresh world images (mean, 1 / std of
the posterior means), so that ``(z - shift) * scale`` has zero mean and unit variance, as FLUX's VAE is set up.

Round-trip quality is reported as mean absolute error per pixel channel (0-255 scale) and the share of pixels
whose palette colour survives encode -> decode (decoded pixel snapped with the judge's tolerance equals the
original label), over all pixels and over pixels away from colour edges.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mtflow.toy.world import ToyWorld


def build_toy_vae(
    block_out_channels: Sequence[int] = (32, 64),
    latent_channels: int = 4,
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
    mid_block_attention: bool = False,
    sample_size: int = 32,
    seed: int = 0,
):
    """A randomly initialised small ``AutoencoderKL`` (scale factor ``2 ** (len(block_out_channels) - 1)``).

    Args:
        block_out_channels: channels per resolution level; its length sets the downsampling.
        latent_channels: channels of the latent (the Flux transformer then takes 4x this after 2x2 packing).
        layers_per_block: resnet layers per encoder block (the decoder has one more).
        norm_num_groups: GroupNorm groups (must divide every channel count).
        mid_block_attention: add the self-attention layer of the mid block (FLUX's VAE has it; costly here).
        sample_size: nominal image size recorded in the config.
        seed: initialisation seed.
    """
    from diffusers import AutoencoderKL

    if any(c % norm_num_groups for c in block_out_channels):
        raise ValueError(
            f"norm_num_groups={norm_num_groups} must divide every block channel {block_out_channels}"
        )
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
        scaling_factor=1.0,
        shift_factor=0.0,
        force_upcast=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=mid_block_attention,
    )


def vae_scale_factor(vae) -> int:
    """Spatial downsampling of ``vae`` (as diffusers' Flux pipelines compute it)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def random_world_batch(
    worlds: Sequence[ToyWorld], rng: np.random.Generator, batch_size: int
) -> tuple[torch.Tensor, np.ndarray]:
    """Random scenes of randomly chosen ``worlds`` (same image size), rendered.

    Returns:
        images: [B, 3, H, W] float32 in [-1, 1].
        labels: [B, H, W] uint8 palette labels (indices into ``worlds[0].spec.palette``; every world must share it).
    """
    labels, rgb = [], []
    for _ in range(batch_size):
        world = worlds[int(rng.integers(len(worlds)))]
        lab = world.spec.render_labels(world.random_scene(rng))
        labels.append(lab)
        rgb.append(world.spec.palette[lab])
    images = torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return images, np.stack(labels)


@dataclass
class VAETrainStats:
    """What a training run did."""

    steps: int
    seconds: float
    images_seen: int
    first_loss: float
    final_loss: float
    final_kl: float
    shift_factor: float
    scaling_factor: float


def warmup_cosine(step: int, total: int, warmup: int, final_fraction: float = 0.0) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to ``final_fraction``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def train_toy_vae(
    vae,
    worlds: Sequence[ToyWorld],
    steps: int = 3000,
    batch_size: int = 32,
    lr: float = 2e-3,
    kl_weight: float = 1e-3,
    time_budget_s: float | None = None,
    seed: int = 0,
    log_every: int = 100,
    log=print,
) -> VAETrainStats:
    """Train ``vae`` in place (AdamW, 5% warm-up, cosine decay) on random world images; then set its latent
    shift / scaling factors. Stops at ``steps`` or after ``time_budget_s`` seconds, whichever comes first."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    vae.train()
    optimiser = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: warmup_cosine(step, steps, warmup))
    start = time.perf_counter()
    first_loss = final_loss = final_kl = math.nan
    step = 0
    for step in range(steps):
        images, _ = random_world_batch(worlds, rng, batch_size)
        posterior = vae.encode(images).latent_dist
        decoded = vae.decode(posterior.sample()).sample
        recon = (decoded - images).abs().mean() + (decoded - images).pow(2).mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = recon + kl_weight * kl
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimiser.step()
        scheduler.step()
        final_loss, final_kl = recon.item(), kl.item()
        if step == 0:
            first_loss = final_loss
        elapsed = time.perf_counter() - start
        if log is not None and (step % log_every == 0 or step == steps - 1):
            log(f"vae step {step:5d}  recon {final_loss:.4f}  kl {final_kl:.3f}  {elapsed:6.1f}s")
        if time_budget_s is not None and elapsed > time_budget_s:
            break
    vae.eval()
    shift, scale = set_latent_factors(vae, worlds, seed=seed + 1)
    return VAETrainStats(
        steps=step + 1,
        seconds=time.perf_counter() - start,
        images_seen=(step + 1) * batch_size,
        first_loss=first_loss,
        final_loss=final_loss,
        final_kl=final_kl,
        shift_factor=shift,
        scaling_factor=scale,
    )


@torch.no_grad()
def set_latent_factors(
    vae, worlds: Sequence[ToyWorld], num_images: int = 512, seed: int = 1
) -> tuple[float, float]:
    """Set ``vae.config.shift_factor`` / ``scaling_factor`` to the mean and 1 / std of the posterior means of
    ``num_images`` random world images. Returns (shift, scale)."""
    images, _ = random_world_batch(worlds, np.random.default_rng(seed), num_images)
    latents = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in images.split(128)])
    shift = float(latents.mean())
    scale = float(1.0 / latents.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return shift, scale


@dataclass
class RoundTripStats:
    """Encode -> decode quality on random world images.

    Attributes:
        mean_abs_error: mean |x - x_hat| per pixel channel, on the 0-255 scale.
        palette_survival: share of pixels whose snapped decoded colour is the original palette colour.
        palette_survival_interior: the same over pixels away from colour edges.
        off_palette: share of decoded pixels farther than the tolerance from every palette colour.
        images: number of images measured.
        seconds_per_image: encode + decode wall time per image.
    """

    mean_abs_error: float
    palette_survival: float
    palette_survival_interior: float
    off_palette: float
    images: int
    seconds_per_image: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def round_trip_metrics(
    images: torch.Tensor,
    decoded: torch.Tensor,
    labels: np.ndarray,
    palette: np.ndarray,
    colour_tolerance: float = 48.0,
    seconds: float = 0.0,
) -> RoundTripStats:
    """Compare world images with their reconstructions.

    Args:
        images: [B, 3, H, W] float in [-1, 1], the rendered originals.
        decoded: [B, 3, H, W] float, their reconstructions (clipped to [-1, 1]).
        labels: [B, H, W] palette labels of the originals.
        palette: [P, 3] uint8 palette of ``labels``.
        colour_tolerance: snapping tolerance, as in the judge.
        seconds: encode + decode wall time of the whole batch.
    """
    from mtflow.toy.judge import label_edges, snap_to_palette

    original = ((images.float() + 1) * 127.5).round()
    recon = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round()
    recon_u8 = recon.to(torch.uint8).permute(0, 2, 3, 1).numpy()
    snapped = snap_to_palette(recon_u8, palette, colour_tolerance)
    same = snapped == labels
    interior = ~label_edges(labels)
    return RoundTripStats(
        mean_abs_error=float((recon - original).abs().mean()),
        palette_survival=float(same.mean()),
        palette_survival_interior=float(same[interior].mean()),
        off_palette=float((snapped < 0).mean()),
        images=int(images.shape[0]),
        seconds_per_image=seconds / max(1, int(images.shape[0])),
    )


@torch.no_grad()
def measure_round_trip(
    vae, worlds: Sequence[ToyWorld], num_images: int = 512, colour_tolerance: float = 48.0, seed: int = 12345
) -> RoundTripStats:
    """Round-trip error of ``vae`` on ``num_images`` random images of ``worlds`` (latent = posterior mode)."""
    images, labels = random_world_batch(worlds, np.random.default_rng(seed), num_images)
    start = time.perf_counter()
    decoded = torch.cat([vae.decode(vae.encode(c).latent_dist.mode()).sample for c in images.split(128)])
    seconds = time.perf_counter() - start
    return round_trip_metrics(images, decoded, labels, worlds[0].spec.palette, colour_tolerance, seconds)


def save_toy_vae(vae, path: str | Path) -> Path:
    """``save_pretrained`` (safetensors) to ``path``; returns the folder."""
    path = Path(path)
    vae.save_pretrained(path, safe_serialization=True)
    return path


def load_toy_vae(path: str | Path):
    """Load a VAE saved by ``save_toy_vae`` (eval mode)."""
    from diffusers import AutoencoderKL

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no VAE at {path} (expected {path / 'config.json'})")
    return AutoencoderKL.from_pretrained(path).eval()
