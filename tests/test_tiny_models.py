"""The tiny Kontext pipeline is made of the real classes and round-trips through save_pretrained / from_pretrained."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxTransformer2DModel,
)
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from mtflow.testing.tiny_kontext import TinyKontextSpec, build_tiny_kontext_components


def test_components_are_the_real_classes(tiny_kontext_path):
    pipe = FluxKontextPipeline.from_pretrained(tiny_kontext_path)
    assert isinstance(pipe.transformer, FluxTransformer2DModel) and pipe.transformer.config.guidance_embeds
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.text_encoder_2, T5EncoderModel) and isinstance(pipe.tokenizer_2, T5Tokenizer)
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels
    assert pipe.scheduler.config.use_dynamic_shifting


def test_weights_and_tokenizers_round_trip(tiny_kontext_path):
    built = build_tiny_kontext_components(TinyKontextSpec(), seed=0)  # same seed as the fixture
    loaded = FluxKontextPipeline.from_pretrained(tiny_kontext_path)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        expected = built[name].state_dict()
        got = getattr(loaded, name).state_dict()
        assert expected.keys() == got.keys(), name
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"{name}.{key}"
    text = "Change the color of the red circle to blue"
    for name in ("tokenizer", "tokenizer_2"):
        assert built[name](text)["input_ids"] == getattr(loaded, name)(text)["input_ids"]


def test_tokenizers_keep_known_words_whole(tiny_kontext_path):
    pipe = FluxKontextPipeline.from_pretrained(tiny_kontext_path)
    assert pipe.tokenizer.tokenize("change the red circle") == [
        "change</w>",
        "the</w>",
        "red</w>",
        "circle</w>",
    ]
    assert pipe.tokenizer_2.tokenize("Change the red circle") == [
        "\u2581Change",
        "\u2581the",
        "\u2581red",
        "\u2581circle",
    ]
    # unknown words fall back to characters instead of <unk>
    assert pipe.tokenizer_2.unk_token_id not in pipe.tokenizer_2("zebra")["input_ids"]
    ids = pipe.tokenizer("make it blue")["input_ids"]
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
