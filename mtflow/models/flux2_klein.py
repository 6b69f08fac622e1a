"""FLUX.2 [klein] as an RL policy (diffusers ``Flux2KleinPipeline``: FLUX.2-klein-4B / 9B and their -base models).

What differs from Kontext, all of it behind the ``EditPolicy`` boundary:

- Text: a Qwen3 causal LM; the prompt embedding stacks the hidden states of several of its layers
  (``text_encoder_out_layers``). It reads the instruction only, so each distinct instruction is encoded once.
- Guidance: the -base checkpoints sample with classifier-free guidance against the empty prompt (``velocity``
  returns the guided velocity, two transformer passes); the step-distilled 4B / 9B sample without it.
- Reference image: its latents are appended after the target tokens with 4-D position ids whose time coordinate
  is 10 (the pipeline's ``_prepare_image_ids``); latents are 2x2-patchified 32-channel latents normalised by the
  VAE's batch-norm statistics, drawn as noise in that patchified shape.
- Timestep grid: the pipeline's empirical shift ``compute_empirical_mu(tokens, steps)``.
- Aspect rule: the pipeline's; a source larger than ``resolution`` x ``resolution`` pixels (the pipeline: 1024 x
  1024) is scaled down to that area keeping its aspect ratio, a smaller one keeps its size; then both sides are
  cropped (centred) to a multiple of 16. The output and every later turn keep that size.
- LoRA files use FLUX.2's original (BFL) module names under ``diffusion_model.``, the layout ComfyUI and diffusers'
  FLUX.2 loader both read (see ``lora_file_tensors``).
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image

from mtflow.models.base import ImageSize, TextEmbeddings
from mtflow.models.geometry import common_edit_size
from mtflow.models.pipeline_policy import PipelinePolicy, check_tokens
from mtflow.sampling import TimestepGrid

ATTENTION_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "to_qkv_mlp_proj",  # single-stream blocks: the fused q, k, v and MLP input projection
)
FEED_FORWARD_LORA_TARGETS = ("ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out")

# diffusers module (suffix after the block index) -> FLUX.2's original name, as diffusers'
# _convert_non_diffusers_flux2_lora_to_diffusers and single-file conversion map them (and ComfyUI stores them).
_DOUBLE_FUSED = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
}
_DOUBLE_PLAIN = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
_SINGLE_PLAIN = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
_FILE_PREFIX = "diffusion_model."


class Flux2KleinPolicy(PipelinePolicy):
    """FLUX.2-klein editor with LoRA adapters (construction is cheap; ``load()`` reads the weights)."""

    pipeline_classes = ("Flux2KleinPipeline",)
    attention_targets = ATTENTION_LORA_TARGETS
    feed_forward_targets = FEED_FORWARD_LORA_TARGETS
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    text_reads_image = False

    def __init__(
        self,
        pretrained: str = "black-forest-labs/FLUX.2-klein-base-9B",
        revision: str | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16",
        resolution: int = 1024,
        guidance_scale: float = 4.0,
        max_sequence_length: int = 512,
        text_encoder_out_layers: list[int] | None = None,
        text_cache_size: int = 64,
        lora_rank: int = 32,
        lora_alpha: float | None = None,
        lora_targets: list[str] | None = None,
        lora_feed_forward: bool = False,
        lora_dropout: float = 0.0,
        lora_init_seed: int = 0,
        attention_backend: str | None = None,
        gradient_checkpointing: bool = False,
        local_files_only: bool = False,
        lora_weights: str | None = None,
        compile_transformer: bool = False,
    ) -> None:
        """
        Args:
            pretrained: hub id or local folder of a Flux2KleinPipeline checkpoint (the -base models sample with
                guidance; FLUX.2-klein-4B / 9B are step-distilled and sample without it).
            revision: hub revision (branch, tag or commit) of ``pretrained``.
            dtype: dtype of the frozen base (transformer, VAE, text encoder); LoRA weights are always float32.
            resolution: side of the largest pixel area a source is edited at (the pipeline: 1024): larger sources
                are scaled down to resolution x resolution pixels keeping their aspect ratio, smaller ones keep
                their size; sides are cropped to a multiple of 16.
            guidance_scale: classifier-free guidance scale against the empty prompt (the pipeline's default 4.0;
                1 disables guidance; a step-distilled checkpoint takes only 1).
            max_sequence_length: Qwen3 tokens per instruction (padded to it, as the pipeline does).
            text_encoder_out_layers: Qwen3 hidden-state layers stacked as the prompt embedding (None: the
                pipeline's (9, 18, 27)).
            text_cache_size: encoded instructions kept across calls (LRU); 0 disables the cross-call cache.
            lora_rank: LoRA rank r (0: no adapters, the bare model).
            lora_alpha: LoRA alpha (None: alpha = rank).
            lora_targets: module names to adapt (None: the attention projections of the double-stream blocks and
                the fused input projection of the single-stream blocks).
            lora_feed_forward: also adapt the double-stream blocks' feed-forward layers.
            lora_dropout: dropout on the LoRA branch.
            lora_init_seed: seed of the LoRA initialisation (identical on every rank).
            attention_backend: diffusers attention dispatcher backend ("native", "flash", ...; None: default SDPA).
            gradient_checkpointing: recompute transformer activations in backward to save memory.
            local_files_only: never contact the hub.
            lora_weights: a LoRA file in this editor's format (``mtflow export`` writes it) to start the trained
                adapter from.
            compile_transformer: ``torch.compile`` the transformer forward (after FSDP sharding when training).
        """
        super().__init__()
        if guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1: no guidance), got {guidance_scale}")
        self.guidance_scale = guidance_scale
        self.max_sequence_length = max_sequence_length
        self.text_encoder_out_layers = list(text_encoder_out_layers or (9, 18, 27))
        self.text_cache_size = text_cache_size
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._configure(
            pretrained=pretrained,
            revision=revision,
            dtype=dtype,
            resolution=resolution,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_targets=lora_targets,
            lora_feed_forward=lora_feed_forward,
            lora_dropout=lora_dropout,
            lora_init_seed=lora_init_seed,
            attention_backend=attention_backend,
            gradient_checkpointing=gradient_checkpointing,
            local_files_only=local_files_only,
            lora_weights=lora_weights,
            compile_transformer=compile_transformer,
        )

    def _check_pipeline(self, pipe) -> None:
        if pipe.config.is_distilled and self.guidance_scale > 1.0:
            raise ValueError(
                f"{self.pretrained!r} is step-distilled and samples without guidance: set guidance_scale: 1.0 "
                f"(got {self.guidance_scale})"
            )
        layers = pipe.text_encoder.config.num_hidden_layers
        if not all(0 <= i <= layers for i in self.text_encoder_out_layers):
            raise ValueError(
                f"text_encoder_out_layers {self.text_encoder_out_layers}: the text encoder has {layers}"
            )

    @property
    def guided(self) -> bool:
        """Whether sampling uses classifier-free guidance (two transformer passes per velocity)."""
        return self.guidance_scale > 1.0

    # ------------------------------------------------------------------ geometry
    def edit_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The pipeline's sizing at ``resolution`` x ``resolution`` pixels: scale down to that area if larger
        (``Flux2ImageProcessor._resize_to_target_area``), then floor both sides to a multiple of 16."""
        pipe = self._require_loaded()
        width, height = size
        area = self.resolution * self.resolution
        if width * height > area:
            scale = math.sqrt(area / (width * height))  # as Flux2ImageProcessor._resize_to_target_area
            width, height = int(width * scale), int(height * scale)
        multiple = pipe.vae_scale_factor * 2
        width, height = width // multiple * multiple, height // multiple * multiple
        if width <= 0 or height <= 0:
            raise ValueError(f"a {size[0]}x{size[1]} source is smaller than FLUX.2's {multiple}-pixel grid")
        return width, height

    def _latent_grid(self, size: ImageSize | None) -> tuple[int, int]:
        """(h, w) of the patchified latent grid (one token per cell) of images of ``size``."""
        pipe = self._require_loaded()
        width, height = self._size(size)
        factor = pipe.vae_scale_factor * 2
        return height // factor, width // factor

    def _seq_len(self, size: ImageSize | None) -> int:
        h, w = self._latent_grid(size)
        return h * w

    def timestep_grid(self, num_steps: int, size: tuple[int, int] | None = None) -> TimestepGrid:
        """The pipeline's grid: linspace(1, 1/T, T) shifted by ``compute_empirical_mu(tokens of size, T)``."""
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        scheduler = copy.deepcopy(self._require_loaded().scheduler)
        mu = compute_empirical_mu(image_seq_len=self._seq_len(size), num_steps=num_steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            scheduler.set_timesteps(num_steps, device=self.device, mu=mu)
        else:
            sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
            scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        return TimestepGrid(
            sigmas=scheduler.sigmas.to(torch.float32),
            model_timesteps=scheduler.timesteps.to(torch.float32) / 1000,
        )

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def _encode(self, texts: list[str]) -> torch.Tensor:
        pipe = self._require_loaded()
        self.text_encoder_calls += 1
        return pipe._get_qwen3_prompt_embeds(
            text_encoder=self.text_encoder,
            tokenizer=pipe.tokenizer,
            prompt=texts,
            device=self.device,
            max_sequence_length=self.max_sequence_length,
            hidden_states_layers=self.text_encoder_out_layers,
        )

    @torch.no_grad()
    def encode_text(
        self, instructions: Sequence[str], images: Sequence[Image.Image] | None = None
    ) -> TextEmbeddings:
        """Encode each distinct instruction once (one batched Qwen3 call for all cache misses, the empty negative
        prompt included when guiding)."""
        if images is not None:
            raise ValueError(
                "Flux2KleinPolicy's text encoder (Qwen3) reads the instruction only; pass no images"
            )
        pipe = self._require_loaded()
        unique = list(dict.fromkeys(instructions))
        wanted = unique + ([""] if self.guided else [])
        missing = [t for t in dict.fromkeys(wanted) if t not in self._text_cache]
        fresh = dict(zip(missing, self._encode(missing))) if missing else {}
        rows = {t: fresh[t] if t in fresh else self._text_cache[t] for t in wanted}
        if self.text_cache_size > 0:
            for t in wanted:
                self._text_cache[t] = rows[t]
                self._text_cache.move_to_end(t)
            while len(self._text_cache) > self.text_cache_size:
                self._text_cache.popitem(last=False)
        prompt_embeds = torch.stack([rows[t] for t in unique])
        negative = rows[""].unsqueeze(0).expand(len(unique), -1, -1) if self.guided else None
        return TextEmbeddings(
            texts=unique,
            prompt_embeds=prompt_embeds,
            text_ids=pipe._prepare_text_ids(prompt_embeds[:1])[0].to(self.device),
            negative_embeds=negative,
        )

    def clear_text_cache(self) -> None:
        self._text_cache.clear()

    # ------------------------------------------------------------------ images and latents
    def images_to_pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Scale down and crop each image as the pipeline prepares its reference image: [N, 3, H, W] float32 in
        [-1, 1]. All images must share one edit size."""
        pipe = self._require_loaded()
        width, height = common_edit_size(self, images)
        area = self.resolution * self.resolution
        prepared = []
        for image in images:
            image = image.convert("RGB")
            if image.width * image.height > area:
                image = pipe.image_processor._resize_to_target_area(image, area)
            prepared.append(
                pipe.image_processor.preprocess(image, height=height, width=width, resize_mode="crop")
            )
        return torch.cat(prepared).to(self.device, torch.float32)

    @staticmethod
    def uint8_to_pixels(images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] uint8 -> float32 in [-1, 1], bit-identical to preprocessing the saved PNG."""
        return 2.0 * (images.float() / 255.0) - 1.0

    @torch.no_grad()
    def encode_reference(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> [N, L_ref, C] float32: VAE mode, 2x2 patchified, batch-norm normalised."""
        pipe = self._require_loaded()
        latents = pipe._encode_vae_image(pixels.to(self.device, self.vae.dtype), generator=None)
        return pipe._pack_latents(latents).float()

    def _ids(self, size: ImageSize | None, device: torch.device) -> torch.Tensor:
        """[L + L_ref, 4] position ids: target tokens (time 0), then the reference (time 10), as the pipeline."""
        pipe = self._require_loaded()
        h, w = self._latent_grid(size)
        grid = torch.empty(1, 1, h, w)
        target = pipe._prepare_latent_ids(grid)[0]
        reference = pipe._prepare_image_ids([grid])[0]
        return torch.cat([target, reference]).to(device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """[N, L, C] packed latents of images of ``size`` -> [N, 3, H, W] uint8, as the pipeline decodes."""
        pipe = self._require_loaded()
        check_tokens(latents, self._seq_len(size), self._size(size))
        h, w = self._latent_grid(size)
        z = latents.to(self.vae.dtype).transpose(1, 2).reshape(latents.shape[0], -1, h, w)  # tokens row-major
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(
            z.device, z.dtype
        )
        z = pipe._unpatchify_latents(z * std + mean)
        image = self.vae.decode(z, return_dict=False)[0]
        image = pipe.image_processor.postprocess(image, output_type="pt")  # [0, 1]
        return (image.float() * 255).round().to(torch.uint8)

    def initial_noise(
        self, num: int, generator: torch.Generator | None, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """N(0, I) in the pipeline's patchified latent shape [num, 4 C, h, w], packed: [num, L, 4 C] float32."""
        pipe = self._require_loaded()
        h, w = self._latent_grid(size)
        channels = self.transformer.config.in_channels
        noise = torch.randn((num, channels, h, w), generator=generator, device=self.device)
        return pipe._pack_latents(noise)

    # ------------------------------------------------------------------ the model
    def velocity(
        self,
        x: torch.Tensor,
        model_timestep: torch.Tensor,
        reference: torch.Tensor,
        text: TextEmbeddings,
        text_index: torch.Tensor,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Velocity of the active adapter, [N, L, C] float32 (guided: neg + s (cond - neg), as the pipeline).

        Args:
            x: [N, L, C] latents of images of ``size``; model_timestep: [N] or scalar; reference: [N, L_ref, C]
            (the same size); text_index: [N] rows of ``text``.
        """
        n, length, _ = x.shape
        check_tokens(x, self._seq_len(size), self._size(size))
        dtype = self.model_dtype
        hidden = torch.cat([x, reference], dim=1).to(dtype)
        timestep = torch.as_tensor(model_timestep, device=x.device, dtype=torch.float32).expand(n).to(dtype)
        image_ids = self._ids(size, x.device)

        def run(embeds: torch.Tensor) -> torch.Tensor:
            out = self.transformer(
                hidden_states=hidden,
                timestep=timestep,
                guidance=None,
                encoder_hidden_states=embeds,
                txt_ids=text.text_ids,
                img_ids=image_ids,
                return_dict=False,
            )[0]
            return out[:, :length].float()

        cond = run(text.prompt_embeds[text_index])
        if not self.guided:
            return cond
        uncond = run(text.negative_embeds[text_index])
        return uncond + self.guidance_scale * (cond - uncond)

    # ------------------------------------------------------------------ LoRA files (FLUX.2's original names)
    def lora_file_tensors(self, tensors: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
        """FLUX.2's original module names under ``diffusion_model.`` (ComfyUI's FLUX.2 layout, which diffusers'
        ``Flux2KleinPipeline.load_lora_weights`` converts): q, k and v LoRAs become one LoRA on the fused ``qkv``
        (A stacked, B block-diagonal: the same update, rank 3r); alpha / r is folded into B and no alpha is
        written (diffusers' FLUX.2 loader refuses ``.alpha`` keys; without alpha both apply scale 1)."""
        out: dict[str, torch.Tensor] = {}
        fused: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        modules = sorted({name.rsplit(".lora_", 1)[0] for name in tensors})
        for module in modules:
            a = tensors[f"{module}.lora_A.weight"].detach().to("cpu", torch.float32)
            b = tensors[f"{module}.lora_B.weight"].detach().to("cpu", torch.float32) * (alpha / a.shape[0])
            target, slot = _bfl_name(module)
            if slot is None:
                out[f"{_FILE_PREFIX}{target}.lora_A.weight"] = a.contiguous()
                out[f"{_FILE_PREFIX}{target}.lora_B.weight"] = b.contiguous()
            else:
                fused.setdefault(target, {})[slot] = (a, b)
        for target, parts in fused.items():
            rank, out_features = (
                next(iter(parts.values()))[0].shape[0],
                next(iter(parts.values()))[1].shape[0],
            )
            slots = sorted(parts)
            a = torch.cat([parts[s][0] for s in slots])
            b = torch.zeros(3 * out_features, rank * len(slots))
            for column, s in enumerate(slots):
                b[s * out_features : (s + 1) * out_features, column * rank : (column + 1) * rank] = parts[s][
                    1
                ]
            out[f"{_FILE_PREFIX}{target}.lora_A.weight"] = a.contiguous()
            out[f"{_FILE_PREFIX}{target}.lora_B.weight"] = b
        return out

    def lora_tensors_from_file(
        self, tensors: dict[str, torch.Tensor], source: str = ""
    ) -> dict[str, torch.Tensor]:
        """The inverse of ``lora_file_tensors`` (and of other FLUX.2-format files whose fused q, k, v share one A of
        this policy's rank): module path -> tensor at this policy's alpha."""
        inverse = {}
        for name, _ in self.adapter_named_parameters():
            module = name.rsplit(".lora_", 1)[0]
            inverse.setdefault(_bfl_name(module), module)
        out: dict[str, torch.Tensor] = {}
        rank = self.lora_rank
        for key in [k for k in tensors if k.startswith(_FILE_PREFIX) and k.endswith(".lora_A.weight")]:
            target = key[len(_FILE_PREFIX) : -len(".lora_A.weight")]
            a, b = tensors[key].float(), tensors[f"{_FILE_PREFIX}{target}.lora_B.weight"].float()
            alpha = tensors.get(f"{_FILE_PREFIX}{target}.alpha")
            b = b * ((float(alpha) / a.shape[0]) if alpha is not None else 1.0) / (self.lora_alpha / rank)
            if (target, None) in inverse:
                out[f"{inverse[(target, None)]}.lora_A.weight"] = a
                out[f"{inverse[(target, None)]}.lora_B.weight"] = b
                continue
            slots = [s for s in range(3) if (target, s) in inverse]
            if not slots:
                raise KeyError(
                    f"{source}: {key} does not match a LoRA module of this policy ({self.lora_targets})"
                )
            rows = b.shape[0] // 3
            for column, s in enumerate(slots):
                block_rows = b[s * rows : (s + 1) * rows]
                if a.shape[0] == rank:  # one A shared by q, k and v
                    a_s, b_s = a, block_rows
                elif a.shape[0] == rank * len(slots):  # mtflow's block-diagonal layout
                    a_s = a[column * rank : (column + 1) * rank]
                    b_s = block_rows[:, column * rank : (column + 1) * rank]
                    outside = block_rows.clone()
                    outside[:, column * rank : (column + 1) * rank] = 0
                    if bool(outside.any()):
                        raise ValueError(
                            f"{source}: {key} is not block-diagonal; cannot split it into rank {rank}"
                        )
                else:
                    raise ValueError(
                        f"{source}: {key} has rank {a.shape[0]}; this policy's LoRA rank is {rank}"
                    )
                out[f"{inverse[(target, s)]}.lora_A.weight"] = a_s
                out[f"{inverse[(target, s)]}.lora_B.weight"] = b_s
        if not out:
            raise KeyError(f"{source}: no LoRA tensor starts with {_FILE_PREFIX!r}")
        return out


def _bfl_name(module: str) -> tuple[str, int | None]:
    """A diffusers module path -> (FLUX.2 original name, slot in a fused q/k/v or None)."""
    head, _, rest = module.partition(".")
    index, _, suffix = rest.partition(".")
    if head == "transformer_blocks" and suffix in _DOUBLE_FUSED:
        name, slot = _DOUBLE_FUSED[suffix]
        return f"double_blocks.{index}.{name}", slot
    if head == "transformer_blocks" and suffix in _DOUBLE_PLAIN:
        return f"double_blocks.{index}.{_DOUBLE_PLAIN[suffix]}", None
    if head == "single_transformer_blocks" and suffix in _SINGLE_PLAIN:
        return f"single_blocks.{index}.{_SINGLE_PLAIN[suffix]}", None
    raise ValueError(
        f"LoRA on {module!r} has no FLUX.2 original name to export it under; adapt the attention and feed-forward "
        "layers of the blocks only"
    )
