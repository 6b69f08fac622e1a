"""Export a trained LoRA adapter to ``pytorch_lora_weights.safetensors`` for stock diffusers and ComfyUI.

The file's layout is the editor's (``EditPolicy.lora_file_tensors``), the one its stock pipeline's
``load_lora_weights`` reads and ComfyUI maps onto its model (docs/editors.md lists them with their sources):

- FLUX.1-Kontext: diffusers' Flux keys, ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight``. The scale
  alpha / r is carried by a ``transformer.<module>.alpha`` scalar tensor per module and nothing in the header: with
  alpha only in the safetensors metadata (peft's default) ComfyUI applies the wrong scale whenever alpha != r, and
  with both diffusers refuses the file (measured on a tiny Flux transformer; ``tests/test_training.py`` loads an
  exported file into diffusers' stock pipeline with alpha != rank).
- Qwen-Image-Edit: ``diffusion_model.<module>`` keys with ``.alpha`` tensors.
- FLUX.2-klein: FLUX.2's original module names under ``diffusion_model.`` (fused q/k/v), alpha folded into B.

Without a policy (a checkpoint read on its own) the Kontext layout is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mtflow.checkpoints import read_checkpoint
from mtflow.models.lora import prefixed_lora_tensors

LORA_FILENAME = "pytorch_lora_weights.safetensors"
STATE_PREFIX = "policy.transformer."


def adapter_tensors(
    state_dict: dict[str, torch.Tensor], adapter: str, prefix: str = STATE_PREFIX
) -> dict[str, torch.Tensor]:
    """One adapter's LoRA tensors of a module state dict, by module path (``<module>.lora_A.weight``).

    Args:
        state_dict: e.g. a checkpoint's ``state_dict`` (keys ``policy.transformer.<module>.lora_A.<adapter>.weight``).
        adapter: adapter to export ("default", "ema", ...).
    """
    out: dict[str, torch.Tensor] = {}
    marker = f".{adapter}."
    for key, value in state_dict.items():
        if not key.startswith(prefix) or "lora_" not in key or marker not in key:
            continue
        out[key[len(prefix) :].replace(marker, ".")] = value.detach().to("cpu", torch.float32).contiguous()
    if not out:
        raise KeyError(
            f"no LoRA tensors of adapter {adapter!r} found (keys look like {next(iter(state_dict), None)!r})"
        )
    return out


def lora_state_to_diffusers(
    state_dict: dict[str, torch.Tensor], adapter: str, alpha: float, prefix: str = STATE_PREFIX
) -> dict[str, torch.Tensor]:
    """One adapter of a module state dict in the Kontext (diffusers Flux) layout: ``transformer.<module>.lora_A.weight``
    and a ``transformer.<module>.alpha`` tensor per module."""
    return prefixed_lora_tensors(adapter_tensors(state_dict, adapter, prefix), alpha, "transformer.")


def save_lora(tensors: dict[str, torch.Tensor], output_dir: str | Path) -> Path:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LORA_FILENAME
    save_file(tensors, str(path))
    return path


def checkpoint_adapter(
    ckpt_path: str | Path, adapter: str = "default", policy: Any = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an ``mtflow fit`` checkpoint once: the chosen adapter as ``policy``'s LoRA file tensors (the Kontext
    layout without a policy), and the checkpoint's ``mtflow`` section (adapters, LoRA rank / alpha / targets,
    pretrained base). ``policy`` need not be loaded (its file layout is a function of its class)."""
    checkpoint = read_checkpoint(ckpt_path)
    info = checkpoint["mtflow"]
    if adapter not in info.get("adapters", []):
        raise ValueError(f"{ckpt_path} has adapters {info.get('adapters')}, not {adapter!r}")
    tensors = adapter_tensors(checkpoint["state_dict"], adapter)
    alpha = info["lora"]["alpha"]
    if policy is None:
        return prefixed_lora_tensors(tensors, alpha, "transformer."), info
    return policy.lora_file_tensors(tensors, alpha), info


def export_checkpoint(
    ckpt_path: str | Path, output_dir: str | Path, adapter: str = "default", policy: Any = None
) -> Path:
    """Read an ``mtflow fit`` checkpoint and write the chosen adapter in ``policy``'s layout (see the module
    docstring) for diffusers / ComfyUI."""
    return save_lora(checkpoint_adapter(ckpt_path, adapter, policy)[0], output_dir)


def export_policy(policy, output_dir: str | Path, adapter: str = "default") -> Path:
    """Write a loaded (unsharded) policy's adapter directly, in its own layout."""
    tensors = {name: param.detach() for name, param in policy.adapter_named_parameters(adapter)}
    return save_lora(policy.lora_file_tensors(tensors, policy.lora_alpha), output_dir)
