"""QwenImageEditPolicy against diffusers' own Qwen-Image-Edit pipelines (Plus and the first one), a float64
Gaussian under true classifier-free guidance, and its own recorded rollouts."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from mtflow.data.records import EditChain
from mtflow.models.base import EditPolicy
from mtflow.models.qwen_image_edit import QwenImageEditPolicy
from mtflow.rollout import RolloutConfig, recompute_transition, rollout, transition_batches, uint8_to_pil
from mtflow.sampling import SDEConfig, sde_step
from mtflow.testing.tiny_qwen_image_edit import TinyQwenImageEditSpec, build_tiny_qwen_image_edit

AREA_SIDE = 256  # the pixel area side the policies run at (the pipelines' own is 1024; see pipeline_area)
INSTRUCTIONS = ["make it red", "add a circle"]


def _source(width: int = 150, height: int = 90, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _policy(path, resolution: int = AREA_SIDE, **kwargs) -> QwenImageEditPolicy:
    kwargs.setdefault("lora_rank", 4)
    return QwenImageEditPolicy(str(path), dtype="float32", resolution=resolution, **kwargs).load()


def _perturb(params, seed: int, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def edit_path(tmp_path_factory):
    """The first Qwen-Image-Edit's layout (QwenImageEditPipeline)."""
    return build_tiny_qwen_image_edit(
        tmp_path_factory.mktemp("models") / "tiny-qwen-image-edit-v1", TinyQwenImageEditSpec(variant="edit")
    )


