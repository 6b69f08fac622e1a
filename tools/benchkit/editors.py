"""The editors side by side: tiny models of FLUX.1-Kontext, Qwen-Image-Edit and FLUX.2-klein at the same token
count, the network calls one RL iteration of each makes (``editor_passes``: classifier-free guidance runs the
transformer twice per velocity; Qwen-Image-Edit's VL text encoder runs once per turn with that turn's images), and
the FLOPs of one paper-setting iteration at real size, counted by ``FlopCounterMode`` on the real diffusers
classes built on the meta device (``editor_projection``).

Real-size architectures: the diffusers classes' own defaults are Qwen-Image's transformer and VAE and FLUX.2's
VAE; FLUX.2-klein-base-9B's transformer sizes (8 double + 24 single blocks, 32 heads x 128, MLP ratio 3, text width
3 x 4096) are InvokeAI's preset for FLUX.2-klein 9B (invokeai/backend/flux2/, ``Flux2VariantType.Klein9B``);
Qwen2.5-VL-7B and Qwen3-8B sizes are their published configs. The tiny runs check the call model; the meta-device
counts need no weights.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from benchkit.passes import IterationShape, PassCount, chunk_sizes, model_passes
from benchkit.projection import (
    FluxArch,
    Hardware,
    PaperSetting,
    Qwen3VLArch,
    T5Arch,
    counted_flux_flops,
    qwen3vl_decode_flops,
    qwen3vl_image_tokens,
    qwen3vl_prefill_flops,
    t5_encoder_flops,
)

EDITORS = ("kontext", "qwen_image_edit", "flux2_klein")
TRANSFORMER_PASSES = ("rollout_forward", "old_forward", "reference_forward", "train_forward_backward")


@dataclass(frozen=True)
class EditorProfile:
    """What an editor changes in one iteration's calls.

    Attributes:
        name: "kontext", "qwen_image_edit" or "flux2_klein".
        guided: true classifier-free guidance (two transformer calls per velocity, the negative prompt encoded).
        text_reads_image: the text encoder runs per turn on that turn's images (one row per trajectory after
            turn 1), instructions and negatives in separate calls; otherwise once per iteration on the distinct
            instructions (plus the empty negative prompt when guided).
    """

    name: str
    guided: bool
    text_reads_image: bool

    @classmethod
    def of(cls, policy: Any) -> EditorProfile:
        names = {
            "KontextPolicy": "kontext",
            "QwenImageEditPolicy": "qwen_image_edit",
            "Flux2KleinPolicy": "flux2_klein",
        }
        return cls(
            names[type(policy).__name__], bool(getattr(policy, "guided", False)), policy.text_reads_image
        )


def editor_passes(shape: IterationShape, profile: EditorProfile) -> list[PassCount]:
    """``model_passes`` of Kontext's loop with the editor's differences: every transformer call doubled under
    guidance (same batch), and its text-encoder calls."""
    out: dict[tuple[str, int], int] = {}
    for p in model_passes(shape):
        if p.name == "text_encode":
            continue
        calls = p.calls * (2 if profile.guided and p.name in TRANSFORMER_PASSES else 1)
        out[(p.name, p.batch_size)] = out.get((p.name, p.batch_size), 0) + calls
    b, n, k = shape.num_chains, shape.num_trajectories, shape.num_turns
    if profile.text_reads_image:
        per_turn = 2 if profile.guided else 1  # instructions, then negatives, each one batched call
        text = {b: per_turn}
        if k > 1:
            text[n] = text.get(n, 0) + per_turn * (k - 1)
    else:
        text = {(shape.unique_instructions or b * k) + (1 if profile.guided else 0): 1}
    text_calls = [PassCount("text_encode", size, calls) for size, calls in text.items()]  # type: ignore[arg-type]
    return text_calls + [PassCount(name, size, calls) for (name, size), calls in out.items()]  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ tiny models


@dataclass(frozen=True)
class TinyEditors:
    """The tiny models of the comparison: every editor at ``tokens_side`` x ``tokens_side`` target tokens (Kontext's
    VAE downsamples 2x, the others' 16x, so their images are 8x wider for the same tokens).

    Attributes:
        tokens_side: packed target tokens per side.
        seed: weights seed.
    """

    tokens_side: int = 8
    seed: int = 0

    def resolution(self, editor: str) -> int:
        return self.tokens_side * (4 if editor == "kontext" else 32)


def build_editor(editor: str, root: str | Path, seed: int = 0) -> Path:
    """Build (once) the tiny model of ``editor`` under ``root``; returns its folder."""
    path = Path(root) / f"tiny-{editor}-seed{seed}"
    if (path / "model_index.json").exists():
        return path
    if editor == "kontext":
        from mtflow.testing.tiny_kontext import build_tiny_kontext

        return build_tiny_kontext(path, seed=seed)
    if editor == "qwen_image_edit":
        from mtflow.testing.tiny_qwen_image_edit import build_tiny_qwen_image_edit

        return build_tiny_qwen_image_edit(path, seed=seed)
    from mtflow.testing.tiny_flux2_klein import build_tiny_flux2_klein

    return build_tiny_flux2_klein(path, seed=seed)


def load_editor(editor: str, path: str | Path, resolution: int, lora_rank: int = 4, extra_adapters=("old",)):
    """The float32 policy of ``editor`` (guided where the real model is; no cross-call text cache)."""
    common = dict(dtype="float32", resolution=resolution, lora_rank=lora_rank, local_files_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if editor == "kontext":
            from mtflow.models.kontext import KontextPolicy

            policy = KontextPolicy(str(path), max_sequence_length=32, text_cache_size=0, **common)
        elif editor == "qwen_image_edit":
            from mtflow.models.qwen_image_edit import QwenImageEditPolicy

            policy = QwenImageEditPolicy(str(path), **common)
        else:
            from mtflow.models.flux2_klein import Flux2KleinPolicy

            policy = Flux2KleinPolicy(
                str(path), max_sequence_length=32, text_encoder_out_layers=[1, 2], text_cache_size=0, **common
            )
        return policy.load(extra_adapters=extra_adapters)


# ------------------------------------------------------------------------------------------------ real size


@dataclass(frozen=True)
class EditorSetting:
    """One paper-setting iteration per GPU for an editor (``PaperSetting`` for the shared sizes).

    Attributes:
        paper: B, G, K, T, D, LoRA rank, judge sizes, 512 px.
        qwen_text_tokens: Qwen-Image-Edit-2509 text-row tokens after the dropped system prompt: the 384 x 384 VL
            image (14 x 14 merged tokens) plus the instruction and template (~35).
        qwen_prompt_tokens: tokens the VL encoder runs over per row (system prompt included).
        qwen_vl_patches: vision patches of the 392 x 392 VL image (28 x 28, merged 2 x 2).
        flux2_text_tokens: Qwen3 tokens per instruction (padded to max_sequence_length).
    """

    paper: PaperSetting = field(default_factory=PaperSetting)
    qwen_text_tokens: int = 196 + 35
    qwen_prompt_tokens: int = 196 + 35 + 64
    qwen_vl_patches: int = 28 * 28
    flux2_text_tokens: int = 512


def _lora(model, rank: int, targets) -> None:
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)


def _count(model, inputs: dict[str, Any], backward: bool) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.set_grad_enabled(backward):
        out = model(**inputs, return_dict=False)[0]
        if backward:
            out.sum().backward()
    return counter.get_total_flops()


def counted_transformer_flops(editor: str, setting: EditorSetting, **sizes: int) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs of one sample through the real-size transformer of ``editor`` with LoRA
    (rank of the setting, attention targets), counted on the meta device. The backward counts input gradients of
    every product (a frozen base still propagates them) and the LoRA weight gradients. ``sizes`` override the
    diffusers constructor's arguments (e.g. ``num_layers`` for a check at fewer blocks; not for Kontext)."""
    paper = setting.paper
    image_tokens = paper.target_tokens + paper.reference_tokens
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if editor == "kontext":
            arch = FluxArch()
            heads = arch.hidden // 128
            fwd = counted_flux_flops(arch, heads, image_tokens, paper.text_tokens, paper.lora_rank)
            both = counted_flux_flops(
                arch, heads, image_tokens, paper.text_tokens, paper.lora_rank, backward=True
            )
            return float(fwd), float(both)
        side = int(math.isqrt(paper.target_tokens))
        with torch.device("meta"):
            if editor == "qwen_image_edit":
                from diffusers import QwenImageTransformer2DModel

                from mtflow.models.qwen_image_edit import ATTENTION_LORA_TARGETS

                model = QwenImageTransformer2DModel(
                    **sizes
                )  # the class defaults: Qwen-Image's 20 B transformer
                _lora(model, paper.lora_rank, ATTENTION_LORA_TARGETS)
                inputs = {
                    "hidden_states": torch.empty(1, image_tokens, 64),
                    "encoder_hidden_states": torch.empty(1, setting.qwen_text_tokens, 3584),
                    "timestep": torch.empty(1),
                    "img_shapes": [[(1, side, side), (1, side, side)]],
                }
            else:
                from diffusers import Flux2Transformer2DModel

                from mtflow.models.flux2_klein import ATTENTION_LORA_TARGETS

                klein_9b = dict(
                    num_layers=8,
                    num_single_layers=24,
                    attention_head_dim=128,
                    num_attention_heads=32,
                    joint_attention_dim=3 * 4096,
                    mlp_ratio=3.0,
                    guidance_embeds=False,
                )
                model = Flux2Transformer2DModel(**{**klein_9b, **sizes})
                _lora(model, paper.lora_rank, ATTENTION_LORA_TARGETS)
                inputs = {
                    "hidden_states": torch.empty(1, image_tokens, 128),
                    "encoder_hidden_states": torch.empty(1, setting.flux2_text_tokens, 3 * 4096),
                    "timestep": torch.empty(1),
                    "img_ids": torch.zeros(image_tokens, 4),
                    "txt_ids": torch.zeros(setting.flux2_text_tokens, 4),
                }
            return float(_count(model, inputs, False)), float(_count(model, inputs, True))


def counted_vae_flops(editor: str, side: int = 512) -> tuple[float, float]:
    """(encode, decode) FLOPs of one ``side`` x ``side`` image through the real-size VAE, on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if editor == "qwen_image_edit":
            from diffusers import AutoencoderKLQwenImage

            vae, pixels = AutoencoderKLQwenImage(), torch.empty(1, 3, 1, side, side)
        elif editor == "flux2_klein":
            from diffusers import AutoencoderKLFlux2

            vae, pixels = AutoencoderKLFlux2(), torch.empty(1, 3, side, side)
        else:
            raise ValueError("Kontext's VAE is PaperSetting's (measured by the GPU projection)")
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            latents = vae.encode(pixels).latent_dist.mode()
        encode = counter.get_total_flops()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            vae.decode(latents)
        return float(encode), float(counter.get_total_flops())


def qwen25vl_row_flops(setting: EditorSetting) -> float:
    """One Qwen2.5-VL-7B text row: the vision tower over the VL image's patches (32 blocks of width 1280, MLP 3420,
    full attention; windowed attention in most blocks makes this an upper bound) and the merger, then the 28-layer
    LM (width 3584, MLP 18944, 28 heads / 4 KV heads of 128) over the prompt, full attention (an upper bound)."""
    patches, hv, iv = setting.qwen_vl_patches, 1280, 3420
    vision = 2 * patches * (3 * 2 * 14 * 14) * hv + 32 * (
        2 * patches * (4 * hv * hv + 3 * hv * iv) + 4 * patches**2 * hv
    )
    merged_in = hv * 4
    vision += 2 * (patches // 4) * (merged_in * merged_in + merged_in * 3584)
    tokens, h = setting.qwen_prompt_tokens, 3584
    per_token = 28 * (2 * h * 28 * 128 + 2 * h * 4 * 128 + 3 * h * 18944)
    return float(vision + 2 * tokens * per_token + 28 * 4 * tokens**2 * 28 * 128)


def qwen3_8b_row_flops(tokens: int) -> float:
    """One Qwen3-8B prompt (FLUX.2-klein-9B's text encoder: all 36 layers run), full attention (an upper bound)."""
    lm = Qwen3VLArch()  # Qwen3-VL-8B's language model has Qwen3-8B's sizes
    return float(2 * tokens * lm.lm_params_per_token + lm.layers * 4 * tokens**2 * lm.heads * lm.head_dim)


@dataclass
class EditorProjection:
    """FLOPs and seconds of one iteration per GPU, by phase (see ``benchkit.projection.IterationProjection``)."""

    flops: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


def editor_projection(
    editor: str,
    loss: str,
    setting: EditorSetting,
    hardware: Hardware,
    transformer: tuple[float, float],
    vae: tuple[float, float],
    guided: bool,
) -> EditorProjection:
    """One iteration per GPU of ``editor`` with ``loss`` ("grpo" or "nft"): the transformer's counted forward and
    forward + backward per sample (``counted_transformer_flops``), times two calls per velocity when ``guided``
    (rollout, NFT's old / reference velocities and the trained passes alike: the guided velocity is the one the
    losses use); text encoding, VAE and judge as their calls in ``editor_passes``."""
    paper = setting.paper
    b, n, k, t = paper.chains_per_gpu, paper.trajectories_per_gpu, paper.num_turns, paper.num_steps
    passes = 2 if guided else 1
    forward, train = transformer
    out = EditorProjection()
    if editor == "kontext":
        out.flops["text"] = b * k * t5_encoder_flops(T5Arch(), paper.text_tokens)
    elif editor == "qwen_image_edit":
        rows = b + n * (k - 1)
        out.flops["text"] = rows * passes * qwen25vl_row_flops(setting)
    else:
        out.flops["text"] = (b * k + (1 if guided else 0)) * qwen3_8b_row_flops(setting.flux2_text_tokens)
    out.flops["rollout"] = n * k * t * passes * forward
    out.flops["vae"] = (b + n * (k - 1)) * vae[0] + n * k * vae[1]
    if loss == "grpo":
        out.flops["train"] = n * k * t * passes * train
    elif loss == "nft":
        samples = n * k * paper.nft_draws
        out.flops["nft_old_ref"] = samples * passes * forward * (2 if paper.nft_reference else 1)
        out.flops["train"] = samples * passes * train
    else:
        raise ValueError(f"unknown loss {loss!r}; expected 'grpo' or 'nft'")
    judge = Qwen3VLArch()
    _, per_image = qwen3vl_image_tokens(judge, paper.image_side)
    out.flops["judge_prefill"] = n * qwen3vl_prefill_flops(
        judge, k + 1, paper.image_side, paper.judge_text_tokens
    )
    context = (k + 1) * per_image + paper.judge_text_tokens
    out.flops["judge_decode"] = n * qwen3vl_decode_flops(judge, context, paper.judge_output_tokens)
    rate = hardware.sustained_flops
    out.seconds = {name: value / rate for name, value in out.flops.items() if name != "judge_decode"}
    step_read = judge.lm_bytes_bf16 / (hardware.memory_bandwidth * hardware.bandwidth_utilization)
    step_compute = out.flops["judge_decode"] / max(paper.judge_output_tokens, 1) / rate
    out.seconds["judge_decode"] = paper.judge_output_tokens * max(step_read, step_compute)
    return out


def paper_editor_setting(nft_draws: int = 1) -> EditorSetting:
    """The paper setting (B = 1, G = 16, K = 3, T = 12, 512 px, LoRA r = 32) with ``nft_draws`` NFT copies."""
    return EditorSetting(paper=replace(PaperSetting(), nft_draws=nft_draws))


__all__ = [
    "EDITORS",
    "EditorProfile",
    "EditorProjection",
    "EditorSetting",
    "TinyEditors",
    "build_editor",
    "chunk_sizes",
    "counted_transformer_flops",
    "counted_vae_flops",
    "editor_passes",
    "editor_projection",
    "load_editor",
    "paper_editor_setting",
    "qwen25vl_row_flops",
    "qwen3_8b_row_flops",
]
