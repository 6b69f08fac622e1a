"""Build a tiny, randomly initialised FLUX.2-klein pipeline of the real classes, fully offline.

Every component is the class the real checkpoints use (diffusers ``Flux2Transformer2DModel``,
``AutoencoderKLFlux2``, ``FlowMatchEulerDiscreteScheduler``; transformers ``Qwen3ForCausalLM`` with a
``Qwen2Tokenizer`` holding Qwen3's chat template), only small; sizes follow diffusers' own tests
(tests/pipelines/flux2/). The tokenizer is a byte-level BPE learned locally (``tiny_qwen_tokenizer``). The VAE
downsamples 16x (the real one 8x) so that a source at the pipeline's 1024 x 1024 pixel cap is ~1000 tokens.
``distilled`` writes ``is_distilled`` into the pipeline config (FLUX.2-klein-4B / 9B are step-distilled and
sample without classifier-free guidance; the -base checkpoints use it).

    python -m mtflow.testing.tiny_flux2_klein /tmp/tiny-flux2-klein
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mtflow.testing.tiny_qwen_tokenizer import QWEN3_CHAT_TEMPLATE, build_qwen_tokenizer

CORPUS = (
    "make it red add remove change the color of the circle square background to blue green yellow replace the "
    "sky with a sunset turn the cat into a dog move the tree left right a an the of to in on with user assistant"
)


@dataclass
class TinyFlux2KleinSpec:
    """Sizes of the tiny pipeline."""

    num_layers: int = 1
    num_single_layers: int = 1
    attention_head_dim: int = 16
    num_attention_heads: int = 2
    axes_dims_rope: tuple[int, int, int, int] = (4, 4, 4, 4)
    text_hidden_size: int = 16
    text_layers: int = 2
    text_encoder_out_layers: tuple[int, ...] = (1, 2)  # hidden states stacked as the prompt embedding
    vocab_size: int = 1024
    latent_channels: int = 4
    vae_block_out_channels: tuple[int, ...] = (4, 4, 4, 4, 4)  # 2 ** 4 = 16 pixels per latent cell
    distilled: bool = False


def build_tiny_flux2_klein_components(spec: TinyFlux2KleinSpec | None = None, seed: int = 0) -> dict:
    """The components of a tiny ``Flux2KleinPipeline`` (random weights, seeded)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    spec = spec or TinyFlux2KleinSpec()
    tokenizer = build_qwen_tokenizer([CORPUS], spec.vocab_size, chat_template=QWEN3_CHAT_TEMPLATE)
    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_hidden_size,
            intermediate_size=2 * spec.text_hidden_size,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=spec.text_hidden_size // 2,
            max_position_embeddings=2048,
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        )
    ).eval()
    torch.manual_seed(seed + 1)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * spec.latent_channels,
        num_layers=spec.num_layers,
        num_single_layers=spec.num_single_layers,
        attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=spec.text_hidden_size * len(spec.text_encoder_out_layers),
        timestep_guidance_channels=256,
        axes_dims_rope=tuple(spec.axes_dims_rope),
        guidance_embeds=False,
    )
    torch.manual_seed(seed + 2)
    blocks = len(spec.vae_block_out_channels)
    vae = AutoencoderKLFlux2(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(spec.vae_block_out_channels),
        layers_per_block=1,
        latent_channels=spec.latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    return {
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
        "is_distilled": spec.distilled,
    }


def build_tiny_flux2_klein(path: str | Path, spec: TinyFlux2KleinSpec | None = None, seed: int = 0) -> Path:
    """Build the tiny pipeline and ``save_pretrained`` it to ``path`` (a hub-style folder). Returns the path."""
    from diffusers import Flux2KleinPipeline

    spec = spec or TinyFlux2KleinSpec()
    path = Path(path)
    Flux2KleinPipeline(**build_tiny_flux2_klein_components(spec, seed)).save_pretrained(
        path, safe_serialization=True
    )
    (path / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output", type=Path, help="folder to write the pipeline to")
    parser.add_argument("--distilled", action="store_true", help="a step-distilled checkpoint (no CFG)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_flux2_klein(args.output, TinyFlux2KleinSpec(distilled=args.distilled), seed=args.seed))


if __name__ == "__main__":
    main()
