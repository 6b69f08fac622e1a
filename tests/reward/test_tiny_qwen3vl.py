"""The tiny Qwen3-VL fixture loads through the real from_pretrained paths with a real multimodal processor."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file


def test_loads_as_real_classes(tiny_qwen3vl_path):
    from transformers import (
        AutoProcessor,
        Qwen2VLImageProcessor,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    processor = AutoProcessor.from_pretrained(tiny_qwen3vl_path)
    # AutoProcessor silently returns a bare tokenizer when the video processor cannot be built.
    assert type(processor) is Qwen3VLProcessor
    assert isinstance(processor.image_processor, Qwen2VLImageProcessor)
    assert isinstance(processor.video_processor, Qwen3VLVideoProcessor)
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_qwen3vl_path)
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.video_token_id == processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert model.config.vision_start_token_id == processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert model.get_input_embeddings().num_embeddings == len(processor.tokenizer)


def test_tokenizer_special_tokens_and_digits(tiny_qwen3vl_path):
    from transformers import AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(tiny_qwen3vl_path).tokenizer
    for token in [
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]:
        assert tokenizer.encode(token, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(token)]
    digit_ids = [tokenizer.encode(d, add_special_tokens=False) for d in "012345"]
    assert all(len(ids) == 1 for ids in digit_ids) and len({ids[0] for ids in digit_ids}) == 6
    # Digits stay single tokens inside running text, which is what the first answer token is.
    ids = tokenizer.encode("Score: 45", add_special_tokens=False)
    assert ids[-2:] == [digit_ids[4][0], digit_ids[5][0]]
    text = "Add a red circle, then <Turn1Score>4</Turn1Score> ünïcødé"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_chat_template_and_image_expansion(tiny_qwen3vl_path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_qwen3vl_path)
    image = Image.fromarray(np.zeros((48, 64, 3), dtype=np.uint8))
    messages = [
        {"role": "system", "content": "Be a judge."},
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image", "image": image}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe a judge.<|im_end|>\n<|im_start|>user\nLook:<|vision_start|><|image_pad|>"
        "<|vision_end|><|im_end|>\n<|im_start|>assistant\n"
    )
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    # 64x48 pixels, patch 8 -> an 8x6 patch grid; 2x2 merging -> 12 image tokens.
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 8]]
    pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == pad_id).sum()) == 12


def test_build_is_deterministic(tmp_path, tiny_qwen3vl_path):
    from mtflow.testing.tiny_qwen3vl import build_tiny_qwen3vl

    again = build_tiny_qwen3vl(tmp_path / "again", seed=0)
    first, second = load_file(tiny_qwen3vl_path / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (tiny_qwen3vl_path / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()
    other = load_file(build_tiny_qwen3vl(tmp_path / "other", seed=1) / "model.safetensors")
    assert not torch.equal(first["lm_head.weight"], other["lm_head.weight"])
