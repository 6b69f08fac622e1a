"""Build a tiny, randomly initialised Qwen3-VL judge of the real classes, fully offline.

The model is a ``Qwen3VLForConditionalGeneration`` (config adapted from transformers'
tests/models/qwen3_vl, only smaller), the processor a real ``Qwen3VLProcessor`` made of a ``Qwen2Tokenizer``
(byte-level BPE trained locally on the judge's prompt vocabulary, holding the chat and vision special tokens),
a ``Qwen2VLImageProcessor``, a ``Qwen3VLVideoProcessor`` and a Qwen-style chat template. Everything is saved
with ``save_pretrained`` so tests load it through the same ``from_pretrained`` path a hub id takes.

Digits are single tokens (the pre-tokeniser isolates every number character), which the non-thinking judge
mode relies on: it reads the first answer token's probabilities over "1".."5".

    python -m mtflow.testing.tiny_qwen3vl /tmp/tiny-qwen3vl
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

# Special tokens, in the order the real Qwen3-VL vocabulary lists them after the byte-level merges.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The Qwen3-VL chat template, reduced to what a judge needs (no tools): images and videos become
# <|vision_start|><|image_pad|><|vision_end|>, which the processor expands to one pad per merged patch.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# Qwen2's pre-tokenisation regex (numbers are split into single characters).
PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

BASE_TEXT = (
    "a an the of to in on at and or with without from into by it its is this that make turn change replace "
    "add remove delete move put set color colour background shape object left right top bottom center middle "
    "red green blue yellow orange purple pink white black gray brown circle square triangle star small large "
    "image picture photo scene style text number bigger smaller cat dog car tree sky water grass "
    "<Thought> </Thought> <Score> </Score> <Turn1Score> </Turn1Score> <Turn2Score> </Turn2Score> "
    "<Turn3Score> </Turn3Score> <Turn4Score> </Turn4Score> Turn Score Thought"
)


@dataclass
class TinyQwen3VLSpec:
    """Sizes of the tiny judge (defaults: a few ms per forward of a judge prompt on CPU)."""

    vocab_size: int = 1024
    hidden_size: int = 32
    intermediate_size: int = 48
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int = 16
    vision_depth: int = 2
    vision_hidden_size: int = 32
    vision_heads: int = 2
    patch_size: int = 8
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 16 * 16
    max_pixels: int = 128 * 128
    # 10x the real init scale: with 0.02 a random judge gives every prompt nearly the same digit distribution,
    # and tests comparing two routes to the same score would not notice the prompts or images being mixed up.
    initializer_range: float = 0.2


def _training_corpus() -> list[str]:
    """Text the tokenizer's merges are learned from: the judge's own prompts plus common edit words."""
    corpus = [BASE_TEXT]
    try:  # the judge prompts make realistic prompts short; absent prompts only make them longer
        from mtflow.reward.prompts import all_template_texts

        corpus.extend(all_template_texts())
    except ImportError:
        pass
    return corpus


def build_tokenizer(spec: TinyQwen3VLSpec):
    """A ``Qwen2Tokenizer`` with a locally trained byte-level BPE and the Qwen3-VL special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size - len(SPECIAL_TOKENS),
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_training_corpus(), trainer=trainer)
    vocab = bpe.get_vocab()
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in _merges_of(bpe)]
    # Specials come after the learned vocabulary, like in the real checkpoint.
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=32768,
    )
    tokenizer.padding_side = "left"
    return tokenizer


def _merges_of(bpe) -> list:
    import json

    return json.loads(bpe.to_str())["model"]["merges"]


def build_processor(spec: TinyQwen3VLSpec):
    """A real ``Qwen3VLProcessor`` (tokenizer, image processor, video processor, chat template)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    size = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
    image_processor = Qwen2VLImageProcessor(
        size=size,
        patch_size=spec.patch_size,
        temporal_patch_size=spec.temporal_patch_size,
        merge_size=spec.merge_size,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    video_processor = Qwen3VLVideoProcessor(
        size=size,
        patch_size=spec.patch_size,
        temporal_patch_size=spec.temporal_patch_size,
        merge_size=spec.merge_size,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(spec),
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(spec: TinyQwen3VLSpec, tokenizer):
    """A ``Qwen3VLConfig`` whose special token ids point into ``tokenizer``'s vocabulary."""
    from transformers import Qwen3VLConfig

    ids = tokenizer.convert_tokens_to_ids
    half = spec.head_dim // 2
    mrope_section = [half - 2 * (half // 4), half // 4, half // 4]
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "initializer_range": spec.initializer_range,
        "max_position_embeddings": 32768,
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": ids("<|endoftext|>"),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": mrope_section,
            "mrope_interleaved": True,
        },
    }
    vision_config = {
        "depth": spec.vision_depth,
        "hidden_size": spec.vision_hidden_size,
        "intermediate_size": 2 * spec.vision_hidden_size,
        "num_heads": spec.vision_heads,
        "out_hidden_size": spec.hidden_size,
        "patch_size": spec.patch_size,
        "spatial_merge_size": spec.merge_size,
        "temporal_patch_size": spec.temporal_patch_size,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0],
        "initializer_range": spec.initializer_range,
    }
    return Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def build_tiny_qwen3vl(path: str | Path, seed: int = 0, spec: TinyQwen3VLSpec | None = None) -> Path:
    """Build, save and return the folder of a tiny ``Qwen3VLForConditionalGeneration`` + ``Qwen3VLProcessor``.

    Load it back with ``AutoProcessor.from_pretrained(path)`` and
    ``Qwen3VLForConditionalGeneration.from_pretrained(path)``.
    """
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

    spec = spec or TinyQwen3VLSpec()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    processor = build_processor(spec)
    config = build_config(spec, processor.tokenizer)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    args = parser.parse_args(argv)
    print(build_tiny_qwen3vl(args.path, seed=args.seed))


if __name__ == "__main__":
    main()
