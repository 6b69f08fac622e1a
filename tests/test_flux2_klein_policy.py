"""Flux2KleinPolicy against diffusers' own Flux2KleinPipeline: both turns at noise 0 on non-square sources (one
scaled down to the pipeline's 1024 x 1024 area, one kept at its size), prompt encoding, guidance, the FLUX.2
LoRA file layout and its refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image

from mtflow.data.records import EditChain
from mtflow.models.base import EditPolicy
from mtflow.models.flux2_klein import Flux2KleinPolicy
from mtflow.rollout import RolloutConfig, rollout, uint8_to_pil
from mtflow.testing.tiny_flux2_klein import TinyFlux2KleinSpec, build_tiny_flux2_klein

INSTRUCTIONS = ["make it red", "add a circle"]
TEXT = dict(max_sequence_length=32, text_encoder_out_layers=[1, 2])  # the tiny Qwen3 has 2 layers


def _source(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _policy(path, resolution: int = 1024, **kwargs) -> Flux2KleinPolicy:
    kwargs.setdefault("lora_rank", 4)
    return Flux2KleinPolicy(str(path), dtype="float32", resolution=resolution, **TEXT, **kwargs).load()


@pytest.fixture(scope="module")
def pipe(tiny_flux2_klein_path):
    pipe = Flux2KleinPipeline.from_pretrained(tiny_flux2_klein_path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_latents(policy: Flux2KleinPolicy, packed: torch.Tensor, size) -> torch.Tensor:
    """mtflow's packed, normalised latents in the layout the pipeline returns for output_type="latent"."""
    h, w = policy._latent_grid(size)
    z = packed.transpose(1, 2).reshape(packed.shape[0], -1, h, w)
    bn = policy.vae.bn
    z = z * torch.sqrt(
        bn.running_var.view(1, -1, 1, 1) + policy.vae.config.batch_norm_eps
    ) + bn.running_mean.view(1, -1, 1, 1)
    return policy._pipeline._unpatchify_latents(z)


def test_the_tiny_builder_saves_the_real_classes(tiny_flux2_klein_path, pipe):
    from transformers import Qwen2Tokenizer, Qwen3ForCausalLM

    assert type(pipe.text_encoder) is Qwen3ForCausalLM and type(pipe.tokenizer) is Qwen2Tokenizer
    assert type(pipe.transformer).__name__ == "Flux2Transformer2DModel"
    assert type(pipe.vae).__name__ == "AutoencoderKLFlux2" and pipe.vae_scale_factor == 16
    assert pipe.config.is_distilled is False
    assert "<think>" in pipe.tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )


@pytest.mark.parametrize(
    "width,height,resolution,size",
    [
        # above the pipeline's 1024 x 1024 area: scaled down, then cropped (a megapixel through the VAE: slow)
        pytest.param(1400, 900, 1024, (1248, 800), marks=pytest.mark.slow),
        (150, 90, 1024, (128, 64)),  # smaller: kept, cropped to the packing multiple (32 for the tiny VAE)
    ],
)
def test_noise_free_turns_equal_the_stock_pipeline(
    tiny_flux2_klein_path, pipe, width, height, resolution, size
):
    policy = _policy(tiny_flux2_klein_path, resolution=resolution)
    source = _source(width, height)
    result = rollout(
        policy,
        [EditChain("c", source, INSTRUCTIONS)],
        RolloutConfig(group_size=1, num_steps=3),
        torch.Generator().manual_seed(0),
    )
    assert result.image_size == size and result.images.shape[-2:] == (size[1], size[0])
    call = dict(
        guidance_scale=4.0, num_inference_steps=3, max_sequence_length=32, text_encoder_out_layers=(1, 2)
    )

    def stock(image, prompt, **kwargs):  # noise from a fresh generator (seed 0) unless latents are given
        runs = [
            pipe(
                image=image,
                prompt=prompt,
                **call,
                **kwargs,
                generator=torch.Generator().manual_seed(0),
                output_type=kind,
            )
            for kind in ("latent", "pt")
        ]
        return runs[0].images, (runs[1].images * 255).round()

    latents, pixels = stock(source, INSTRUCTIONS[0])
    torch.testing.assert_close(
        _pipeline_latents(policy, result.final_latents[:, 0], size), latents, atol=1e-5, rtol=0
    )
    assert (result.images[:, 0].float() - pixels).abs().max() <= 1  # within one grey level
    # Turn 2: the pipeline on turn 1's decoded image, from the latent turn 2 started at (in the pipeline's
    # patchified [B, C, h, w] layout)
    gen = torch.Generator().manual_seed(0)
    policy.initial_noise(1, gen, size)
    start = policy.initial_noise(1, gen, size)
    h, w = policy._latent_grid(size)
    latents, pixels = stock(
        uint8_to_pil(result.images[0, 0]), INSTRUCTIONS[1], latents=start.mT.reshape(1, -1, h, w)
    )
    torch.testing.assert_close(
        _pipeline_latents(policy, result.final_latents[:, 1], size), latents, atol=1e-5, rtol=0
    )
    assert (result.images[:, 1].float() - pixels).abs().max() <= 1
    assert (result.final_latents[:, 1] - result.final_latents[:, 0]).abs().max() > 1e-2  # a real second turn


