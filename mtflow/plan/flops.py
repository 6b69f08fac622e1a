"""FLOP model of one RL iteration and its projected time on a GPU node (``mtflow check``'s time plan; the
benchmarks' GPU projection imports it from here).

Counts are multiply-accumulates x 2 (one "FLOP" per multiply and per add) of every matrix product, as
``torch.utils.flop_counter.FlopCounterMode`` counts them; elementwise work (norms, rope, activations, the SDE step)
is not counted (it is bandwidth-bound and small next to the products at these sizes).

FLUX.1-Kontext transformer (``flux_forward_flops``), per sample with S_img image tokens (target + reference), S_txt
text tokens, S = S_img + S_txt, width h, MLP width m = r h:

    embedders      2 S_img c_in h + 2 S_txt d_txt h + per sample: 2 (d_t h + h^2) per time/guidance embedder
                   + 2 (d_pool h + h^2)
    double block   per token 2 (4 h^2 + 2 h m) (its own stream's q, k, v, out and MLP) + attention 4 S^2 h
                   + per sample 2 * 2 h (6 h)  (adaLN-Zero of both streams)
    single block   per token 2 (3 h^2 + h m + (h + m) h) + attention 4 S^2 h + per sample 2 h (3 h)
    output         per sample 2 h (2 h) + 2 S_img h c_in
    LoRA rank r_L  per adapted projection 2 tokens r_L (in + out)  (attention projections: 8 per double block,
                   3 per single block)

Training a LoRA on a frozen base (``flux_train_flops``): the backward pass needs input gradients of every token
projection inside the blocks (as many FLOPs as their forward), twice the attention FLOPs (dQ, dK, dV from dP and the
probabilities) and the LoRA products twice (input and weight gradients); the embedders and the adaLN modulation,
which have no trainable parameter and no trainable input, need none. Gradient checkpointing adds one forward.

Qwen3-VL judge (``qwen3vl_prefill_flops``): vision tower over (side / patch)^2 patches per image (full attention
within an image), the patch merger and its deepstack copies over the merged tokens, then the language model over
the merged image tokens plus the text tokens (full, not causal, attention: an upper bound).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FluxArch:
    """FLUX.1 transformer sizes (defaults: FLUX.1-Kontext-dev, 12 B).

    Attributes:
        hidden: model width h (heads x head dim).
        double_blocks: dual-stream blocks.
        single_blocks: single-stream blocks.
        mlp_ratio: MLP width / h.
        in_channels: packed latent channels per token (16 latent channels x 2 x 2).
        text_dim: T5 width fed to the context embedder.
        pooled_dim: CLIP pooled width.
        time_dim: sinusoidal timestep projection width.
        guidance_embed: has the distilled-guidance embedder.
    """

    hidden: int = 3072
    double_blocks: int = 19
    single_blocks: int = 38
    mlp_ratio: float = 4.0
    in_channels: int = 64
    text_dim: int = 4096
    pooled_dim: int = 768
    time_dim: int = 256
    guidance_embed: bool = True

    @property
    def mlp(self) -> int:
        return int(self.hidden * self.mlp_ratio)


@dataclass(frozen=True)
class FlopBreakdown:
    """FLOPs of one forward pass, by kind.

    Attributes:
        block_linear: token-wise products inside the blocks (need input gradients in backward).
        other_linear: embedders, adaLN modulation, output projection (no gradient under LoRA training).
        attention: Q K^T and P V products.
        lora: LoRA down and up projections.
    """

    block_linear: float
    other_linear: float
    attention: float
    lora: float

    @property
    def total(self) -> float:
        return self.block_linear + self.other_linear + self.attention + self.lora


def flux_forward_flops(
    arch: FluxArch, image_tokens: int, text_tokens: int, lora_rank: int = 0, batch: int = 1
) -> FlopBreakdown:
    """Forward FLOPs of the FLUX transformer on ``batch`` samples of ``image_tokens`` (target + reference) and
    ``text_tokens`` tokens, with LoRA of rank ``lora_rank`` on the attention projections (0: none)."""
    h, m = arch.hidden, arch.mlp
    s_img, s_txt = image_tokens, text_tokens
    s = s_img + s_txt
    embed = 2 * s_img * arch.in_channels * h + 2 * s_txt * arch.text_dim * h
    time_embedders = 2 if arch.guidance_embed else 1
    per_sample = time_embedders * 2 * (arch.time_dim * h + h * h) + 2 * (arch.pooled_dim * h + h * h)
    double_tokens = 2 * s * (4 * h * h + 2 * h * m)
    double_sample = 2 * (2 * h * 6 * h)
    single_tokens = 2 * s * (3 * h * h + h * m + (h + m) * h)
    single_sample = 2 * h * 3 * h
    attention = 4 * s * s * h * (arch.double_blocks + arch.single_blocks)
    output = 2 * h * 2 * h + 2 * s_img * h * arch.in_channels
    lora = 0.0
    if lora_rank:
        # 8 adapted h x h projections per double block (4 per stream, each over its stream's tokens) = 4 over all
        # tokens; 3 per single block over all tokens
        lora = 2 * s * lora_rank * 2 * h * (4 * arch.double_blocks + 3 * arch.single_blocks)
    block_linear = arch.double_blocks * double_tokens + arch.single_blocks * single_tokens
    other = (
        embed + per_sample + arch.double_blocks * double_sample + arch.single_blocks * single_sample + output
    )
    return FlopBreakdown(
        block_linear=float(batch * block_linear),
        other_linear=float(batch * other),
        attention=float(batch * attention),
        lora=float(batch * lora),
    )


def counted_flux_flops(
    arch: FluxArch,
    heads: int,
    image_tokens: int,
    text_tokens: int,
    lora_rank: int = 0,
    backward: bool = False,
) -> int:
    """FLOPs ``FlopCounterMode`` counts for one forward (and, with ``backward``, its backward) of the real diffusers
    ``FluxTransformer2DModel`` of ``arch`` built on the meta device (batch 1; LoRA on the attention projections with
    only the LoRA weights trainable). The independent check of ``flux_forward_flops``."""
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    from mtflow.models.kontext import ATTENTION_LORA_TARGETS

    head_dim = arch.hidden // heads
    with torch.device("meta"):
        model = FluxTransformer2DModel(
            patch_size=1,
            in_channels=arch.in_channels,
            num_layers=arch.double_blocks,
            num_single_layers=arch.single_blocks,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=arch.text_dim,
            pooled_projection_dim=arch.pooled_dim,
            guidance_embeds=arch.guidance_embed,
            # the RoPE split does not change the count (elementwise); any split summing to head_dim will do
            axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8),
        )
        model.requires_grad_(False)
        if lora_rank:
            model.add_adapter(
                LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=list(ATTENTION_LORA_TARGETS))
            )
            for name, p in model.named_parameters():
                p.requires_grad_("lora_" in name)
        inputs = {
            "hidden_states": torch.empty(1, image_tokens, arch.in_channels),
            "encoder_hidden_states": torch.empty(1, text_tokens, arch.text_dim),
            "pooled_projections": torch.empty(1, arch.pooled_dim),
            "timestep": torch.empty(1),
            "guidance": torch.empty(1),
            "txt_ids": torch.empty(text_tokens, 3),
            "img_ids": torch.empty(image_tokens, 3),
        }
        counter = FlopCounterMode(display=False)
        with counter, torch.set_grad_enabled(backward):
            out = model(**inputs, return_dict=False)[0]
            if backward:
                out.sum().backward()
    return counter.get_total_flops()


def flux_train_flops(forward: FlopBreakdown, gradient_checkpointing: bool = False) -> float:
    """Forward + backward FLOPs of one LoRA training pass (frozen base), see the module docstring."""
    backward = forward.block_linear + 2 * forward.attention + 2 * forward.lora
    return forward.total + backward + (forward.total if gradient_checkpointing else 0.0)


@dataclass(frozen=True)
class T5Arch:
    """T5 encoder sizes (defaults: T5-v1.1-XXL, FLUX's text encoder)."""

    layers: int = 24
    d_model: int = 4096
    d_ff: int = 10240
    inner: int = 4096  # heads x d_kv


def t5_encoder_flops(arch: T5Arch, tokens: int) -> float:
    """Gated-GELU T5 encoder: q, k, v, o (d x inner) and wi_0, wi_1, wo (d x d_ff) per token, full attention."""
    per_token = 2 * (4 * arch.d_model * arch.inner + 3 * arch.d_model * arch.d_ff)
    return float(arch.layers * (tokens * per_token + 4 * tokens * tokens * arch.inner))


@dataclass(frozen=True)
class Qwen3VLArch:
    """Qwen3-VL sizes (defaults: Qwen3-VL-8B-Instruct's config.json).

    Attributes:
        layers, hidden, intermediate, heads, kv_heads, head_dim, vocab: the language model.
        vision_depth, vision_hidden, vision_intermediate, patch, temporal_patch, merge: the vision tower; an image
            is one temporal patch of ``temporal_patch`` copies, merged ``merge x merge`` into one LLM token.
        deepstack: extra patch mergers feeding intermediate vision features to the LLM.
    """

    layers: int = 36
    hidden: int = 4096
    intermediate: int = 12288
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    vocab: int = 151936
    vision_depth: int = 27
    vision_hidden: int = 1152
    vision_intermediate: int = 4304
    patch: int = 16
    temporal_patch: int = 2
    merge: int = 2
    deepstack: int = 3

    @property
    def lm_params_per_token(self) -> int:
        """Weights every LM token multiplies (attention projections and SwiGLU MLP of all layers)."""
        q_o = 2 * self.hidden * self.heads * self.head_dim
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        return self.layers * (q_o + k_v + 3 * self.hidden * self.intermediate)

    @property
    def lm_bytes_bf16(self) -> int:
        """Bytes of the LM weights read per decode step (bf16, embeddings excluded, LM head included)."""
        return 2 * (self.lm_params_per_token + self.hidden * self.vocab)


def qwen3vl_image_tokens(arch: Qwen3VLArch, side: int) -> tuple[int, int]:
    """(vision patches, LLM tokens) of one ``side`` x ``side`` image."""
    if side % (arch.patch * arch.merge):
        raise ValueError(f"image side {side} must be a multiple of patch x merge = {arch.patch * arch.merge}")
    patches = (side // arch.patch) ** 2
    return patches, patches // (arch.merge**2)


def qwen3vl_prefill_flops(arch: Qwen3VLArch, images: int, side: int, text_tokens: int) -> float:
    """FLOPs of one judge prefill: ``images`` square images of ``side`` pixels plus ``text_tokens`` text tokens
    (the LM head runs on the last position only)."""
    patches, merged = qwen3vl_image_tokens(arch, side)
    hv, iv = arch.vision_hidden, arch.vision_intermediate
    patch_in = 3 * arch.temporal_patch * arch.patch * arch.patch
    vision_per_image = 2 * patches * patch_in * hv
    vision_per_image += arch.vision_depth * (
        2 * patches * (4 * hv * hv + 2 * hv * iv) + 4 * patches * patches * hv
    )
    merged_in = hv * arch.merge**2
    vision_per_image += (1 + arch.deepstack) * 2 * merged * (merged_in * merged_in + merged_in * arch.hidden)
    tokens = images * merged + text_tokens
    lm = 2 * tokens * arch.lm_params_per_token
    lm += arch.layers * 4 * tokens * tokens * arch.heads * arch.head_dim
    lm += 2 * arch.hidden * arch.vocab
    return float(images * vision_per_image + lm)


def qwen3vl_decode_flops(arch: Qwen3VLArch, context: int, new_tokens: int) -> float:
    """FLOPs of generating ``new_tokens`` after ``context`` tokens (weights + attention to the growing cache)."""
    total = 0.0
    for i in range(new_tokens):
        total += 2 * (arch.lm_params_per_token + arch.hidden * arch.vocab)
        total += arch.layers * 4 * (context + i) * arch.heads * arch.head_dim
    return total


@dataclass(frozen=True)
class Hardware:
    """A GPU node.

    Attributes:
        name: label.
        gpus: GPUs in the node.
        peak_flops: dense bf16 peak per GPU (H100 SXM: 989 TFLOP/s).
        utilization: sustained fraction of peak on the big products (model FLOP utilisation).
        memory_bandwidth: HBM bytes/s per GPU (H100 SXM: 3.35 TB/s).
        bandwidth_utilization: sustained fraction of it (decode steps are bandwidth-bound).
    """

    name: str = "8 x H100 SXM"
    gpus: int = 8
    peak_flops: float = 989e12
    utilization: float = 0.40
    memory_bandwidth: float = 3.35e12
    bandwidth_utilization: float = 0.6

    @property
    def sustained_flops(self) -> float:
        return self.peak_flops * self.utilization


@dataclass(frozen=True)
class PaperSetting:
    """One paper-setting iteration, per GPU (data parallel: every GPU runs its own chains).

    Attributes:
        chains_per_gpu: B chains per GPU (the iteration holds gpus x B chains).
        group_size: G.
        num_turns: K.
        num_steps: T.
        window: W trained steps per turn in window mode.
        nft_draws: D noised copies per turn output for NFT.
        nft_reference: NFT computes reference-policy velocities (beta_ref > 0).
        target_tokens: packed target tokens (512 px: 32 x 32 = 1024).
        reference_tokens: packed reference tokens.
        text_tokens: T5 tokens per instruction.
        lora_rank: LoRA rank.
        gradient_checkpointing: recompute activations in backward.
        vae_encode_flops: one 512 px VAE encode (measured on the real architecture, see ``tools/bench.py``).
        vae_decode_flops: one 512 px VAE decode.
        image_side: pixels per side.
        judge_text_tokens: prompt text tokens per judge call (rubric + K instructions).
        judge_output_tokens: generated tokens per judge call (thinking mode writes its analysis first).
    """

    chains_per_gpu: int = 1
    group_size: int = 16
    num_turns: int = 3
    num_steps: int = 12
    window: int = 2
    nft_draws: int = 4
    nft_reference: bool = True
    target_tokens: int = 1024
    reference_tokens: int = 1024
    text_tokens: int = 512
    lora_rank: int = 32
    gradient_checkpointing: bool = False
    vae_encode_flops: float = 1.1176e12
    vae_decode_flops: float = 2.5150e12
    image_side: int = 512
    judge_text_tokens: int = 600
    judge_output_tokens: int = 256

    @property
    def trajectories_per_gpu(self) -> int:
        return self.chains_per_gpu * self.group_size


def rollout_storage_bytes(setting: PaperSetting, loss: str, bytes_per_value: int = 4) -> dict[str, int]:
    """Bytes one GPU's ``Rollout`` holds at ``setting``: recorded states and next states (T steps for "grpo", W for
    "grpo_window", none for "nft") at ``bytes_per_value``, float32 final and reference latents, uint8 images."""
    n, k = setting.trajectories_per_gpu, setting.num_turns
    latent = setting.target_tokens * 64  # packed tokens x 64 channels (16 latent channels, 2 x 2)
    steps = {"grpo": setting.num_steps, "grpo_window": setting.window, "nft": 0}
    if loss not in steps:
        raise ValueError(f"unknown loss {loss!r}; expected one of {sorted(steps)}")
    return {
        "states": 2 * n * k * steps[loss] * latent * bytes_per_value,
        "latents": 2 * n * k * latent * 4,
        "images": n * k * 3 * setting.image_side**2,
    }


@dataclass
class IterationProjection:
    """Projected FLOPs and seconds of one iteration on one GPU (all GPUs work in parallel on their share).

    Attributes:
        flops: FLOPs by phase.
        seconds: seconds by phase (compute-bound phases at the sustained rate; judge decoding bandwidth-bound).
    """

    flops: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


def project_iteration(
    setting: PaperSetting,
    loss: str,
    hardware: Hardware,
    flux: FluxArch | None = None,
    judge: Qwen3VLArch | None = None,
    t5: T5Arch | None = None,
) -> IterationProjection:
    """FLOPs and time of one iteration per GPU for ``loss`` in {"grpo", "grpo_window", "nft"}."""
    flux, judge, t5 = flux or FluxArch(), judge or Qwen3VLArch(), t5 or T5Arch()
    n, k, t = setting.trajectories_per_gpu, setting.num_turns, setting.num_steps
    image_tokens = setting.target_tokens + setting.reference_tokens
    forward = flux_forward_flops(flux, image_tokens, setting.text_tokens, setting.lora_rank)
    train = flux_train_flops(forward, setting.gradient_checkpointing)
    out = IterationProjection()
    out.flops["text"] = setting.chains_per_gpu * k * t5_encoder_flops(t5, setting.text_tokens)
    out.flops["rollout"] = n * k * t * forward.total
    encodes = setting.chains_per_gpu + n * (k - 1)
    out.flops["vae"] = encodes * setting.vae_encode_flops + n * k * setting.vae_decode_flops
    if loss == "grpo":
        out.flops["train"] = n * k * t * train
    elif loss == "grpo_window":
        out.flops["train"] = n * k * setting.window * train
    elif loss == "nft":
        samples = n * k * setting.nft_draws
        no_grad = forward.total * (2 if setting.nft_reference else 1)
        out.flops["nft_old_ref"] = samples * no_grad
        out.flops["train"] = samples * train
    else:
        raise ValueError(f"unknown loss {loss!r}; expected 'grpo', 'grpo_window' or 'nft'")
    prefill = qwen3vl_prefill_flops(judge, k + 1, setting.image_side, setting.judge_text_tokens)
    _, per_image = qwen3vl_image_tokens(judge, setting.image_side)
    context = (k + 1) * per_image + setting.judge_text_tokens
    out.flops["judge_prefill"] = n * prefill
    out.flops["judge_decode"] = n * qwen3vl_decode_flops(judge, context, setting.judge_output_tokens)
    rate = hardware.sustained_flops
    out.seconds = {name: value / rate for name, value in out.flops.items() if name != "judge_decode"}
    # Decoding: every step reads the weights once for all of this GPU's sequences (batched), or is compute-bound.
    step_read = judge.lm_bytes_bf16 / (hardware.memory_bandwidth * hardware.bandwidth_utilization)
    step_compute = out.flops["judge_decode"] / max(setting.judge_output_tokens, 1) / rate
    out.seconds["judge_decode"] = setting.judge_output_tokens * max(step_read, step_compute)
    return out
