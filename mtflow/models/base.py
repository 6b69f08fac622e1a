"""What the rollout, the trainer, evaluation and FSDP2 need from an image-editing policy: the ``EditPolicy``
protocol (implemented by ``KontextPolicy``). Nothing outside ``mtflow/models`` knows a concrete backbone.

Shapes: N samples, L target tokens, L_ref reference tokens, C packed channels, U unique instructions,
H x W pixels. Latents crossing this interface are *packed* token sequences, float32 in the sampler.

Adapters: one transformer holds every policy an algorithm needs as LoRA adapters with the names below; the frozen
base is "adapters disabled" (``use_adapter(None)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from PIL import Image
from torch import nn

from mtflow.sampling import TimestepGrid

TRAINED_ADAPTER = "default"  # the adapter the optimiser trains (peft's default name)
OLD_ADAPTER = "old"  # NFT's slowly following sampling policy
EMA_ADAPTER = "ema"  # an exponential moving average of the trained adapter, for evaluation and export


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


@runtime_checkable
class EditPolicy(Protocol):
    """A conditional rectified-flow editor with LoRA adapters. Model-specific details stay behind this.

    Construction must be cheap (no weights read): ``load`` reads them, inside Lightning's ``configure_model``.
    """

    pretrained: str  # what was loaded (hub id, folder or ``mtflow-assets:...``), recorded in checkpoints
    lora_rank: int
    lora_alpha: float
    lora_targets: list[str]

    # ------------------------------------------------------------------ loading, adapters, sharding
    @property
    def is_loaded(self) -> bool:
        """Whether ``load`` has run."""
        ...

    # (load / train / eval return the policy itself; no return annotation here, so that jsonargparse, which
    # matches implementations of a protocol by exact signature, accepts an implementation annotated with its class)
    def load(self, extra_adapters: Sequence[str] = (), device: torch.device | str | None = None):
        """Read the weights, freeze them, add the trained adapter and ``extra_adapters`` (copies of it)."""
        ...

    @property
    def device(self) -> torch.device: ...

    @property
    def model_dtype(self) -> torch.dtype:
        """dtype of the frozen base (LoRA weights are float32)."""
        ...

    def adapter_parameters(self, name: str = TRAINED_ADAPTER) -> list[nn.Parameter]:
        """One adapter's LoRA parameters, in the same order for every adapter."""
        ...

    def adapter_named_parameters(self, name: str = TRAINED_ADAPTER) -> list[tuple[str, nn.Parameter]]:
        """(module path without the adapter name, parameter) pairs, as exported LoRA files name them."""
        ...

    def load_lora_file(self, path: str | Path, adapter: str = TRAINED_ADAPTER) -> None:
        """Load an exported LoRA file into ``adapter``."""
        ...

    def fsdp_units(self) -> list[nn.Module]:
        """The modules FSDP2 shards, innermost first (e.g. every transformer block, then the transformer)."""
        ...

    def compile_if_requested(self) -> None:
        """``torch.compile`` what the policy's settings ask for (after sharding); a no-op otherwise."""
        ...

    def train(self, mode: bool = True): ...

    def eval(self): ...

    # ------------------------------------------------------------------ sampling

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

    def use_adapter(self, name: str | None):
        """A context manager (``AbstractContextManager[None]``; unannotated for jsonargparse's exact signature match,
        since a ``@contextmanager`` implementation is annotated ``Iterator[None]``) within which the given LoRA
        adapter is active (None: adapters disabled = frozen reference)."""
        ...
