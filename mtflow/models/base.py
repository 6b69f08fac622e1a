"""What the rollout, the trainer, evaluation and FSDP2 need from an image-editing policy: the ``EditPolicy``
protocol (implemented by ``KontextPolicy``). Nothing outside ``mtflow/models`` knows a concrete backbone.

Shapes: N samples, L target tokens, L_ref reference tokens, C packed channels, U text rows (unique
instructions), H x W pixels. Latents crossing this interface are *packed* token sequences, float32 in the sampler.

Geometry: a policy edits a source at the size its own aspect rule picks (``edit_size``: the pipeline's resizing at
the policy's pixel area, e.g. Kontext's preferred resolutions); the reference and the output of every turn keep
that size. A token sequence does not say its grid's height and width (a portrait and a landscape bucket have as
many tokens), so the methods that need them take ``size`` (``ImageSize``: (width, height) in pixels, PIL's order);
None means the square of the policy's ``resolution``.

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

ImageSize = tuple[int, int]  # (width, height) in pixels, in PIL's order

TRAINED_ADAPTER = "default"  # the adapter the optimiser trains (peft's default name)
OLD_ADAPTER = "old"  # NFT's slowly following sampling policy
EMA_ADAPTER = "ema"  # an exponential moving average of the trained adapter, for evaluation and export


@dataclass
class TextEmbeddings:
    """Encoded instructions, one row per *unique* instruction (per unique (instruction, image) pair for a policy
    whose text encoder reads the image, see ``EditPolicy.text_reads_image``).

    Attributes:
        texts: the U instructions, in row order.
        prompt_embeds: [U, L_txt, D] sequence embeddings (model dtype).
        pooled_embeds: [U, D_pool] pooled embeddings (model dtype), for models that have them (Kontext).
        text_ids: [L_txt, P] position ids of the text tokens, for models that take them.
        prompt_mask: [U, L_txt] 1 for real tokens, 0 for padding, for models whose rows differ in length (valid
            tokens first).
        negative_embeds: [U, L_neg, D] the negative prompt's embeddings per row, for true classifier-free guidance.
        negative_mask: [U, L_neg] like ``prompt_mask``, for ``negative_embeds``.
    """

    texts: list[str]
    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    negative_embeds: torch.Tensor | None = None
    negative_mask: torch.Tensor | None = None

    def index_of(self, instructions: Sequence[str]) -> torch.Tensor:
        """[len(instructions)] long: the row of each instruction."""
        row = {t: i for i, t in enumerate(self.texts)}
        return torch.tensor(
            [row[t] for t in instructions], dtype=torch.long, device=self.prompt_embeds.device
        )

    @property
    def num_rows(self) -> int:
        return self.prompt_embeds.shape[0]

    @classmethod
    def concat(cls, parts: Sequence[TextEmbeddings]) -> TextEmbeddings:
        """The rows of ``parts`` one after another (row r of part p becomes row offset_p + r). Sequences of
        different lengths are zero-padded at the end, with their masks (a part without a mask gets ones), so a
        padded row selects exactly the values it had; ``text_ids`` and ``pooled_embeds`` must agree."""
        if len(parts) == 1:
            return parts[0]

        def padded(tensors: list[torch.Tensor]) -> torch.Tensor:
            length = max(t.shape[1] for t in tensors)
            return torch.cat(
                [
                    torch.nn.functional.pad(t, (0, 0) * (t.ndim - 2) + (0, length - t.shape[1]))
                    for t in tensors
                ]
            )

        def masks(embeds: list[torch.Tensor], given: list[torch.Tensor | None]) -> torch.Tensor:
            filled = [
                m if m is not None else e.new_ones(e.shape[:2], dtype=torch.long)
                for e, m in zip(embeds, given)
            ]
            return padded(filled)

        first = parts[0]
        prompt = [p.prompt_embeds for p in parts]
        has_negative = first.negative_embeds is not None
        if any((p.negative_embeds is not None) != has_negative for p in parts):
            raise ValueError("TextEmbeddings.concat: some parts have negative embeddings and some do not")
        negative = [p.negative_embeds for p in parts] if has_negative else None
        return cls(
            texts=[t for p in parts for t in p.texts],
            prompt_embeds=padded(prompt),
            pooled_embeds=None
            if first.pooled_embeds is None
            else torch.cat([p.pooled_embeds for p in parts]),
            text_ids=first.text_ids,
            prompt_mask=masks(prompt, [p.prompt_mask for p in parts]),
            negative_embeds=None if negative is None else padded(negative),
            negative_mask=None if negative is None else masks(negative, [p.negative_mask for p in parts]),
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

    def lora_file_tensors(self, tensors: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
        """One adapter as the LoRA file this editor's stock diffusers pipeline loads with ``load_lora_weights``
        (and ComfyUI reads): ``tensors`` maps module paths as ``adapter_named_parameters`` names them
        (``<module>.lora_A.weight``, ``<module>.lora_B.weight``) to float32 tensors; the scale alpha / r must survive
        (``load_lora_file`` reads the same format back)."""
        ...

    # ------------------------------------------------------------------ geometry and sampling
    # Whether ``encode_text`` must see the image each instruction is applied to (a vision-language text encoder,
    # e.g. Qwen-Image-Edit's Qwen2.5-VL). The rollout then encodes each turn's instructions with that turn's
    # reference images, one row per (instruction, image); otherwise each distinct instruction once per rollout.
    text_reads_image: bool

    def edit_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) a source of ``size`` (width, height) is edited at: the policy's aspect rule at its pixel
        area (its bucket). A square source gives ``(resolution, resolution)``."""
        ...

    def encode_text(
        self, instructions: Sequence[str], images: Sequence[Image.Image] | None = None
    ) -> TextEmbeddings:
        """Encode each distinct instruction once (cached); rows follow first appearance. A policy whose text
        encoder reads the image (``text_reads_image``) needs ``images``, one per instruction (the image that
        instruction edits, as a user would hand it to the pipeline), and returns one row per instruction."""
        ...

    def images_to_pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Resize each image to its ``edit_size`` as the stock pipeline does; returns [N, 3, H, W] float32 in
        [-1, 1]. All images must share one edit size (a ValueError names the sizes otherwise)."""
        ...

    def uint8_to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] uint8 -> [N, 3, H, W] float32 in [-1, 1] (exactly what re-reading a saved PNG gives)."""
        ...

    def encode_reference(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> packed, normalised reference latents [N, L_ref, C] float32."""
        ...

    def decode(self, latents: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Packed latents [N, L, C] of images of ``size`` -> images [N, 3, H, W] uint8."""
        ...

    def initial_noise(
        self, num: int, generator: torch.Generator | None, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Standard normal starting point for images of ``size``, [num, L, C] float32."""
        ...

    def timestep_grid(self, num_steps: int, size: tuple[int, int] | None = None) -> TimestepGrid:
        """The sampling grid of this policy for images of ``size`` (the shift depends on the token count)."""
        ...

    def velocity(
        self,
        x: torch.Tensor,
        model_timestep: torch.Tensor,
        reference: torch.Tensor,
        text: TextEmbeddings,
        text_index: torch.Tensor,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Predicted velocity [N, L, C] float32 of the active adapter (with classifier-free guidance, for a model
        that samples with it: the guided velocity, which the SDE step and its log-prob use).

        Args:
            x: [N, L, C] noisy target latents of images of ``size``; model_timestep: [N] (the transformer's time
            input); reference: [N, L_ref, C]; text_index: [N] rows of ``text``.
        """
        ...

    def use_adapter(self, name: str | None):
        """A context manager (``AbstractContextManager[None]``; unannotated for jsonargparse's exact signature match,
        since a ``@contextmanager`` implementation is annotated ``Iterator[None]``) within which the given LoRA
        adapter is active (None: adapters disabled = frozen reference)."""
        ...
