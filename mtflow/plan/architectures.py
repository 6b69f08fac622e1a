"""The real architectures of a run, built on the meta device from their ``config.json`` (no weight is read).

A component's config comes from, in order: the configured ``pretrained`` folder, the Hugging Face cache (when the
model was downloaded before; never the network), or the public copies shipped in ``mtflow/plan/configs`` (see its
README for their source).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

PACKAGED = Path(__file__).resolve().parent / "configs"
# hub ids whose public configs ship with mtflow
PACKAGED_MODELS = {
    "black-forest-labs/FLUX.1-Kontext-dev": PACKAGED / "flux_kontext_dev",
    "Qwen/Qwen3-VL-8B-Instruct": PACKAGED / "qwen3_vl_8b_instruct",
}


@dataclass(frozen=True)
class FoundConfig:
    """A component's ``config.json`` and where it was read (``folder``, ``hub cache`` or ``mtflow copy``)."""

    values: dict[str, Any]
    source: str
    path: str


def find_config(pretrained: str, subfolder: str = "", revision: str | None = None) -> FoundConfig:
    """``<subfolder>/config.json`` of ``pretrained`` (folder, hub cache or mtflow's copy), without network."""
    from mtflow.models.kontext import resolve_pretrained

    name = f"{subfolder}/config.json" if subfolder else "config.json"
    local = Path(resolve_pretrained(pretrained)) / name
    if local.is_file():
        return FoundConfig(json.loads(local.read_text()), "folder", str(local))
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(pretrained, name, revision=revision)
    except Exception:  # not a valid repo id (a missing folder): fall through
        cached = None
    if isinstance(cached, str) and Path(cached).is_file():
        return FoundConfig(json.loads(Path(cached).read_text()), "hub cache", cached)
    packaged = PACKAGED_MODELS.get(pretrained)
    if packaged is not None and (packaged / name).is_file():
        return FoundConfig(json.loads((packaged / name).read_text()), "mtflow copy", str(packaged / name))
    raise FileNotFoundError(
        f"no {name} for {pretrained!r}: not a folder, not in the Hugging Face cache, and mtflow ships configs only "
        f"for {sorted(PACKAGED_MODELS)}"
    )


def build_on_meta(kind: str, config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """One component of a FLUX.1-Kontext pipeline (``transformer``, ``vae``, ``text_encoder`` or
    ``text_encoder_2``) on the meta device, in ``dtype``."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    values = {k: v for k, v in config.items() if not k.startswith("_")}
    builders = {
        "transformer": lambda: FluxTransformer2DModel.from_config(values),
        "vae": lambda: AutoencoderKL.from_config(values),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**values)),
        "text_encoder_2": lambda: T5EncoderModel(T5Config(**values)),
    }
    if kind not in builders:
        raise ValueError(f"unknown component {kind!r}; expected one of {sorted(builders)}")
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its note about casting with to(): nothing is loaded here
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            module = builders[kind]().to(dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    module.requires_grad_(False)
    return module


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer (meta tensors included)."""
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    return params + buffers
