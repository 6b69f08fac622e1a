"""``PixelFlowPolicy``: a second, deliberately simple ``EditPolicy`` backbone that shares no code with Kontext.

A rectified-flow editor in pixel space: an image of ``resolution`` x ``resolution`` is cut into ``patch`` x
``patch`` patches (space-to-depth, exactly invertible), so a "latent" is [L = (R / p)^2 tokens, C = 3 p^2] and
decoding is rearranging and rounding. The denoiser is a small MLP over each token concatenated with its reference
token, the pooled instruction embedding (a hashed bag of words) and the time. It exists to prove that the trainer,
rollout, evaluation and FSDP2 code see only the protocol (a test builds and trains a ``FlowRLModule`` around it
with ``mtflow.models.kontext`` blocked), and as a template for a new backbone.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mtflow.models.base import TRAINED_ADAPTER, TextEmbeddings
from mtflow.models.lora import LoRAAdapters
from mtflow.sampling import TimestepGrid

LORA_TARGETS = ["net.0", "net.2", "net.4"]


class _Denoiser(nn.Module):
    def __init__(self, channels: int, text_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * channels + text_dim + 1, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, channels),
        )

    def forward(self, x, reference, text, timestep):  # [N, L, C], [N, L, C], [N, D], [N]
        n, length, _ = x.shape
        cond = torch.cat([text, timestep[:, None]], dim=-1)[:, None].expand(n, length, -1)
        return self.net(torch.cat([x, reference, cond], dim=-1))


class PixelFlowPolicy(LoRAAdapters, nn.Module):
    """Pixel-space rectified-flow editor with LoRA on its MLP (randomly initialised from ``seed``)."""

    def __init__(
        self,
        resolution: int = 16,
        patch: int = 4,
        hidden: int = 64,
        text_dim: int = 16,
        vocab: int = 257,
        seed: int = 0,
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        lora_init_seed: int = 0,
    ) -> None:
        """
        Args:
            resolution: square side in pixels (a multiple of ``patch``).
            patch: side of the patches that make the tokens.
            hidden: width of the denoiser MLP.
            text_dim: width of the hashed bag-of-words instruction embedding.
            vocab: hash buckets of the instruction words.
            seed: initialisation seed of the denoiser and the word table.
            lora_rank: LoRA rank r on every linear layer of the denoiser.
            lora_alpha: LoRA alpha (None: alpha = rank).
            lora_init_seed: seed of the LoRA initialisation.
        """
        super().__init__()
        if resolution % patch:
            raise ValueError(f"resolution {resolution} must be a multiple of patch {patch}")
        self.pretrained = f"pixel-flow:{resolution}/{patch}/{hidden}/seed{seed}"
        self.resolution, self.patch, self.hidden = resolution, patch, hidden
        self.text_dim, self.vocab, self.seed = text_dim, vocab, seed
        self.lora_rank = lora_rank
        self.lora_alpha = float(lora_rank if lora_alpha is None else lora_alpha)
        self.lora_targets = list(LORA_TARGETS)
        self.lora_dropout = 0.0
        self.lora_init_seed = lora_init_seed
        self.lora_weights = None
        self.adapter_names: list[str] = []
        self._loaded = False

    # ------------------------------------------------------------------ loading, adapters, sharding
    @property
    def is_loaded(self) -> bool:
        return self._loaded

    def load(self, extra_adapters: Sequence[str] = (), device: torch.device | str | None = None):
        if self._loaded:
            return self
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.transformer = _Denoiser(3 * self.patch**2, self.text_dim, self.hidden)
            self.words = nn.Embedding(self.vocab, self.text_dim)
        for module in (self.transformer, self.words):
            module.requires_grad_(False)
        if self.lora_rank > 0:
            self._add_lora_adapters([TRAINED_ADAPTER, *extra_adapters])
        self._loaded = True
        if device is not None:
            self.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.words.weight.device

    @property
    def model_dtype(self) -> torch.dtype:
        return torch.float32

    def fsdp_units(self) -> list[nn.Module]:
        return [self.transformer]

    def compile_if_requested(self) -> None:
        return None

    # ------------------------------------------------------------------ geometry and sampling
    text_reads_image = False

    def edit_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """Every source is squashed to the square (no aspect buckets: the simplest possible backbone)."""
        return self.resolution, self.resolution

    def _check_size(self, size: tuple[int, int] | None) -> None:
        if size is not None and tuple(size) != (self.resolution, self.resolution):
            raise ValueError(
                f"PixelFlowPolicy edits {self.resolution}x{self.resolution} images only, not {size}"
            )

    def encode_text(
        self, instructions: Sequence[str], images: Sequence[Image.Image] | None = None
    ) -> TextEmbeddings:
        if images is not None:
            raise ValueError("PixelFlowPolicy's text embedding reads the instruction only; pass no images")
        unique = list(dict.fromkeys(instructions))
        rows = []
        for text in unique:
            ids = [zlib.crc32(w.encode()) % self.vocab for w in text.lower().split()] or [0]
            rows.append(self.words(torch.tensor(ids, device=self.device)).mean(0))
        pooled = torch.stack(rows)
        return TextEmbeddings(unique, pooled[:, None], pooled, torch.zeros(1, 3, device=self.device))

    def images_to_pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        side = self.resolution
        arrays = [
            np.asarray(image.convert("RGB").resize((side, side), Image.Resampling.BILINEAR))
            for image in images
        ]
        uint8 = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return self.uint8_to_pixels(uint8).to(self.device)

    @staticmethod
    def uint8_to_pixels(images: torch.Tensor) -> torch.Tensor:
        return 2.0 * (images.float() / 255.0) - 1.0

    def encode_reference(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, L, C]: space-to-depth by ``patch``."""
        return F.pixel_unshuffle(pixels.to(self.device).float(), self.patch).flatten(2).transpose(1, 2)

    def decode(self, latents: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        self._check_size(size)
        side = self.resolution // self.patch
        grid = latents.float().transpose(1, 2).reshape(latents.shape[0], -1, side, side)
        pixels = F.pixel_shuffle(grid, self.patch)
        return ((pixels.clamp(-1, 1) + 1.0) / 2.0 * 255.0).round().to(torch.uint8)

    def initial_noise(
        self, num: int, generator: torch.Generator | None, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        self._check_size(size)
        length, channels = (self.resolution // self.patch) ** 2, 3 * self.patch**2
        return torch.randn((num, length, channels), generator=generator, device=self.device)

    def timestep_grid(self, num_steps: int, size: tuple[int, int] | None = None) -> TimestepGrid:
        self._check_size(size)
        sigmas = torch.linspace(1.0, 0.0, num_steps + 1, device=self.device)
        return TimestepGrid(sigmas=sigmas, model_timesteps=sigmas[:-1].clone())

    def velocity(
        self,
        x: torch.Tensor,
        model_timestep: torch.Tensor,
        reference: torch.Tensor,
        text: TextEmbeddings,
        text_index: torch.Tensor,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        self._check_size(size)
        n = x.shape[0]
        timestep = torch.as_tensor(model_timestep, device=x.device, dtype=torch.float32).expand(n)
        return self.transformer(
            x.float(), reference.float(), text.pooled_embeds[text_index], timestep
        ).float()

    def save_adapter(self, path: str | Path, adapter: str = TRAINED_ADAPTER) -> None:
        """Write ``adapter`` as ``transformer.<module>.lora_A.weight`` tensors (``load_lora_file`` reads them)."""
        from safetensors.torch import save_file

        save_file(
            {f"transformer.{k}": v.detach().contiguous() for k, v in self.adapter_named_parameters(adapter)},
            str(path),
        )
