"""What a policy built on a stock diffusers pipeline shares: loading the pipeline (refusing other pipeline
classes), freezing it, LoRA adapters on its transformer, the attention backend, gradient checkpointing, FSDP2 units
and train / eval. ``QwenImageEditPolicy`` and ``Flux2KleinPolicy`` subclass it; each keeps its model's specifics
(text encoding, packing, position ids, guidance, its aspect rule) in its own module.

The pipeline object is kept (unregistered) for its own helpers (prompt encoding, VAE normalisation, packing), so
that a rollout at noise level 0 reproduces the pipeline; the modules it shares are registered on the policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mtflow.dtypes import DTYPES
from mtflow.models.base import TRAINED_ADAPTER, ImageSize
from mtflow.models.lora import LoRAAdapters


class PipelinePolicy(LoRAAdapters, nn.Module):
    """Base class; subclasses set the class attributes below and call ``_configure`` from their ``__init__``."""

    pipeline_classes: tuple[str, ...] = ()  # diffusers pipeline class names this policy accepts
    attention_targets: tuple[str, ...] = ()  # default LoRA targets
    feed_forward_targets: tuple[str, ...] = ()  # added by lora_feed_forward
    block_lists: tuple[str, ...] = ("transformer_blocks",)  # transformer attributes holding the FSDP2 blocks
    frozen_components: tuple[str, ...] = ("vae", "text_encoder")  # run without gradients, stay in eval mode

    def _configure(
        self,
        *,
        pretrained: str,
        revision: str | None,
        dtype: str,
        resolution: int,
        lora_rank: int,
        lora_alpha: float | None,
        lora_targets: list[str] | None,
        lora_feed_forward: bool,
        lora_dropout: float,
        lora_init_seed: int,
        attention_backend: str | None,
        gradient_checkpointing: bool,
        local_files_only: bool,
        lora_weights: str | None,
        compile_transformer: bool,
    ) -> None:
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        self.pretrained = pretrained
        self.revision = revision
        self.dtype_name = dtype
        self.resolution = resolution
        self.lora_rank = lora_rank
        self.lora_alpha = float(lora_rank if lora_alpha is None else lora_alpha)
        targets = list(lora_targets) if lora_targets else list(self.attention_targets)
        if lora_feed_forward:
            targets += [t for t in self.feed_forward_targets if t not in targets]
        self.lora_targets = targets
        self.lora_dropout = lora_dropout
        self.lora_init_seed = lora_init_seed
        self.attention_backend = attention_backend
        self.gradient_checkpointing = gradient_checkpointing
        self.local_files_only = local_files_only
        self.lora_weights = lora_weights
        self.compile_transformer = compile_transformer
        self._pipeline = None
        self.adapter_names: list[str] = []
        self.text_encoder_calls = 0  # batches sent through the text encoder (tests and benchmarks count them)

    # ------------------------------------------------------------------ loading
    @property
    def is_loaded(self) -> bool:
        return self._pipeline is not None

    def load(self, extra_adapters: Sequence[str] = (), device: torch.device | str | None = None):
        """Load the checkpoint, freeze it, add the trained LoRA adapter and ``extra_adapters`` (copies of it)."""
        if self.is_loaded:
            return self
        import diffusers

        try:
            pipe = diffusers.DiffusionPipeline.from_pretrained(
                self.pretrained,
                revision=self.revision,
                dtype=DTYPES[self.dtype_name],
                local_files_only=self.local_files_only,
            )
        except (OSError, ValueError) as err:  # missing folder, malformed id, no hub access, gated repo
            raise OSError(
                f"could not load a {' / '.join(self.pipeline_classes)} from {self.pretrained!r} "
                f"(revision={self.revision!r}, local_files_only={self.local_files_only}): {err}"
            ) from err
        if type(pipe).__name__ not in self.pipeline_classes:
            raise ValueError(
                f"{self.pretrained!r} holds a {type(pipe).__name__}; {type(self).__name__} needs a "
                f"{' or '.join(self.pipeline_classes)}"
            )
        pipe.set_progress_bar_config(disable=True)
        self._check_pipeline(pipe)
        for name in ("transformer", *self.frozen_components):
            module = getattr(pipe, name)
            module.requires_grad_(False)
            module.eval()
            setattr(self, name, module)
        object.__setattr__(self, "_pipeline", pipe)  # kept for its helpers; it shares the registered modules
        if self.attention_backend:
            self.transformer.set_attention_backend(self.attention_backend)
        if self.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        if self.lora_rank > 0:
            self._add_lora_adapters([TRAINED_ADAPTER, *extra_adapters])
        elif extra_adapters or self.lora_weights:
            raise ValueError("lora_rank=0 loads the bare model: it cannot hold adapters or LoRA weights")
        if device is not None:
            self.to(device)
        return self

    def _check_pipeline(self, pipe: Any) -> None:
        """Refuse settings the loaded pipeline cannot take (a subclass hook; raise ValueError)."""

    def _require_loaded(self) -> Any:
        if self._pipeline is None:
            raise RuntimeError(f"{type(self).__name__}.load() has not been called")
        return self._pipeline

    # ------------------------------------------------------------------ shared properties
    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def model_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    def _size(self, size: ImageSize | None) -> ImageSize:
        return (self.resolution, self.resolution) if size is None else (int(size[0]), int(size[1]))

    def fsdp_units(self) -> list[nn.Module]:
        """Every transformer block, then the transformer: what FSDP2 shards (the text encoder and the VAE run
        without gradients and stay replicated)."""
        blocks = [block for name in self.block_lists for block in getattr(self.transformer, name)]
        return [*blocks, self.transformer]

    def compile_if_requested(self) -> None:
        """Apply ``torch.compile`` to the transformer if ``compile_transformer`` is set (call after sharding)."""
        if self.compile_transformer:
            self.transformer.compile()

    def train(self, mode: bool = True):
        """Only the transformer follows train/eval: the frozen text encoder and VAE stay in eval mode (dropout
        would otherwise make their outputs random)."""
        super().train(mode)
        if self.is_loaded:
            for name in self.frozen_components:
                getattr(self, name).eval()
        return self

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def check_tokens(latents: torch.Tensor, expected: int, size: ImageSize) -> None:
    """Refuse latents whose token count is not that of an image of ``size`` (a wrong or missing size)."""
    if latents.shape[1] != expected:
        raise ValueError(
            f"{latents.shape[1]} latent tokens are not an image of {size[0]}x{size[1]} ({expected} tokens): pass "
            "the size the latents were made at"
        )
