"""What the rollout and the trainer need from an image-editing policy (implemented by ``KontextPolicy``).

Shapes: N samples, L target tokens, L_ref reference tokens, C packed channels, U unique instructions,
H x W pixels. Latents crossing this interface are *packed* token sequences, float32 in the sampler.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image

from mtflow.sampling import TimestepGrid


@dataclass
class TextEmbeddings:
    """Encoded instructions, one row per *unique* instruction.

    Attributes:
        texts: the U instructions, in row order.
        prompt_embeds: [U, L_txt, D] sequence embeddings (model dtype).
        pooled_embeds: [U, D_pool] pooled embeddings (model dtype).
        text_ids: [L_txt, 3] position ids of the text tokens.
    """

    texts: list[str]
    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor
    text_ids: torch.Tensor

    def index_of(self, instructions: Sequence[str]) -> torch.Tensor:
        """[len(instructions)] long: the row of each instruction."""
        row = {t: i for i, t in enumerate(self.texts)}
        return torch.tensor(
            [row[t] for t in instructions], dtype=torch.long, device=self.prompt_embeds.device
        )


class EditPolicy(Protocol):
    """A conditional rectified-flow editor with LoRA adapters. Model-specific details stay behind this."""

    def encode_text(self, instructions: Sequence[str]) -> TextEmbeddings:
        """Encode each distinct instruction once (cached); rows follow first appearance."""
        ...

    def images_to_pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Resize to the policy's resolution; returns [N, 3, H, W] float32 in [-1, 1]."""
        ...

    def uint8_to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] uint8 -> [N, 3, H, W] float32 in [-1, 1] (exactly what re-reading a saved PNG gives)."""
        ...

    def encode_reference(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> packed, normalised reference latents [N, L_ref, C] float32."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents [N, L, C] -> images [N, 3, H, W] uint8."""
        ...

    def initial_noise(self, num: int, generator: torch.Generator | None) -> torch.Tensor:
        """Standard normal starting point, [num, L, C] float32."""
        ...

    def timestep_grid(self, num_steps: int) -> TimestepGrid:
        """The sampling grid of this policy at its resolution."""
        ...

    def velocity(
        self,
        x: torch.Tensor,
        model_timestep: torch.Tensor,
        reference: torch.Tensor,
        text: TextEmbeddings,
        text_index: torch.Tensor,
    ) -> torch.Tensor:
        """Predicted velocity [N, L, C] float32 of the active adapter.

        Args:
            x: [N, L, C] noisy target latents; model_timestep: [N] (the transformer's time input);
            reference: [N, L_ref, C]; text_index: [N] rows of ``text``.
        """
        ...

    def use_adapter(self, name: str | None) -> AbstractContextManager[None]:
        """Within the context the given LoRA adapter is active (None: adapters disabled = frozen reference)."""
        ...
