"""FLUX.1-Kontext as an RL policy: loading, LoRA adapters, cached text encoding, latents and velocity.

Everything Kontext-specific lives here (2x2 latent packing, position ids with the reference-image marker,
VAE shift/scale, the distilled guidance scalar, the resolution-dependent timestep shift, the aspect buckets); the
rollout and the trainer only see the ``EditPolicy`` interface (``mtflow/models/base.py``).

Aspect buckets: a source is edited at the Kontext preferred resolution whose aspect ratio is nearest to its own
(the rule of the pipeline's ``_auto_resize``), scaled from the 1024 x 1024 area those resolutions are made for to
``resolution`` x ``resolution``; reference and output of every turn keep that size. At ``resolution`` 1024 this is
exactly the reference size ``FluxKontextPipeline`` picks; a square source gives ``resolution`` x ``resolution``.

Where diffusers already implements a step of ``FluxKontextPipeline`` (prompt encoding, VAE encoding, packing,
ids, pre/post-processing), this module calls the pipeline's own method, so that a rollout at noise level 0
reproduces the pipeline's output; ``tests/test_kontext_policy.py`` proves it.

Three policies share one transformer (docs/design.md section 2): the trained LoRA adapter ``"default"``, optional extra
adapters (``"old"`` for NFT sampling, ``"ema"`` for evaluation/export) and the frozen base (adapters disabled) as the
KL reference. Switching adapters never changes which parameters are trainable (peft's own ``set_adapter`` would).
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from torch import nn

from mtflow.dtypes import DTYPES
from mtflow.models.base import TRAINED_ADAPTER, ImageSize, TextEmbeddings
from mtflow.models.geometry import common_edit_size
from mtflow.models.lora import LoRAAdapters
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
FEED_FORWARD_LORA_TARGETS = (
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
)


PACKAGE_ASSETS = "mtflow-assets:"


def resolve_pretrained(pretrained: str) -> str:
    """``mtflow-assets:<path>`` names a checkpoint shipped inside the package (e.g. ``mtflow-assets:toy/prior``,
    the toy world's editor prior); anything else is a hub id or a folder, passed through."""
    if pretrained.startswith(PACKAGE_ASSETS):
        relative = pretrained[len(PACKAGE_ASSETS) :].strip("/")
        head, _, tail = relative.partition("/")
        return str(Path(__file__).resolve().parents[1] / head / "assets" / tail)
    return pretrained


class KontextPolicy(LoRAAdapters, nn.Module):
    """FLUX.1-Kontext editor with LoRA adapters (construction is cheap; ``load()`` reads the weights)."""

    def __init__(
        self,
        pretrained: str = "black-forest-labs/FLUX.1-Kontext-dev",
        revision: str | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16",
        resolution: int = 512,
        guidance_scale: float = 2.5,
        max_sequence_length: int = 512,
        lora_rank: int = 32,
        lora_alpha: float | None = None,
        lora_targets: list[str] | None = None,
        lora_feed_forward: bool = False,
        lora_dropout: float = 0.0,
        lora_init_seed: int = 0,
        attention_backend: str | None = None,
        gradient_checkpointing: bool = False,
        text_cache_size: int = 64,
        local_files_only: bool = False,
        lora_weights: str | None = None,
        compile_transformer: bool = False,
        load_once: bool = True,
        text_encoders: Literal["resident", "offload"] = "offload",
    ) -> None:
        """
        Args:
            pretrained: hub id or local folder of a FluxKontextPipeline checkpoint (``mtflow-assets:toy/prior``: the
                toy editor shipped with mtflow).
            revision: hub revision (branch, tag or commit) of ``pretrained``.
            dtype: dtype of the frozen base (transformer, VAE, text encoders); LoRA weights are always float32.
            resolution: side of the pixel area sources are edited at (multiple of 16 for Kontext): a square source
                is resized to resolution x resolution, others to the nearest-aspect Kontext bucket of that area.
            guidance_scale: the distilled guidance scalar fed to the guidance embedding (Kontext-dev: 2.5).
            max_sequence_length: T5 tokens per instruction (Kontext: 512).
            lora_rank: LoRA rank r (0: no adapters, the bare model, e.g. for supervised training of a prior).
            lora_alpha: LoRA alpha (None: alpha = rank, the scale ComfyUI and diffusers agree on).
            lora_targets: module names to adapt (None: the attention projections).
            lora_feed_forward: also adapt the feed-forward layers.
            lora_dropout: dropout on the LoRA branch.
            lora_init_seed: seed of the LoRA initialisation (identical on every rank).
            attention_backend: diffusers attention dispatcher backend ("native", "flash", "xformers", ...; None keeps
                the default SDPA).
            gradient_checkpointing: recompute transformer activations in backward to save memory.
            text_cache_size: encoded instructions kept across calls (LRU); 0 disables the cross-call cache.
            local_files_only: never contact the hub.
            lora_weights: a ``pytorch_lora_weights.safetensors`` (from ``mtflow export`` or diffusers) to start the
                trained adapter from, e.g. to evaluate an exported LoRA with ``mtflow test``.
            compile_transformer: ``torch.compile`` the transformer forward (after FSDP sharding when training);
                measured 1.35x per iteration on CPU after a ~70 s cold compile (BENCHMARKS.md).
            load_once: with several processes, only rank 0 reads the checkpoint; the others build every module on
                the meta device and receive the weights from rank 0 after sharding (``materialize_from_rank0``), so
                a node holds one full copy instead of one per GPU.
            text_encoders: where CLIP and T5 live between encodings: "resident" on the training device, or
                "offload": on the CPU, moved to the training device for each batched encoder call (cache misses
                only) and back right after (T5-XXL is 8.9 GiB in bf16). Outputs are the same either way.
        """
        super().__init__()
        self.pretrained = pretrained
        self.revision = revision
        self.dtype_name = dtype
        self.resolution = resolution
        self.guidance_scale = guidance_scale
        self.max_sequence_length = max_sequence_length
        self.lora_rank = lora_rank
        self.lora_alpha = float(lora_rank if lora_alpha is None else lora_alpha)
        targets = list(lora_targets) if lora_targets else list(ATTENTION_LORA_TARGETS)
        if lora_feed_forward:
            targets += [t for t in FEED_FORWARD_LORA_TARGETS if t not in targets]
        self.lora_targets = targets
        self.lora_dropout = lora_dropout
        self.lora_init_seed = lora_init_seed
        self.attention_backend = attention_backend
        self.gradient_checkpointing = gradient_checkpointing
        self.text_cache_size = text_cache_size
        self.local_files_only = local_files_only
        self.lora_weights = lora_weights
        self.compile_transformer = compile_transformer
        self.load_once = load_once
        if text_encoders not in ("resident", "offload"):
            raise ValueError(f"text_encoders must be 'resident' or 'offload', got {text_encoders!r}")
        self.text_encoders = text_encoders
        self._pipeline = None
        self._full_state: dict[str, dict[str, torch.Tensor]] | None = None
        self._text_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.text_encoder_calls = 0  # batches sent through the text encoders (tests assert on it)
        self._warned_cut_text = False
        self.adapter_names: list[str] = []

    # ------------------------------------------------------------------ loading
    @property
    def is_loaded(self) -> bool:
        return self._pipeline is not None

    def load(
        self, extra_adapters: Sequence[str] = (), device: torch.device | str | None = None
    ) -> KontextPolicy:
        """Load the checkpoint, freeze it, add the trained LoRA adapter and ``extra_adapters`` (copies of it)."""
        if self.is_loaded:
            return self
        from diffusers import FluxKontextPipeline

        dtype = DTYPES[self.dtype_name]
        reader = not _loads_from_rank0(self.load_once) or torch.distributed.get_rank() == 0
        try:
            if reader:
                pipe = FluxKontextPipeline.from_pretrained(
                    resolve_pretrained(self.pretrained),
                    revision=self.revision,
                    dtype=dtype,
                    local_files_only=self.local_files_only,
                )
            else:  # the weights come from rank 0 (materialize_from_rank0); only configs and tokenizers are read
                pipe = self._pipeline_on_meta(dtype)
        except (OSError, ValueError) as err:  # missing folder, malformed id, no hub access, gated repo
            raise OSError(
                f"could not load a FluxKontextPipeline from {self.pretrained!r} "
                f"(revision={self.revision!r}, local_files_only={self.local_files_only}): {err}"
            ) from err
        pipe.set_progress_bar_config(disable=True)
        if self.resolution % (pipe.vae_scale_factor * 2):
            raise ValueError(
                f"resolution {self.resolution} must be a multiple of {pipe.vae_scale_factor * 2}"
            )
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            module.requires_grad_(False)
            module.eval()
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        if self.text_encoders == "offload":
            # not registered as submodules: moving the policy to the GPU (Lightning, .to()) leaves them on the CPU
            object.__setattr__(self, "text_encoder", pipe.text_encoder)
            object.__setattr__(self, "text_encoder_2", pipe.text_encoder_2)
        else:
            self.text_encoder = pipe.text_encoder
            self.text_encoder_2 = pipe.text_encoder_2
        # The pipeline object is kept (unregistered) for its encode/pack/id helpers; it shares these modules.
        object.__setattr__(self, "_pipeline", pipe)
        if self.attention_backend:
            self.transformer.set_attention_backend(self.attention_backend)
        if self.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        if self.lora_rank > 0:
            if reader:
                self._add_lora_adapters([TRAINED_ADAPTER, *extra_adapters])
            else:
                with torch.device("meta"):
                    self._add_lora_adapters([TRAINED_ADAPTER, *extra_adapters])
        elif extra_adapters or self.lora_weights:
            raise ValueError("lora_rank=0 loads the bare model: it cannot hold adapters or LoRA weights")
        if _loads_from_rank0(self.load_once) and reader:
            # kept until materialize_from_rank0 has sent them: sharding replaces the transformer's parameters
            self._full_state = {name: module.state_dict() for name, module in self._weight_modules().items()}
        if device is not None:
            self.to(device)
        return self

    def _weight_modules(self) -> dict[str, nn.Module]:
        return {
            "transformer": self.transformer,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
        }

    def _pipeline_on_meta(self, dtype: torch.dtype):
        """The pipeline with every model on the meta device (built from the checkpoint's configs, as
        ``from_pretrained`` builds them) and the real tokenizers and scheduler."""
        from diffusers import AutoencoderKL, FluxKontextPipeline, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        path = resolve_pretrained(self.pretrained)
        hub = {"revision": self.revision, "local_files_only": self.local_files_only}
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")  # diffusers' note about casting with to(): nothing is loaded here
            components = {
                "transformer": FluxTransformer2DModel.from_config(
                    FluxTransformer2DModel.load_config(path, subfolder="transformer", **hub)
                ),
                "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(path, subfolder="vae", **hub)),
                "text_encoder": CLIPTextModel._from_config(
                    CLIPTextConfig.from_pretrained(path, subfolder="text_encoder", **hub), torch_dtype=dtype
                ),
                "text_encoder_2": T5EncoderModel._from_config(
                    T5Config.from_pretrained(path, subfolder="text_encoder_2", **hub), torch_dtype=dtype
                ),
            }
            components = {name: module.to(dtype) for name, module in components.items()}
        return FluxKontextPipeline.from_pretrained(path, **components, **hub)

    @torch.no_grad()
    def materialize_from_rank0(self, device: torch.device | str = "cpu") -> None:
        """After ``load`` (and FSDP2 sharding) on every rank: rank 0 sends its weights, every other rank allocates
        its modules (its shards of the transformer) on ``device`` and receives them. A no-op without
        ``load_once`` or with a single process."""
        if not _loads_from_rank0(self.load_once):
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        rank0 = torch.distributed.get_rank() == 0
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        for name, module in self._weight_modules().items():
            if not rank0:
                module.to_empty(device=device)
            set_model_state_dict(module, self._full_state[name] if rank0 else {}, options=options)
            # buffers outside the state dict (e.g. CLIP's position ids) are not sent by the above
            for buffer in module.buffers():
                sent = buffer.detach().to(_collective_device(device))
                torch.distributed.broadcast(sent, src=0)
                buffer.copy_(sent)
        self._full_state = None

    def _require_loaded(self):
        if self._pipeline is None:
            raise RuntimeError("KontextPolicy.load() has not been called")
        return self._pipeline

    # ------------------------------------------------------------------ geometry
    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def model_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def latent_hw(self) -> tuple[int, int]:
        """(h, w) of the unpacked latent grid of a square source."""
        return self._latent_grid(None)

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4

    @property
    def image_seq_len(self) -> int:
        """Target tokens of a square source."""
        return self._seq_len(None)

    def edit_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of the Kontext bucket of a source of ``size``: the preferred resolution nearest in aspect
        ratio (measured as FluxKontextPipeline measures it, on the size floored to a multiple of 16), scaled from
        1024 x 1024 to ``resolution`` x ``resolution`` and floored to the packing multiple."""
        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

        pipe = self._require_loaded()
        step = pipe.image_processor.config.vae_scale_factor
        width, height = (int(x) - int(x) % step for x in size)
        if width <= 0 or height <= 0:
            raise ValueError(f"a {size[0]}x{size[1]} source is smaller than Kontext's {step}-pixel grid")
        aspect = width / height
        _, bucket_w, bucket_h = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        multiple = pipe.vae_scale_factor * 2
        return tuple((x * self.resolution // 1024) // multiple * multiple for x in (bucket_w, bucket_h))

    def _size(self, size: ImageSize | None) -> ImageSize:
        return (self.resolution, self.resolution) if size is None else (int(size[0]), int(size[1]))

    def _latent_grid(self, size: ImageSize | None) -> tuple[int, int]:
        """(h, w) of the unpacked latent grid of images of ``size``."""
        pipe = self._require_loaded()
        width, height = self._size(size)
        factor = pipe.vae_scale_factor * 2
        return 2 * (height // factor), 2 * (width // factor)

    def _seq_len(self, size: ImageSize | None) -> int:
        h, w = self._latent_grid(size)
        return (h // 2) * (w // 2)

    def _check_tokens(self, latents: torch.Tensor, size: ImageSize | None) -> None:
        if latents.shape[1] != self._seq_len(size):
            width, height = self._size(size)
            raise ValueError(
                f"{latents.shape[1]} latent tokens are not an image of {width}x{height} ({self._seq_len(size)} "
                "tokens): pass the size the latents were made at"
            )

    def timestep_grid(self, num_steps: int, size: tuple[int, int] | None = None) -> TimestepGrid:
        """The pipeline's grid: linspace(1, 1/T, T) shifted by mu(target tokens of ``size``)."""
        pipe = self._require_loaded()
        return build_timestep_grid(pipe.scheduler, num_steps, self._seq_len(size), device=self.device)

    def _image_ids(self, device: torch.device, size: ImageSize | None = None) -> torch.Tensor:
        """[L + L_ref, 3]: target ids, then reference ids with the Kontext marker 1 in the first coordinate."""
        pipe = self._require_loaded()
        h, w = self._latent_grid(size)
        target = pipe._prepare_latent_image_ids(1, h // 2, w // 2, device, self.model_dtype)
        reference = pipe._prepare_latent_image_ids(1, h // 2, w // 2, device, self.model_dtype)
        reference[..., 0] = 1
        return torch.cat([target, reference], dim=0)

    # ------------------------------------------------------------------ text
    def _warn_if_cut(self, pipe, texts: Sequence[str]) -> None:
        """Once per policy: say plainly when instructions exceed ``max_sequence_length`` T5 tokens (the encoder
        cuts them, so the editor never reads their end; e.g. the single-turn-merged baseline's K instructions in
        one, on a model trained with short texts)."""
        if self._warned_cut_text:
            return
        lengths = [len(ids) for ids in pipe.tokenizer_2(list(texts))["input_ids"]]
        cut = [(n, t) for n, t in zip(lengths, texts) if n > self.max_sequence_length]
        if cut:
            self._warned_cut_text = True
            longest, example = max(cut)
            warnings.warn(
                f"{len(cut)} of {len(texts)} instructions are longer than max_sequence_length="
                f"{self.max_sequence_length} T5 tokens (longest: {longest}) and are cut, so the editor never reads "
                f"their end, e.g. {example!r}. Raise max_sequence_length if the model was trained for longer "
                "texts; otherwise results on these instructions (such as the single-turn-merged baseline) are "
                "handicapped. This is said once per policy.",
                stacklevel=2,
            )

    text_reads_image = False  # CLIP and T5 read the instruction only

    @torch.no_grad()
    def encode_text(
        self, instructions: Sequence[str], images: Sequence[Image.Image] | None = None
    ) -> TextEmbeddings:
        """Encode each distinct instruction once (one batched encoder call for all cache misses)."""
        if images is not None:
            raise ValueError("KontextPolicy's text encoders read the instruction only; pass no images")
        pipe = self._require_loaded()
        unique = list(dict.fromkeys(instructions))
        missing = [t for t in unique if t not in self._text_cache]
        fresh: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if missing:
            self._warn_if_cut(pipe, missing)
            with _without_t5_cut_notice(pipe), self._encoders_on(self.device):
                prompt_embeds, pooled, _ = pipe.encode_prompt(
                    prompt=missing,
                    prompt_2=None,
                    device=self.device,
                    max_sequence_length=self.max_sequence_length,
                )
            self.text_encoder_calls += 1
            fresh = {t: (prompt_embeds[i], pooled[i]) for i, t in enumerate(missing)}
        rows = [fresh[t] if t in fresh else self._text_cache[t] for t in unique]
        for t in unique:
            if self.text_cache_size > 0:
                self._text_cache[t] = fresh.get(t) or self._text_cache[t]
                self._text_cache.move_to_end(t)
        while len(self._text_cache) > self.text_cache_size:
            self._text_cache.popitem(last=False)
        prompt_embeds = torch.stack([r[0] for r in rows])
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=self.device, dtype=self.text_encoder.dtype)
        return TextEmbeddings(
            texts=unique,
            prompt_embeds=prompt_embeds,
            pooled_embeds=torch.stack([r[1] for r in rows]),
            text_ids=text_ids,
        )

    @contextmanager
    def _encoders_on(self, device: torch.device) -> Iterator[None]:
        """CLIP and T5 on ``device`` for one encoder call; offloaded ones go back to the CPU afterwards."""
        encoders = (self.text_encoder, self.text_encoder_2)
        if self.text_encoders == "resident":
            yield
            return
        for encoder in encoders:
            encoder.to(device)
        try:
            yield
        finally:
            for encoder in encoders:
                encoder.to("cpu")

    def clear_text_cache(self) -> None:
        self._text_cache.clear()

    # ------------------------------------------------------------------ images and latents
    def images_to_pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Resize each image to its bucket and normalise, as FluxKontextPipeline does: [N, 3, H, W] float32 in
        [-1, 1] on the policy device. All images must fall into one bucket."""
        pipe = self._require_loaded()
        width, height = common_edit_size(self, images)
        resized = [pipe.image_processor.resize(img.convert("RGB"), height, width) for img in images]
        return pipe.image_processor.preprocess(resized, height, width).to(self.device, torch.float32)

    @staticmethod
    def uint8_to_pixels(images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] uint8 -> float32 in [-1, 1], bit-identical to preprocessing the saved PNG."""
        return 2.0 * (images.float() / 255.0) - 1.0

    @torch.no_grad()
    def encode_reference(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> [N, L_ref, C] float32: VAE mode, (z - shift) * scale, 2x2 packed."""
        pipe = self._require_loaded()
        latents = pipe._encode_vae_image(pixels.to(self.device, self.vae.dtype), generator=None)
        n, c, h, w = latents.shape
        return pipe._pack_latents(latents, n, c, h, w).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """[N, L, C] packed latents of images of ``size`` -> [N, 3, H, W] uint8 (rounded as diffusers'
        numpy_to_pil rounds)."""
        pipe = self._require_loaded()
        self._check_tokens(latents, size)
        width, height = self._size(size)
        z = pipe._unpack_latents(latents.to(self.vae.dtype), height, width, pipe.vae_scale_factor)
        z = z / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.vae.decode(z, return_dict=False)[0]
        image = pipe.image_processor.postprocess(image, output_type="pt")  # [0, 1]
        return (image.float() * 255).round().to(torch.uint8)

    def initial_noise(
        self, num: int, generator: torch.Generator | None, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """N(0, I) drawn in the unpacked latent shape of ``size`` (as the pipeline draws it), then packed:
        [num, L, C] float32."""
        pipe = self._require_loaded()
        h, w = self._latent_grid(size)
        c = self.latent_channels
        noise = torch.randn((num, c, h, w), generator=generator, device=self.device, dtype=torch.float32)
        return pipe._pack_latents(noise, num, c, h, w)

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
        """Velocity of the active adapter, [N, L, C] float32 (the reference tokens are sliced off).

        Args:
            x: [N, L, C] latents of images of ``size``; model_timestep: [N] or scalar; reference: [N, L_ref, C] (the
            same bucket); text_index: [N].
        """
        self._check_tokens(x, size)
        n, length, _ = x.shape
        dtype = self.model_dtype
        hidden = torch.cat([x.to(dtype), reference.to(dtype)], dim=1)
        timestep = torch.as_tensor(model_timestep, device=x.device, dtype=torch.float32).expand(n).to(dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((n,), self.guidance_scale, device=x.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=hidden,
            timestep=timestep,
            guidance=guidance,
            pooled_projections=text.pooled_embeds[text_index],
            encoder_hidden_states=text.prompt_embeds[text_index],
            txt_ids=text.text_ids,
            img_ids=self._image_ids(x.device, size),
            return_dict=False,
        )[0]
        return out[:, :length].float()

    def fsdp_units(self) -> list[nn.Module]:
        """Every double- and single-stream block, then the transformer: what FSDP2 shards (the text encoders and the
        VAE run without gradients and stay replicated)."""
        blocks = list(self.transformer.transformer_blocks) + list(self.transformer.single_transformer_blocks)
        return [*blocks, self.transformer]

    def compile_if_requested(self) -> None:
        """Apply ``torch.compile`` to the transformer if ``compile_transformer`` is set (call after sharding). Not
        named ``compile``: that would silently change ``nn.Module.compile`` for this module."""
        if self.compile_transformer:
            self.transformer.compile()

    def train(self, mode: bool = True) -> KontextPolicy:
        """Only the transformer follows train/eval: the frozen encoders and the VAE stay in eval mode (T5's dropout
        would otherwise make the cached instruction embeddings random)."""
        super().train(mode)
        if self.is_loaded:
            for module in (self.text_encoder, self.text_encoder_2, self.vae):
                module.eval()
        return self

    # ------------------------------------------------------------------ misc
    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def save_pretrained_base(self, path: str | Path) -> None:
        """Save the (frozen) base pipeline, e.g. to reuse a trained toy prior as a checkpoint folder."""
        self._require_loaded().save_pretrained(path)


def _loads_from_rank0(load_once: bool) -> bool:
    """Whether rank 0 reads the checkpoint for everyone (``load_once`` under several processes)."""
    return (
        load_once
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def _collective_device(device: torch.device | str) -> torch.device:
    """Where a broadcast can run: the GPU under NCCL, the CPU under gloo."""
    backend = torch.distributed.get_backend()
    return torch.device(device) if backend != "gloo" else torch.device("cpu")


class _DropT5CutNotice(logging.Filter):
    """Drops the pipeline's own T5 truncation notice: it decodes the cut tokens from CLIP's length (77) instead of
    ``max_sequence_length``, so with a short budget it lists empty strings, one per prompt; ``_warn_if_cut`` says
    it once, with the numbers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "was truncated because `max_sequence_length`" not in record.getMessage()


@contextmanager
def _without_t5_cut_notice(pipe) -> Iterator[None]:
    logger = logging.getLogger(type(pipe).__module__)
    notice_filter = _DropT5CutNotice()
    logger.addFilter(notice_filter)
    try:
        yield
    finally:
        logger.removeFilter(notice_filter)
