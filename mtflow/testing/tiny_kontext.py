"""Build a tiny, randomly initialised FLUX.1-Kontext pipeline of the real classes, fully offline.

Every component is the class the real checkpoint uses (diffusers ``FluxTransformer2DModel`` with guidance
embedding, ``AutoencoderKL``, ``FlowMatchEulerDiscreteScheduler``; transformers ``CLIPTextModel`` +
``CLIPTokenizer`` and ``T5EncoderModel`` + ``T5Tokenizer``), only small. Tokenizers are built from a local word
list: a byte-level BPE trained with ``tokenizers`` for CLIP, a Unigram vocabulary for T5. The pipeline is saved
with ``save_pretrained`` so that tests load it through the same ``from_pretrained`` path a hub id takes.

    python -m mtflow.testing.tiny_kontext /tmp/tiny-kontext
"""

from __future__ import annotations

import argparse
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# Words every tiny tokenizer knows as whole tokens; anything else falls back to characters.
BASE_WORDS = (
    "a an the of to in on at and or with without from into by it its is this that make turn change replace "
    "add remove delete move put set color colour background shape object left right top bottom upper lower "
    "center centre middle corner next near behind front above below side new same all one two three four "
    "red green blue yellow orange purple pink white black gray grey brown cyan magenta circle square "
    "triangle star cross ring diamond hexagon heart small large big tiny image picture photo scene style "
    "material text count number bigger smaller more less painting squirrel eating burger cat dog car tree "
    "sky water grass wood metal glass stone"
).split()

CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()[]/&"


@dataclass
class TinyKontextSpec:
    """Sizes of the tiny pipeline (defaults: fast enough for unit tests)."""

    num_layers: int = 1
    num_single_layers: int = 1
    attention_head_dim: int = 16
    num_attention_heads: int = 2
    axes_dims_rope: tuple[int, int, int] = (4, 4, 8)
    text_width: int = 32
    clip_layers: int = 2
    t5_layers: int = 2
    vae_block_out_channels: tuple[int, ...] = (8, 16)
    vae_norm_num_groups: int = 4
    latent_channels: int = 4
    vae_shift_factor: float = 0.0609
    vae_scaling_factor: float = 1.5035
    tokenizer_max_length: int = 77
    extra_words: list[str] = field(default_factory=list)


def _vocabulary(extra_words: list[str]) -> list[str]:
    words = {w.lower() for w in BASE_WORDS}
    for w in extra_words:
        words.update(re.findall(r"[a-z0-9]+", w.lower()))
    return sorted(words)


def _learn_bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Deterministic BPE: merge the most frequent adjacent pair (ties: lexicographically smallest) until every word
    is one symbol. (The ``tokenizers`` trainer breaks ties by hash order, which differs between runs.)"""
    corpus = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(set(words)) if w]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in corpus:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        joined = best[0] + best[1]
        for i, symbols in enumerate(corpus):
            out, j = [], 0
            while j < len(symbols):
                if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == best:
                    out.append(joined)
                    j += 2
                else:
                    out.append(symbols[j])
                    j += 1
            corpus[i] = out


def build_clip_tokenizer(words: list[str], model_max_length: int = 77):
    """A ``CLIPTokenizer`` (byte-level BPE) whose merges are learned locally so that each of ``words`` is one token."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>"] + alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(token, len(vocab))
    merges = _learn_bpe_merges([w for w in words if w.isascii() and w.isalnum()])
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def build_t5_tokenizer(words: list[str], model_max_length: int = 512):
    """A ``T5Tokenizer`` with a Unigram vocabulary: every word of ``words`` is one piece, characters back it up."""
    from transformers import T5Tokenizer

    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    seen = {p for p, _ in vocab}
    for w in words:
        for piece in ("\u2581" + w, "\u2581" + w.capitalize()):  # T5 does not lowercase
            if piece not in seen:
                vocab.append((piece, -2.0))
                seen.add(piece)
    for c in CHARACTERS:
        for piece in (c, "\u2581" + c):
            if piece not in seen:
                vocab.append((piece, -12.0))
                seen.add(piece)
    return T5Tokenizer(
        vocab=vocab, extra_ids=0, additional_special_tokens=[], model_max_length=model_max_length
    )


def build_tiny_kontext_components(spec: TinyKontextSpec | None = None, seed: int = 0, vae=None) -> dict:
    """Instantiate the components of a tiny ``FluxKontextPipeline`` (random weights, seeded); a given ``vae`` (an
    ``AutoencoderKL`` with ``spec.latent_channels``) is used instead of a random one."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    spec = spec or TinyKontextSpec()
    words = _vocabulary(spec.extra_words)
    tokenizer = build_clip_tokenizer(words, spec.tokenizer_max_length)
    tokenizer_2 = build_t5_tokenizer(words)

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * spec.latent_channels,
        num_layers=spec.num_layers,
        num_single_layers=spec.num_single_layers,
        attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=spec.text_width,
        pooled_projection_dim=spec.text_width,
        guidance_embeds=True,
        axes_dims_rope=tuple(spec.axes_dims_rope),
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_width,
            intermediate_size=2 * spec.text_width,
            num_hidden_layers=spec.clip_layers,
            num_attention_heads=4,
            max_position_embeddings=spec.tokenizer_max_length,
            projection_dim=spec.text_width,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_act="gelu",
        )
    )
    torch.manual_seed(seed + 2)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=spec.text_width,
            d_kv=8,
            d_ff=2 * spec.text_width,
            num_layers=spec.t5_layers,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id,
        )
    )
    if vae is None:
        vae = _random_vae(spec, seed)
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return {
        "scheduler": scheduler,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "transformer": transformer,
        "vae": vae,
        "image_encoder": None,
        "feature_extractor": None,
    }


def build_tiny_kontext(path: str | Path, spec: TinyKontextSpec | None = None, seed: int = 0) -> Path:
    """Build the tiny pipeline and ``save_pretrained`` it to ``path`` (a hub-style folder). Returns the path."""
    from diffusers import FluxKontextPipeline

    path = Path(path)
    spec = spec or TinyKontextSpec()
    pipe = FluxKontextPipeline(**build_tiny_kontext_components(spec, seed))
    pipe.save_pretrained(path, safe_serialization=True)
    (path / "tiny_spec.json").write_text(__import__("json").dumps(asdict(spec), indent=2))
    return path


def main(argv: list[str] | None = None) -> None:
    """``python -m mtflow.testing.tiny_kontext DIR``: build the tiny pipeline into DIR and print its path."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output", type=Path, help="folder to write the pipeline to")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_kontext(args.output, seed=args.seed))


def _random_vae(spec: TinyKontextSpec, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 3)  # after the other components: their weights do not depend on it
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_block_out_channels),
        block_out_channels=tuple(spec.vae_block_out_channels),
        layers_per_block=1,
        latent_channels=spec.latent_channels,
        norm_num_groups=spec.vae_norm_num_groups,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=spec.vae_shift_factor,
        scaling_factor=spec.vae_scaling_factor,
        sample_size=32,
    )


if __name__ == "__main__":  # last: every function it calls must be defined by now
    main()