def test_text_rows_equal_the_pipeline_prompt_encoding_and_are_cached(tiny_flux2_klein_path, pipe):
    policy = _policy(tiny_flux2_klein_path, text_cache_size=8)
    rows = policy.encode_text(["make it red", "add a circle", "make it red"])
    assert rows.texts == ["make it red", "add a circle"] and policy.text_encoder_calls == 1
    for i, text in enumerate(rows.texts):
        expected, text_ids = pipe.encode_prompt(
            prompt=text, max_sequence_length=32, text_encoder_out_layers=(1, 2)
        )
        torch.testing.assert_close(rows.prompt_embeds[i : i + 1], expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(rows.text_ids, text_ids[0])
    negative, _ = pipe.encode_prompt(prompt="", max_sequence_length=32, text_encoder_out_layers=(1, 2))
    torch.testing.assert_close(rows.negative_embeds, negative.expand(2, -1, -1), atol=1e-5, rtol=1e-5)
    policy.encode_text(["add a circle"])  # cached, the empty negative too
    assert policy.text_encoder_calls == 1


def test_guidance_runs_two_passes_and_a_distilled_checkpoint_none(tiny_flux2_klein_path, tmp_path):
    distilled_path = build_tiny_flux2_klein(tmp_path / "distilled", TinyFlux2KleinSpec(distilled=True))
    with pytest.raises(ValueError, match="step-distilled.*guidance_scale: 1.0"):
        _policy(distilled_path)  # the default 4.0 does not apply
    for path, scale, passes in ((tiny_flux2_klein_path, 4.0, 2), (distilled_path, 1.0, 1)):
        policy = _policy(path, guidance_scale=scale, resolution=64)
        calls = []
        policy.transformer.register_forward_hook(lambda *args, calls=calls: calls.append(1))
        source = _source(64, 64)
        rollout(policy, [EditChain("c", source, INSTRUCTIONS[:1])], RolloutConfig(group_size=1, num_steps=2))
        assert len(calls) == 2 * passes  # 2 steps


def test_lora_files_use_flux2_original_names_and_load_back(tiny_flux2_klein_path, tmp_path):
    from safetensors.torch import load_file

    from mtflow.export import export_policy

    policy = _policy(tiny_flux2_klein_path, lora_alpha=8, lora_feed_forward=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.adapter_parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    tensors = load_file(export_policy(policy, tmp_path))
    assert all(k.startswith("diffusion_model.") and ".alpha" not in k for k in tensors)
    qkv_a, qkv_b = (
        tensors["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"],
        tensors["diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight"],
    )
    assert qkv_a.shape[0] == 3 * 4 and qkv_b.shape[1] == 3 * 4  # q, k, v stacked: rank 3r
    names = dict(policy.adapter_named_parameters())
    # B carries alpha / r = 2; the fused update of q is exactly the adapter's scale * B_q A_q
    q_update = qkv_b[: qkv_b.shape[0] // 3] @ qkv_a
    expected = (
        2.0
        * names["transformer_blocks.0.attn.to_q.lora_B.weight"]
        @ names["transformer_blocks.0.attn.to_q.lora_A.weight"]
    )
    torch.testing.assert_close(q_update, expected.detach(), atol=1e-6, rtol=1e-6)
    for key in ("single_blocks.0.linear1", "double_blocks.0.txt_attn.proj", "double_blocks.0.img_mlp.2"):
        assert f"diffusion_model.{key}.lora_A.weight" in tensors, key
    fresh = _policy(tiny_flux2_klein_path, lora_alpha=8, lora_feed_forward=True)
    fresh.load_lora_file(tmp_path / "pytorch_lora_weights.safetensors")
    for (name, loaded), original in zip(fresh.adapter_named_parameters(), policy.adapter_parameters()):
        torch.testing.assert_close(loaded, original, atol=1e-7, rtol=1e-6, msg=name)


def test_the_policy_implements_the_protocol_and_refuses_what_does_not_apply(
    tiny_flux2_klein_path, tiny_kontext_path
):
    from jsonargparse._typehints import implements_protocol

    assert implements_protocol(Flux2KleinPolicy, EditPolicy)
    policy = _policy(tiny_flux2_klein_path)
    assert isinstance(policy, EditPolicy)
    with pytest.raises(ValueError, match="instruction only"):
        policy.encode_text(["make it red"], [_source(64, 64)])
    with pytest.raises(ValueError, match="share one edit size"):
        policy.images_to_pixels([_source(150, 90), _source(90, 150)])
    with pytest.raises(ValueError, match="holds a FluxKontextPipeline"):
        Flux2KleinPolicy(str(tiny_kontext_path), dtype="float32").load()
    with pytest.raises(ValueError, match="guidance_scale must be >= 1"):
        Flux2KleinPolicy(str(tiny_flux2_klein_path), guidance_scale=0.5)
