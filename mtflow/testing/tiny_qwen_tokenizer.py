"""A tiny Qwen-family tokenizer learned offline: ``Qwen2Tokenizer`` (byte-level BPE) with the real special tokens.

Shared by the tiny Qwen-Image-Edit (Qwen2.5-VL) and FLUX.2-klein (Qwen3) builders; the judge's builder
(``tiny_qwen3vl``) uses the same special tokens and pre-tokenisation. The merges are learned from a small corpus
so that the pipelines' prompts are a realistic number of tokens, not one per byte.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from mtflow.testing.tiny_qwen3vl import PRETOKENIZE_REGEX, SPECIAL_TOKENS

EXTRA_SPECIAL_TOKENS = (
    "<think>",
    "</think>",
)  # Qwen3's thinking tags (the FLUX.2-klein chat template writes them)

# Qwen3's chat template reduced to what FLUX.2-klein's prompt encoder asks for: plain user messages, a generation
# prompt and ``enable_thinking=False`` (an empty thinking block, as the real template writes it).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def build_qwen_tokenizer(corpus: Sequence[str], vocab_size: int = 1024, chat_template: str | None = None):
    """A ``Qwen2Tokenizer`` whose byte-level BPE merges are learned from ``corpus`` (deterministic), with Qwen's
    chat and vision special tokens after the learned vocabulary, as in the real checkpoints."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    specials = (*SPECIAL_TOKENS, *EXTRA_SPECIAL_TOKENS)
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
        vocab_size=vocab_size - len(specials),
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(corpus), trainer=trainer)
    vocab = bpe.get_vocab()
    merges = [
        tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
        for m in json.loads(bpe.to_str())["model"]["merges"]
    ]
    for token in specials:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(specials[1:]),
        model_max_length=32768,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
