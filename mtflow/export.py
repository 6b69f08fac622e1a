"""Export a trained LoRA adapter to ``pytorch_lora_weights.safetensors`` for stock diffusers and ComfyUI.

Keys follow diffusers' Flux LoRA format, ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight``. The scale
alpha / r is carried by a ``transformer.<module>.alpha`` scalar tensor per module and nothing in the header: with
alpha only in the safetensors metadata (peft's default) ComfyUI applies the wrong scale whenever alpha != r, and
with both diffusers refuses the file (measured on a tiny Flux transformer; ``tests/test_training.py`` loads an exported
file into diffusers' stock pipeline with alpha != rank).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mtflow.checkpoints import read_checkpoint

LORA_FILENAME = "pytorch_lora_weights.safetensors"


def lora_state_to_diffusers(
    state_dict: dict[str, torch.Tensor], adapter: str, alpha: float, prefix: str = "policy.transformer."
) -> dict[str, torch.Tensor]:
    """Select one adapter's LoRA tensors from a module state dict and rename them to diffusers' format.

    Args:
        state_dict: e.g. a checkpoint's ``state_dict`` (keys ``policy.transformer.<module>.lora_A.<adapter>.weight``).
        adapter: adapter name to export ("default", "ema", ...).
        alpha: LoRA alpha; written as one ``<module>.alpha`` tensor per adapted module.
    """
    out: dict[str, torch.Tensor] = {}
    marker = f".{adapter}."
    for key, value in state_dict.items():
        if not key.startswith(prefix) or "lora_" not in key or marker not in key:
            continue
        module_key = key[len(prefix) :].replace(marker, ".")  # <module>.lora_A.weight
        out[f"transformer.{module_key}"] = value.detach().to("cpu", torch.float32).contiguous()
        module = module_key.rsplit(".lora_", 1)[0]
        out[f"transformer.{module}.alpha"] = torch.tensor(float(alpha))
    if not out:
        raise KeyError(
            f"no LoRA tensors of adapter {adapter!r} found (keys look like {next(iter(state_dict), None)!r})"
        )
    return out


def save_lora(tensors: dict[str, torch.Tensor], output_dir: str | Path) -> Path:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LORA_FILENAME
    save_file(tensors, str(path))
    return path


def checkpoint_adapter(
    ckpt_path: str | Path, adapter: str = "default"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an ``mtflow fit`` checkpoint once: the chosen adapter in diffusers' format, and the checkpoint's
    ``mtflow`` section (adapters, LoRA rank / alpha / targets, pretrained base)."""
    checkpoint = read_checkpoint(ckpt_path)
    info = checkpoint["mtflow"]
    if adapter not in info.get("adapters", []):
        raise ValueError(f"{ckpt_path} has adapters {info.get('adapters')}, not {adapter!r}")
    return lora_state_to_diffusers(checkpoint["state_dict"], adapter, info["lora"]["alpha"]), info


def export_checkpoint(ckpt_path: str | Path, output_dir: str | Path, adapter: str = "default") -> Path:
    """Read an ``mtflow fit`` checkpoint and write the chosen adapter for diffusers / ComfyUI."""
    return save_lora(checkpoint_adapter(ckpt_path, adapter)[0], output_dir)


def export_policy(policy, output_dir: str | Path, adapter: str = "default") -> Path:
    """Write a loaded (unsharded) policy's adapter directly."""
    state = {f"policy.transformer.{k}": v for k, v in policy.transformer.state_dict().items() if "lora_" in k}
    return save_lora(lora_state_to_diffusers(state, adapter, policy.lora_alpha), output_dir)