@pytest.fixture
def pipeline_area(monkeypatch):
    """The stock pipelines size every image with ``calculate_dimensions(1024 * 1024, ratio)``; a 1024 x 1024 image
    through the tiny 3-D VAE takes ~15 s on a CPU, so the tests run the pipelines' own sizing code at the policy's
    area instead: ``calculate_dimensions`` of both pipeline modules sees AREA_SIDE ** 2 where the pipeline asks for
    1024 ** 2 (the Plus pipeline's 384 x 384 VL size is left alone). test_default_sizing_at_the_real_area runs the
    unpatched pipeline."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit_module
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus_module

    for module in (edit_module, plus_module):
        original = module.calculate_dimensions

        def at_policy_area(area, ratio, original=original):
            return original(AREA_SIDE * AREA_SIDE if area == 1024 * 1024 else area, ratio)

        monkeypatch.setattr(module, "calculate_dimensions", at_policy_area)


def _stock(path):
    pipe = DiffusionPipeline.from_pretrained(str(path), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_tiny_builders_save_the_real_classes(tiny_qwen_image_edit_path, edit_path):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLProcessor

    for path, pipeline in (
        (tiny_qwen_image_edit_path, "QwenImageEditPlusPipeline"),
        (edit_path, "QwenImageEditPipeline"),
    ):
        pipe = _stock(path)
        assert type(pipe).__name__ == pipeline
        assert type(pipe.processor) is Qwen2VLProcessor  # not a bare tokenizer (torchvision present)
        assert type(pipe.processor.image_processor).__name__.startswith("Qwen2VLImageProcessor")
        assert type(pipe.tokenizer) is Qwen2Tokenizer
        assert type(pipe.text_encoder) is Qwen2_5_VLForConditionalGeneration
        assert type(pipe.transformer).__name__ == "QwenImageTransformer2DModel"
        assert type(pipe.vae).__name__ == "AutoencoderKLQwenImage" and pipe.vae_scale_factor == 16


@pytest.mark.parametrize("variant", ["plus", "edit"])
def test_noise_free_turns_equal_the_stock_pipeline(
    variant, tiny_qwen_image_edit_path, edit_path, pipeline_area
):
    path = tiny_qwen_image_edit_path if variant == "plus" else edit_path
    policy, pipe = _policy(path), _stock(path)
    source = _source()  # 150 x 90: not square
    chain = EditChain("c", source, INSTRUCTIONS)
    result = rollout(
        policy, [chain], RolloutConfig(group_size=1, num_steps=3), torch.Generator().manual_seed(0)
    )
    assert result.image_size == (320, 192)  # calculate_dimensions(256 ** 2, 150 / 90): aspect kept
    assert result.images.shape[-2:] == (192, 320)
    call = dict(negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=3)

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
    torch.testing.assert_close(result.final_latents[:, 0], latents, atol=1e-5, rtol=0)
    assert (result.images[:, 0].float() - pixels).abs().max() <= 1  # within one grey level
    # Turn 2 is the pipeline run on turn 1's decoded image, from the latent turn 2 started at.
    gen = torch.Generator().manual_seed(0)
    policy.initial_noise(1, gen, result.image_size)
    start = policy.initial_noise(1, gen, result.image_size)
    latents, pixels = stock(uint8_to_pil(result.images[0, 0]), INSTRUCTIONS[1], latents=start)
    torch.testing.assert_close(result.final_latents[:, 1], latents, atol=1e-5, rtol=0)
    assert (result.images[:, 1].float() - pixels).abs().max() <= 1
    assert (result.final_latents[:, 1] - result.final_latents[:, 0]).abs().max() > 1e-2  # a real second turn


@pytest.mark.slow
def test_default_sizing_at_the_real_area(tiny_qwen_image_edit_path):
    """The unpatched Plus pipeline with its default sizing (1024 x 1024 pixel area) against the policy at
    resolution 1024, turn 1 (~30 s: the tiny 3-D VAE on a megapixel image)."""
    policy, pipe = _policy(tiny_qwen_image_edit_path, resolution=1024), _stock(tiny_qwen_image_edit_path)
    source = _source()
    result = rollout(
        policy,
        [EditChain("c", source, INSTRUCTIONS[:1])],
        RolloutConfig(group_size=1, num_steps=2),
        torch.Generator().manual_seed(0),
    )
    assert result.image_size == (1312, 800)
    latents = pipe(
        image=source,
        prompt=INSTRUCTIONS[0],
        negative_prompt=" ",
        true_cfg_scale=4.0,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    torch.testing.assert_close(result.final_latents[:, 0], latents, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["plus", "edit"])
def test_batched_text_rows_equal_the_pipeline_prompt_encoding(
    variant, tiny_qwen_image_edit_path, edit_path, pipeline_area
):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus_module

    path = tiny_qwen_image_edit_path if variant == "plus" else edit_path
    policy, pipe = _policy(path), _stock(path)
    images = [_source(seed=1), _source(96, 160, seed=2)]
    texts = ["make it red", "replace the sky with a sunset and turn the cat into a dog"]
    rows = policy.encode_text(texts, images)
    assert rows.prompt_mask.shape == rows.prompt_embeds.shape[:2] and not bool(
        rows.prompt_mask.all()
    )  # padded
    for i, (text, image) in enumerate(zip(texts, images)):
        width, height = image.size
        if variant == "plus":  # the pipeline's VL image: 384 x 384 pixel area
            vl_w, vl_h = plus_module.calculate_dimensions(plus_module.CONDITION_IMAGE_SIZE, width / height)
            vl_image = [pipe.image_processor.resize(image, vl_h, vl_w)]
        else:  # the first pipeline's VL image is its VAE image
            vl_w, vl_h = plus_module.calculate_dimensions(AREA_SIDE * AREA_SIDE, width / height)
            vl_image = pipe.image_processor.resize(image, vl_h, vl_w)
        for prompt, embeds, mask in (
            (text, rows.prompt_embeds, rows.prompt_mask),
            (" ", rows.negative_embeds, rows.negative_mask),
        ):
            expected, _ = pipe.encode_prompt(prompt=prompt, image=vl_image)
            length = int(mask[i].sum())
            assert length == expected.shape[1]
            torch.testing.assert_close(embeds[i : i + 1, :length], expected, atol=1e-5, rtol=1e-5)


def test_guided_sde_log_prob_matches_a_float64_gaussian(tiny_qwen_image_edit_path):
    policy = _policy(tiny_qwen_image_edit_path)
    _perturb(policy.adapter_parameters(), 3)
    source = _source()
    size = policy.edit_size(source.size)
    text = policy.encode_text(INSTRUCTIONS[:1] * 2, [source, source])
    reference = policy.encode_reference(policy.images_to_pixels([source, source]))
    grid = policy.timestep_grid(4, size)
    gen = torch.Generator().manual_seed(5)
    x = policy.initial_noise(2, gen, size)
    i, a = 1, 0.9
    index = torch.tensor([0, 1])
    with torch.no_grad():
        v = policy.velocity(x, grid.model_timesteps[i], reference, text, index, size)
    z = torch.randn(x.shape, generator=gen)
    step = sde_step(x, v, grid.sigmas[i], grid.sigmas[i + 1], a, noise=z)

    # float64: the same LoRA-adapted transformer in float64, guidance and the SDE written out (docs/design.md s. 3)
    transformer = copy.deepcopy(policy.transformer).double()
    h, w = size[1] // 32, size[0] // 32
    common = dict(
        hidden_states=torch.cat([x, reference], 1).double(),
        timestep=grid.model_timesteps[i].double().expand(2),
        img_shapes=[[(1, h, w), (1, h, w)]] * 2,
        return_dict=False,
    )
    with torch.no_grad():
        cond = transformer(encoder_hidden_states=text.prompt_embeds.double(), **common)[0][:, : x.shape[1]]
        uncond = transformer(encoder_hidden_states=text.negative_embeds.double(), **common)[0][
            :, : x.shape[1]
        ]
    guided = uncond + 4.0 * (cond - uncond)
    guided = guided * (cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))

    def gaussian64(velocity):  # mean and log-density of the transition at the recorded x'
        s, s_next = float(grid.sigmas[i]), float(grid.sigmas[i + 1])
        delta = s - s_next
        g = a * math.sqrt(s / (1 - s))
        x64 = x.double()
        mean = x64 - delta * velocity - delta * g**2 / (2 * s) * (x64 + (1 - s) * velocity)
        std = g * math.sqrt(delta)
        per = (
            -((step.x_next.double() - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
        )
        return mean, per.flatten(1).mean(1)

    mean, log_prob = gaussian64(guided)
    torch.testing.assert_close(step.mean.double(), mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step.log_prob.double(), log_prob, atol=2e-5, rtol=1e-6)
    # the check can fail: the unguided (conditional) velocity gives another Gaussian
    assert (gaussian64(cond)[0] - step.mean.double()).abs().max() > 1e-2


def test_recomputed_log_probs_of_a_recorded_rollout_give_ratio_exactly_one(tiny_qwen_image_edit_path):
    policy = _policy(tiny_qwen_image_edit_path)
    _perturb(policy.adapter_parameters(), 4)
    chains = [
        EditChain("a", _source(seed=0), ["make it red", "add a circle"]),
        EditChain("b", _source(seed=1), ["replace the sky with a sunset", "move the tree left"]),
    ]
    config = RolloutConfig(group_size=2, num_steps=2, forward_batch_size=3)  # uneven micro-batches
    result = rollout(policy, chains, config, torch.Generator().manual_seed(0), sde=SDEConfig(noise_level=0.9))
    # one row per chain for turn 1, one per trajectory for turn 2, padded to the longest
    assert result.text.num_rows == 2 + 4 and not bool(result.text.prompt_mask.all())
    assert result.text_index[:, 0].tolist() == [0, 0, 1, 1] and result.text_index[:, 1].tolist() == [
        2,
        3,
        4,
        5,
    ]
    with torch.no_grad():
        for batch in transition_batches(result, config.forward_batch_size):
            log_prob, *_ = recompute_transition(policy, result, batch)
            recorded = result.log_probs[batch.trajectories, batch.turn, batch.step]
            assert torch.equal(log_prob, recorded), batch
    # the trained adapter is really in the velocity: the frozen base gives other log-probs
    with torch.no_grad(), policy.use_adapter(None):
        base, *_ = recompute_transition(policy, result, transition_batches(result, 3)[0])
    assert not torch.equal(base, result.log_probs[0:3, 0, 0])


def test_lora_targets_exist_and_only_the_lora_trains(tiny_qwen_image_edit_path):
    policy = QwenImageEditPolicy(
        str(tiny_qwen_image_edit_path), dtype="bfloat16", resolution=64, lora_rank=4, lora_feed_forward=True
    ).load(extra_adapters=["old"])
    blocks = len(policy.transformer.transformer_blocks)
    adapted = {name.rsplit(".lora_", 1)[0] for name, _ in policy.adapter_named_parameters()}
    assert len(adapted) == blocks * (
        8 + 4
    )  # every attention projection and feed-forward layer of every block
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".default." in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in policy.adapter_parameters("old"))
    assert policy.transformer.img_in.weight.dtype == torch.bfloat16
    assert len(policy.fsdp_units()) == blocks + 1


def test_the_policy_implements_the_protocol_as_jsonargparse_checks_it(tiny_qwen_image_edit_path):
    from jsonargparse._typehints import implements_protocol

    assert implements_protocol(QwenImageEditPolicy, EditPolicy)
    assert isinstance(_policy(tiny_qwen_image_edit_path, lora_rank=0), EditPolicy)


def test_settings_and_inputs_that_do_not_apply_are_refused(tiny_qwen_image_edit_path, tiny_kontext_path):
    with pytest.raises(ValueError, match="negative_prompt"):
        QwenImageEditPolicy(str(tiny_qwen_image_edit_path), true_cfg_scale=1.0)
    assert not QwenImageEditPolicy(
        str(tiny_qwen_image_edit_path), true_cfg_scale=1.0, negative_prompt=None
    ).guided
    with pytest.raises(ValueError, match="holds a FluxKontextPipeline"):
        QwenImageEditPolicy(str(tiny_kontext_path), dtype="float32").load()
    policy = _policy(tiny_qwen_image_edit_path)
    with pytest.raises(ValueError, match="reads the image"):
        policy.encode_text(["make it red"])
    with pytest.raises(ValueError, match="share one edit size"):
        policy.images_to_pixels([_source(150, 90), _source(90, 150)])
    x = policy.initial_noise(1, None, (320, 192))
    with pytest.raises(ValueError, match="pass the size"):
        policy.decode(x)  # a 320 x 192 latent read as the square
