"""Export a trained LoRA adapter to ``pytorch_lora_weights.safetensors`` for stock diffusers and ComfyUI.

Keys follow diffusers' Flux LoRA format, ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight``. The scale
alpha / r is carried by a ``transformer.<module>.alpha`` scalar tensor per module and nothing in the header: with
alpha only in the safetensors metadata (peft's default) ComfyUI applies the wrong scale whenever alpha != r, and
with both diffusers refuses the file (stack-traps.md, "LoRA export").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

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
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt_path}")
    try:  # weights_only: a checkpoint is data, never code to unpickle
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a truncated, corrupt or foreign file
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"{ckpt_path} is not a readable mtflow checkpoint (corrupt, truncated, or not a torch file?): "
            f"{first_line}"
        ) from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{ckpt_path} holds a {type(checkpoint).__name__}, not an mtflow fit checkpoint")
    info = checkpoint.get("mtflow")
    if info is None:
        raise ValueError(f"{ckpt_path} was not written by mtflow fit (no 'mtflow' section)")
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
