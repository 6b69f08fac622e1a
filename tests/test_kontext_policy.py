"""The Kontext adapter against diffusers' own FluxKontextPipeline and the frozen base model."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline, FluxTransformer2DModel
from PIL import Image

from mtflow.data.records import EditChain
from mtflow.models.kontext import KontextPolicy
from mtflow.rollout import RolloutConfig, rollout
from mtflow.sampling import SDEConfig

RES = 32


def _policy(path, **kwargs) -> KontextPolicy:
    kwargs.setdefault("lora_rank", 4)
    return KontextPolicy(str(path), dtype="float32", resolution=RES, max_sequence_length=32, **kwargs).load()


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8))


def _perturb(params, seed: int, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def pipe(tiny_kontext_path):
    pipe = FluxKontextPipeline.from_pretrained(tiny_kontext_path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("num_steps,guidance,seed", [(4, 2.5, 0), (3, 4.0, 5)])
def test_noise_free_rollout_turn1_equals_the_diffusers_pipeline(
    tiny_kontext_path, pipe, num_steps, guidance, seed
):
    policy = _policy(tiny_kontext_path, guidance_scale=guidance)
    source = _image(seed)
    chain = EditChain("c", source, ["change the color of the red circle to blue", "remove the square"])
    config = RolloutConfig(group_size=1, num_steps=num_steps)  # no SDEConfig: deterministic
    result = rollout(policy, [chain], config, generator=torch.Generator().manual_seed(seed))
    call = dict(
        image=source,
        prompt=chain.instructions[0],
        num_inference_steps=num_steps,
        guidance_scale=guidance,
        height=RES,
        width=RES,
        max_area=RES * RES,
        _auto_resize=False,
        max_sequence_length=32,
    )
    latents = pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(seed)).images
    pixels = pipe(**call, output_type="pt", generator=torch.Generator().manual_seed(seed)).images
    torch.testing.assert_close(result.final_latents[:, 0], latents, atol=1e-6, rtol=0)
    torch.testing.assert_close(result.images[:, 0].float(), (pixels * 255).round(), atol=0, rtol=0)


def test_only_lora_is_trainable_and_in_float32(tiny_kontext_path):
    policy = KontextPolicy(str(tiny_kontext_path), dtype="bfloat16", resolution=RES, lora_rank=4)
    policy.load(extra_adapters=["old"])
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".default." in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in policy.adapter_parameters("default"))
    assert all(p.dtype == torch.float32 for p in policy.adapter_parameters("old"))
    assert policy.transformer.x_embedder.weight.dtype == torch.bfloat16
    # Switching adapters must not change which parameters train (peft's set_adapter would).
    with policy.use_adapter("old"), torch.no_grad():
        pass
    with policy.use_adapter(None):
        pass
    assert [n for n, p in policy.named_parameters() if p.requires_grad] == trainable


def test_adapters_switch_and_disable_gives_the_base(tiny_kontext_path):
    policy2 = KontextPolicy(
        str(tiny_kontext_path), dtype="float32", resolution=RES, max_sequence_length=32, lora_rank=4
    )
    policy2.load(extra_adapters=["old"])
    _perturb(policy2.adapter_parameters("default"), 0)
    _perturb(policy2.adapter_parameters("old"), 1)
    text = policy2.encode_text(["make the sky blue"])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, policy2.image_seq_len, 16, generator=gen)
    ref = policy2.encode_reference(policy2.images_to_pixels([_image(1), _image(2)]))
    idx = torch.zeros(2, dtype=torch.long)
    t = torch.tensor(0.7)
    with torch.no_grad():
        v_default = policy2.velocity(x, t, ref, text, idx)
        with policy2.use_adapter("old"):
            v_old = policy2.velocity(x, t, ref, text, idx)
        with policy2.use_adapter(None):
            v_ref = policy2.velocity(x, t, ref, text, idx)
        v_default_again = policy2.velocity(x, t, ref, text, idx)
    assert not torch.allclose(v_default, v_old)
    assert not torch.allclose(v_default, v_ref)
    assert torch.equal(v_default, v_default_again)  # the context restored the trained adapter
    # The disabled adapter is the stock transformer, loaded without any LoRA.
    base = FluxTransformer2DModel.from_pretrained(tiny_kontext_path, subfolder="transformer")
    pipe = policy2._pipeline
    ids = torch.cat(
        [
            pipe._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32),
            pipe._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32).index_fill(
                1, torch.tensor([0]), 1.0
            ),
        ]
    )
    with torch.no_grad():
        out = base(
            hidden_states=torch.cat([x, ref], 1),
            timestep=t.expand(2),
            guidance=torch.full((2,), 2.5),
            pooled_projections=text.pooled_embeds[idx],
            encoder_hidden_states=text.prompt_embeds[idx],
            txt_ids=text.text_ids,
            img_ids=ids,
            return_dict=False,
        )[0][:, : x.shape[1]]
    torch.testing.assert_close(v_ref, out, atol=1e-6, rtol=0)
    # Fresh adapters start at B = 0, i.e. exactly the base.
    fresh = _policy(tiny_kontext_path)
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.velocity(x, t, ref, fresh.encode_text(["make the sky blue"]), idx), out, atol=1e-6, rtol=0
        )


def test_copy_adapter_makes_velocities_equal(tiny_kontext_path):
    policy = KontextPolicy(
        str(tiny_kontext_path), dtype="float32", resolution=RES, lora_rank=4, max_sequence_length=32
    )
    policy.load(extra_adapters=["old"])
    _perturb(policy.adapter_parameters("default"), 3)
    policy.copy_adapter("default", "old")
    text = policy.encode_text(["add a tree"])
    x = torch.randn(1, policy.image_seq_len, 16)
    ref = policy.encode_reference(policy.images_to_pixels([_image(3)]))
    with torch.no_grad():
        a = policy.velocity(x, torch.tensor(0.5), ref, text, torch.zeros(1, dtype=torch.long))
        with policy.use_adapter("old"):
            b = policy.velocity(x, torch.tensor(0.5), ref, text, torch.zeros(1, dtype=torch.long))
    assert torch.equal(a, b)
    with pytest.raises(KeyError, match="unknown adapter"):
        with policy.use_adapter("ema"):
            pass


def test_each_instruction_is_encoded_once_per_call(tiny_kontext_path):
    policy = _policy(tiny_kontext_path, text_cache_size=0)
    seen: list[int] = []
    handle = policy.text_encoder_2.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    chains = [
        EditChain("a", _image(0), ["make it red", "add a circle", "make it red"]),
        EditChain("b", _image(1), ["add a circle", "remove the square", "make it red"]),
    ]
    config = RolloutConfig(group_size=3, num_steps=2)
    result = rollout(policy, chains, config, generator=torch.Generator().manual_seed(0), sde=SDEConfig())
    handle.remove()
    assert seen == [
        3
    ]  # one T5 batch holding the 3 distinct instructions, for 2 chains x 3 trajectories x 3 turns
    assert result.text.texts == ["make it red", "add a circle", "remove the square"]
    assert result.text_index[0].tolist() == [0, 1, 0] and result.text_index[3].tolist() == [1, 2, 0]
    # A cross-call cache avoids re-encoding entirely.
    cached = _policy(tiny_kontext_path, text_cache_size=8)
    cached.encode_text(["make it red"])
    calls = cached.text_encoder_calls
    embeds = cached.encode_text(["make it red", "make it red"])
    assert cached.text_encoder_calls == calls and embeds.prompt_embeds.shape[0] == 1
    fresh = policy.encode_text(["make it red"])
    torch.testing.assert_close(embeds.prompt_embeds, fresh.prompt_embeds)


def test_text_encoding_matches_the_pipeline(tiny_kontext_path, pipe):
    policy = _policy(tiny_kontext_path)
    texts = ["make it red", "a much longer instruction about the upper left corner of the picture"]
    embeds = policy.encode_text(texts)
    for i, t in enumerate(texts):
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(prompt=t, prompt_2=None, max_sequence_length=32)
        torch.testing.assert_close(embeds.prompt_embeds[i : i + 1], prompt_embeds, atol=1e-6, rtol=0)
        torch.testing.assert_close(embeds.pooled_embeds[i : i + 1], pooled, atol=1e-6, rtol=0)
        assert torch.equal(embeds.text_ids, text_ids)


def test_uint8_pixels_round_trip_is_exact(tiny_kontext_path):
    policy = _policy(tiny_kontext_path)
    image = _image(4)
    via_pipeline = policy.images_to_pixels([image])
    as_uint8 = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]
    assert torch.equal(policy.uint8_to_pixels(as_uint8), via_pipeline)


def test_load_errors_name_the_checkpoint(tmp_path):
    policy = KontextPolicy(str(tmp_path / "nowhere"), dtype="float32", local_files_only=True)
    with pytest.raises(OSError, match="nowhere"):
        policy.load()
    with pytest.raises(RuntimeError, match="load"):
        policy.timestep_grid(4)


def test_resolution_must_fit_the_packing(tiny_kontext_path):
    with pytest.raises(ValueError, match="multiple of 4"):
        KontextPolicy(str(tiny_kontext_path), dtype="float32", resolution=30).load()


def test_attention_backend_and_gradient_checkpointing_keep_the_numbers(tiny_kontext_path):
    def run(**kwargs):
        policy = KontextPolicy(
            str(tiny_kontext_path),
            dtype="float32",
            resolution=RES,
            max_sequence_length=32,
            lora_rank=4,
            **kwargs,
        ).load()
        _perturb(policy.adapter_parameters("default"), 5)
        policy.train()
        text = policy.encode_text(["make it red"])
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, policy.image_seq_len, 16, generator=gen)
        ref = torch.randn(2, policy.image_seq_len, 16, generator=gen)
        v = policy.velocity(x, torch.tensor(0.6), ref, text, torch.zeros(2, dtype=torch.long))
        v.square().mean().backward()
        return v.detach(), [p.grad.clone() for p in policy.adapter_parameters("default")], policy

    v_ref, g_ref, plain = run()
    v_native, g_native, native = run(attention_backend="native")
    v_ckpt, g_ckpt, ckpt = run(gradient_checkpointing=True)
    assert ckpt.transformer.is_gradient_checkpointing and not plain.transformer.is_gradient_checkpointing
    # train() must leave the frozen encoders in eval mode (T5 dropout would randomise the cached embeddings)
    assert plain.transformer.training and not plain.text_encoder_2.training and not plain.vae.training
    torch.testing.assert_close(v_native, v_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(v_ckpt, v_ref, atol=1e-6, rtol=0)
    for a, b, c in zip(g_ref, g_native, g_ckpt):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(c, a, atol=1e-6, rtol=1e-5)
    with pytest.raises(Exception, match="not_a_backend|backend"):
        run(attention_backend="not_a_backend")


def test_instructions_longer_than_the_text_budget_are_warned_about_once(tiny_kontext_path):
    policy = KontextPolicy(
        str(tiny_kontext_path), dtype="float32", resolution=RES, max_sequence_length=8
    ).load()
    tokens = len(policy._require_loaded().tokenizer_2("make it red")["input_ids"])
    assert tokens <= 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a short instruction: no warning
        policy.encode_text(["make it red"])
    long = "make it red. Then add a circle. Then remove the square. Then move the tree"
    assert len(policy._require_loaded().tokenizer_2(long)["input_ids"]) > 8
    with pytest.warns(
        UserWarning, match=r"1 of 2 instructions are longer than max_sequence_length=8"
    ) as caught:
        policy.encode_text([long, "add a tree"])
    assert long[:20] in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per policy
        policy.encode_text([long + " again"])
    # the pipeline's own notice (which decodes the cut from CLIP's length: a list of empty strings) is dropped
    pipe = policy._require_loaded()
    notices: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: notices.append(record.getMessage())
    pipeline_logger = logging.getLogger(type(pipe).__module__)
    pipeline_logger.addHandler(handler)
    try:
        policy.encode_text([long + " and more"])
        assert not [n for n in notices if "was truncated because `max_sequence_length`" in n]
        pipe.encode_prompt(prompt=[long + " once more"], prompt_2=None, max_sequence_length=8)
        assert [
            n for n in notices if "was truncated because `max_sequence_length`" in n
        ]  # without the filter
    finally:
        pipeline_logger.removeHandler(handler)
