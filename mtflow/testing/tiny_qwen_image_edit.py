"""Build a tiny, randomly initialised Qwen-Image-Edit pipeline of the real classes, fully offline.

Every component is the class the real checkpoints use (diffusers ``QwenImageTransformer2DModel``,
``AutoencoderKLQwenImage``, ``FlowMatchEulerDiscreteScheduler``; transformers
``Qwen2_5_VLForConditionalGeneration`` and a ``Qwen2VLProcessor`` made of a ``Qwen2Tokenizer``, a
``Qwen2VLImageProcessor`` and a ``Qwen2VLVideoProcessor``), only small; sizes follow diffusers' own tests
(tests/pipelines/qwenimage/). The tokenizer is a byte-level BPE learned locally (``tiny_qwen_tokenizer``). The VAE
downsamples 16x (the real one 8x) so that a source at the pipeline's fixed 1024 x 1024 pixel area is ~1000 tokens:
the stock pipeline then runs with its default sizing on a CPU. ``variant`` picks the pipeline class:
``"edit_plus"`` (``QwenImageEditPlusPipeline``: Qwen-Image-Edit-2509 / 2511) or ``"edit"``
(``QwenImageEditPipeline``: the first Qwen-Image-Edit).

    python -m mtflow.testing.tiny_qwen_image_edit /tmp/tiny-qwen-image-edit
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from mtflow.testing.tiny_qwen_tokenizer import build_qwen_tokenizer

PIPELINES = {"edit": "QwenImageEditPipeline", "edit_plus": "QwenImageEditPlusPipeline"}

# Words the tiny tokenizer learns merges from: the pipelines' own system prompt and edit instructions.
CORPUS = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), then "
    "explain how the user's text instruction should alter or modify the image. Generate a new image that meets "
    "the user's requirements while maintaining consistency with the original input where appropriate. "
    "Picture 1: make it red add remove change the color of the circle square background to blue green yellow "
    "replace the sky with a sunset turn the cat into a dog move the tree left right a an the of to in on with"
)


@dataclass
class TinyQwenImageEditSpec:
    """Sizes of the tiny pipeline."""

    variant: Literal["edit", "edit_plus"] = "edit_plus"
    num_layers: int = 1
    attention_head_dim: int = 16
    num_attention_heads: int = 2
    axes_dims_rope: tuple[int, int, int] = (8, 4, 4)
    text_hidden_size: int = 32
    text_layers: int = 2
    vision_depth: int = 1
    vision_hidden_size: int = 32
    vision_patch_size: int = 14
    vision_max_pixels: int = 56 * 56 * 4  # the VL encoder sees at most 112 x 112 pixels (16 merged tokens)
    vision_min_pixels: int = 28 * 28
    vocab_size: int = 1024
    z_dim: int = 4
    vae_base_dim: int = 4
    vae_downsamples: int = 4  # 2 ** 4 = 16 pixels per latent cell


def build_tiny_qwen_image_edit_components(spec: TinyQwenImageEditSpec | None = None, seed: int = 0) -> dict:
    """The components of a tiny Qwen-Image-Edit pipeline (random weights, seeded)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    spec = spec or TinyQwenImageEditSpec()
    tokenizer = build_qwen_tokenizer([CORPUS], spec.vocab_size)
    size = {"shortest_edge": spec.vision_min_pixels, "longest_edge": spec.vision_max_pixels}
    vision = dict(patch_size=spec.vision_patch_size, temporal_patch_size=2, merge_size=2)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, **vision),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(size=size, **vision),
    )
    ids = tokenizer.convert_tokens_to_ids
    half = spec.text_hidden_size // 2 // 2  # head_dim // 2 with 2 heads
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": spec.text_hidden_size,
            "intermediate_size": 2 * spec.text_hidden_size,
            "num_hidden_layers": spec.text_layers,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {
                "mrope_section": [half - 2 * (half // 4), half // 4, half // 4],
                "rope_type": "default",
                "type": "default",
            },
            "rope_theta": 1000000.0,
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={
            "depth": spec.vision_depth,
            "hidden_size": spec.vision_hidden_size,
            "intermediate_size": 2 * spec.vision_hidden_size,
            "num_heads": 2,
            "out_hidden_size": spec.text_hidden_size,
            "patch_size": spec.vision_patch_size,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "fullatt_block_indexes": [spec.vision_depth - 1],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    torch.manual_seed(seed + 1)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * spec.z_dim,
        out_channels=spec.z_dim,
        num_layers=spec.num_layers,
        attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=spec.text_hidden_size,
        guidance_embeds=False,
        axes_dims_rope=tuple(spec.axes_dims_rope),
    )
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLQwenImage(
        base_dim=spec.vae_base_dim,
        z_dim=spec.z_dim,
        dim_mult=[1] * (spec.vae_downsamples + 1),
        num_res_blocks=1,
        temperal_downsample=[False] * spec.vae_downsamples,
        latents_mean=[0.0] * spec.z_dim,
        latents_std=[1.0] * spec.z_dim,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    return {
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "processor": processor,
        "transformer": transformer,
    }


def build_tiny_qwen_image_edit(
    path: str | Path, spec: TinyQwenImageEditSpec | None = None, seed: int = 0
) -> Path:
    """Build the tiny pipeline of ``spec.variant`` and ``save_pretrained`` it to ``path``. Returns the path."""
    import diffusers

    spec = spec or TinyQwenImageEditSpec()
    path = Path(path)
    pipeline_class = getattr(diffusers, PIPELINES[spec.variant])
    pipeline_class(**build_tiny_qwen_image_edit_components(spec, seed)).save_pretrained(
        path, safe_serialization=True
    )
    (path / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output", type=Path, help="folder to write the pipeline to")
    parser.add_argument("--variant", choices=sorted(PIPELINES), default="edit_plus")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(
        build_tiny_qwen_image_edit(args.output, TinyQwenImageEditSpec(variant=args.variant), seed=args.seed)
    )


if __name__ == "__main__":
    main()
