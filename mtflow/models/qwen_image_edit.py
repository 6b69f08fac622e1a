"""Qwen-Image-Edit as an RL policy (diffusers ``QwenImageEditPlusPipeline``: Qwen-Image-Edit-2509 / 2511, or
``QwenImageEditPipeline``: the first Qwen-Image-Edit; the checkpoint's pipeline class decides).

What differs from Kontext, all of it behind the ``EditPolicy`` boundary:

- The text encoder is Qwen2.5-VL with the image in the prompt (``text_reads_image``): every turn's instruction is
  encoded together with that turn's input image, one text row per (instruction, image). Like the pipelines, the
  Plus pipeline shows the VL encoder the image at a 384 x 384 pixel area, the first pipeline at the edit size.
- True classifier-free guidance: ``velocity`` runs the transformer with the instruction and with the negative
  prompt (also encoded with the image) and returns the guided velocity, rescaled to the conditional one's norm
  per token, as the pipelines do. The SDE step and its log-prob use it, so GRPO's ratio is that of the sampled
  policy; the second pass doubles the transformer's cost per step.
- Aspect rule: the pipelines' area-based sizing (``calculate_dimensions``: the source's aspect ratio at a fixed
  pixel area, sides rounded to 32), at ``resolution`` x ``resolution`` (the pipelines: 1024 x 1024); the reference
  and the output of every turn keep that size.
- Latents are 2x2-packed 16-channel Wan-style VAE latents normalised by the VAE's per-channel mean and std.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from PIL import Image

from mtflow.models.base import ImageSize, TextEmbeddings
from mtflow.models.geometry import common_edit_size
from mtflow.models.pipeline_policy import PipelinePolicy, check_tokens
from mtflow.sampling import TimestepGrid, build_timestep_grid

ATTENTION_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)
FEED_FORWARD_LORA_TARGETS = ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")

# QwenImageEditPlusPipeline._get_qwen_prompt_embeds puts this before the instruction, one per image, numbered.
# One image per edit here, so it is always "Picture 1"; tests/test_qwen_image_edit_policy.py checks the text
# encoding against the pipeline's own encode_prompt.
PLUS_IMAGE_PROMPT = "Picture 1: <|vision_start|><|image_pad|><|vision_end|>"


class QwenImageEditPolicy(PipelinePolicy):
    """Qwen-Image-Edit editor with LoRA adapters (construction is cheap; ``load()`` reads the weights)."""

    pipeline_classes = ("QwenImageEditPlusPipeline", "QwenImageEditPipeline")
    attention_targets = ATTENTION_LORA_TARGETS
    feed_forward_targets = FEED_FORWARD_LORA_TARGETS
    # diffusers reads Qwen-Image LoRAs as diffusion_model.<module> + .alpha (a transformer. prefix with .alpha is
    # refused by diffusers 0.42's Qwen converter); ComfyUI maps diffusion_model.<module> for every model.
    lora_file_prefix = "diffusion_model."
    text_reads_image = True

    def __init__(
        self,
        pretrained: str = "Qwen/Qwen-Image-Edit-2509",
        revision: str | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16",
        resolution: int = 1024,
        true_cfg_scale: float = 4.0,
        negative_prompt: str | None = " ",
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
            pretrained: hub id or local folder of a QwenImageEditPlusPipeline (Qwen-Image-Edit-2509 / 2511) or
                QwenImageEditPipeline (Qwen-Image-Edit) checkpoint.
            revision: hub revision (branch, tag or commit) of ``pretrained``.
            dtype: dtype of the frozen base (transformer, VAE, text encoder); LoRA weights are always float32.
            resolution: side of the pixel area sources are edited at (the pipelines: 1024): a source keeps its
                aspect ratio at resolution x resolution pixels, sides rounded to 32.
            true_cfg_scale: classifier-free guidance scale (the pipelines' true_cfg_scale; 1 disables guidance).
            negative_prompt: the negative prompt of the guidance (Qwen's examples: " "); None disables guidance.
            lora_rank: LoRA rank r (0: no adapters, the bare model).
            lora_alpha: LoRA alpha (None: alpha = rank).
            lora_targets: module names to adapt (None: the attention projections of every block).
            lora_feed_forward: also adapt the image and text feed-forward layers.
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
        if true_cfg_scale <= 1.0 and negative_prompt is not None:
            raise ValueError(
                f"true_cfg_scale={true_cfg_scale} samples without guidance, so negative_prompt "
                f"{negative_prompt!r} would be ignored: set negative_prompt: null, or a scale > 1"
            )
        self.true_cfg_scale = true_cfg_scale
        self.negative_prompt = negative_prompt
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

    @property
    def guided(self) -> bool:
        """Whether sampling uses true classifier-free guidance (two transformer passes per velocity)."""
        return self.negative_prompt is not None and self.true_cfg_scale > 1.0

    @property
    def plus(self) -> bool:
        """Whether the checkpoint is a QwenImageEditPlusPipeline (2509 / 2511)."""
        return type(self._require_loaded()).__name__ == "QwenImageEditPlusPipeline"

    def _check_pipeline(self, pipe) -> None:
        multiple = pipe.vae_scale_factor * 2
        if 32 % multiple:
            raise ValueError(
                f"a VAE with {pipe.vae_scale_factor}x downsampling cannot hold Qwen's 32-pixel sizes"
            )

    # ------------------------------------------------------------------ geometry
    @staticmethod
    def _calculate_dimensions(area: int, ratio: float) -> ImageSize:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

        return calculate_dimensions(area, ratio)[:2]

    def edit_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The pipelines' ``calculate_dimensions`` at ``resolution`` x ``resolution`` pixels: the source's aspect
        ratio, sides rounded to 32 (the edit size of a square source is resolution x resolution rounded to 32)."""
        width, height = size
        if width <= 0 or height <= 0:
            raise ValueError(f"a {width}x{height} image has no aspect ratio")
        return self._calculate_dimensions(self.resolution * self.resolution, width / height)

    def _latent_grid(self, size: ImageSize | None) -> tuple[int, int]:
        pipe = self._require_loaded()
        width, height = self.edit_size(self._size(None)) if size is None else size
        factor = pipe.vae_scale_factor * 2
        return 2 * (height // factor), 2 * (width // factor)

    def _seq_len(self, size: ImageSize | None) -> int:
        h, w = self._latent_grid(size)
        return (h // 2) * (w // 2)

    def _full_size(self, size: ImageSize | None) -> ImageSize:
        return self.edit_size(self._size(None)) if size is None else (int(size[0]), int(size[1]))

    def timestep_grid(self, num_steps: int, size: tuple[int, int] | None = None) -> TimestepGrid:
        """The pipelines' grid: linspace(1, 1/T, T) shifted by mu(target tokens of ``size``)."""
        pipe = self._require_loaded()
        return build_timestep_grid(pipe.scheduler, num_steps, self._seq_len(size), device=self.device)

    # ------------------------------------------------------------------ text (with the image)
    def _vl_image(self, image: Image.Image) -> Image.Image:
        """The image the pipeline shows the VL encoder: at 384 x 384 pixels (Plus), or at the edit size (first
        Qwen-Image-Edit, whose VL image is its VAE image)."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE

        pipe = self._require_loaded()
        image = image.convert("RGB")
        width, height = image.size
        if self.plus:
            vl_width, vl_height = self._calculate_dimensions(CONDITION_IMAGE_SIZE, width / height)
        else:
            vl_width, vl_height = self._calculate_dimensions(
                self.resolution * self.resolution, width / height
            )
        return pipe.image_processor.resize(image, vl_height, vl_width)

    @torch.no_grad()
    def _encode_rows(
        self, texts: Sequence[str], images: Sequence[Image.Image]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One batched Qwen2.5-VL pass, as ``_get_qwen_prompt_embeds`` of the pipeline computes it per prompt:
        the last hidden states of the prompt after the system template, valid tokens first.

        Returns:
            embeds [R, L, D] (model dtype, zero-padded), mask [R, L] long.
        """
        pipe = self._require_loaded()
        prefix = PLUS_IMAGE_PROMPT if self.plus else ""
        prompts = [pipe.prompt_template_encode.format(prefix + text) for text in texts]
        inputs = pipe.processor(text=prompts, images=list(images), padding=True, return_tensors="pt").to(
            self.device
        )
        outputs = self.text_encoder(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            output_hidden_states=True,
        )
        self.text_encoder_calls += 1
        rows = pipe._extract_masked_hidden(outputs.hidden_states[-1], inputs["attention_mask"])
        rows = [row[pipe.prompt_template_encode_start_idx :] for row in rows]
        length = max(row.shape[0] for row in rows)
        embeds = torch.stack([torch.cat([r, r.new_zeros(length - r.shape[0], r.shape[1])]) for r in rows])
        mask = torch.stack([torch.arange(length, device=embeds.device) < row.shape[0] for row in rows]).long()
        return embeds.to(self.model_dtype), mask

    @torch.no_grad()
    def encode_text(
        self, instructions: Sequence[str], images: Sequence[Image.Image] | None = None
    ) -> TextEmbeddings:
        """One row per instruction, encoded with its image (and, for guidance, the negative prompt with the same
        image): two batched VL passes, instructions and negatives."""
        if images is None or len(images) != len(instructions):
            raise ValueError(
                "QwenImageEditPolicy's text encoder (Qwen2.5-VL) reads the image each instruction edits: pass one "
                f"image per instruction (got {0 if images is None else len(images)} for {len(instructions)})"
            )
        self._require_loaded()
        vl_images = [self._vl_image(image) for image in images]
        embeds, mask = self._encode_rows(instructions, vl_images)
        negative = negative_mask = None
        if self.guided:
            negative, negative_mask = self._encode_rows([self.negative_prompt] * len(vl_images), vl_images)
        return TextEmbeddings(
            texts=list(instructions),
            prompt_embeds=embeds,
            prompt_mask=mask,
            negative_embeds=negative,
            negative_mask=negative_mask,
        )

    # ------------------------------------------------------------------ images and latents
    def images_to_pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Resize each image to its edit size and normalise, as the pipelines prepare their VAE image:
        [N, 3, H, W] float32 in [-1, 1]. All images must share one edit size."""
        pipe = self._require_loaded()
        width, height = common_edit_size(self, images)
        resized = [pipe.image_processor.resize(image.convert("RGB"), height, width) for image in images]
        return pipe.image_processor.preprocess(resized, height, width).to(self.device, torch.float32)

    @staticmethod
    def uint8_to_pixels(images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] uint8 -> float32 in [-1, 1], bit-identical to preprocessing the saved PNG."""
        return 2.0 * (images.float() / 255.0) - 1.0

    @torch.no_grad()
    def encode_reference(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> [N, L_ref, C] float32: VAE mode, (z - mean) / std, 2x2 packed."""
        pipe = self._require_loaded()
        latents = pipe._encode_vae_image(pixels.to(self.device, self.vae.dtype).unsqueeze(2), generator=None)
        n, c, _, h, w = latents.shape
        return pipe._pack_latents(latents, n, c, h, w).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """[N, L, C] packed latents of images of ``size`` -> [N, 3, H, W] uint8, as the pipelines decode."""
        pipe = self._require_loaded()
        width, height = self._full_size(size)
        check_tokens(latents, self._seq_len(size), (width, height))
        z = pipe._unpack_latents(latents.to(self.vae.dtype), height, width, pipe.vae_scale_factor)
        config = self.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(z.device, z.dtype)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(
            z.device, z.dtype
        )
        image = self.vae.decode(z / inverse_std + mean, return_dict=False)[0][:, :, 0]
        image = pipe.image_processor.postprocess(image, output_type="pt")  # [0, 1]
        return (image.float() * 255).round().to(torch.uint8)

    def initial_noise(
        self, num: int, generator: torch.Generator | None, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """N(0, I) in the pipelines' latent shape [num, 1, C, h, w], then packed: [num, L, C_packed] float32."""
        pipe = self._require_loaded()
        h, w = self._latent_grid(size)
        channels = self.transformer.config.in_channels // 4
        noise = torch.randn((num, 1, channels, h, w), generator=generator, device=self.device)
        return pipe._pack_latents(noise, num, channels, h, w)

    # ------------------------------------------------------------------ the model
    @staticmethod
    def _rows(embeds: torch.Tensor, mask: torch.Tensor | None, index: torch.Tensor):
        """The rows of a micro-batch, cut to its longest row (so a row gives the same numbers whatever the table's
        padding), and no mask when nothing is padded (as the pipelines pass it)."""
        embeds = embeds[index]
        if mask is None:
            return embeds, None
        mask = mask[index]
        length = int(mask.sum(dim=1).max())
        embeds, mask = embeds[:, :length], mask[:, :length]
        return embeds, None if bool(mask.all()) else mask

    def velocity(
        self,
        x: torch.Tensor,
        model_timestep: torch.Tensor,
        reference: torch.Tensor,
        text: TextEmbeddings,
        text_index: torch.Tensor,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Guided velocity of the active adapter, [N, L, C] float32: neg + s (cond - neg), rescaled per token to
        the conditional velocity's norm (the pipelines' true CFG); the conditional one without guidance.

        Args:
            x: [N, L, C] latents of images of ``size``; model_timestep: [N] or scalar; reference: [N, L_ref, C]
            (the same size); text_index: [N] rows of ``text``.
        """
        n, length, _ = x.shape
        check_tokens(x, self._seq_len(size), self._full_size(size))
        h, w = self._latent_grid(size)
        dtype = self.model_dtype
        hidden = torch.cat([x.to(dtype), reference.to(dtype)], dim=1)
        timestep = torch.as_tensor(model_timestep, device=x.device, dtype=torch.float32).expand(n).to(dtype)
        shapes = [[(1, h // 2, w // 2), (1, h // 2, w // 2)]] * n

        def run(embeds: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            out = self.transformer(
                hidden_states=hidden,
                timestep=timestep,
                encoder_hidden_states=embeds,
                encoder_hidden_states_mask=mask,
                img_shapes=shapes,
                return_dict=False,
            )[0]
            return out[:, :length].float()

        cond = run(*self._rows(text.prompt_embeds, text.prompt_mask, text_index))
        if not self.guided:
            return cond
        if text.negative_embeds is None:
            raise ValueError(
                "these text rows have no negative embeddings, but the policy samples with guidance"
            )
        uncond = run(*self._rows(text.negative_embeds, text.negative_mask, text_index))
        guided = uncond + self.true_cfg_scale * (cond - uncond)
        cond_norm = torch.norm(cond, dim=-1, keepdim=True)
        guided_norm = torch.norm(guided, dim=-1, keepdim=True)
        return guided * (cond_norm / guided_norm)
