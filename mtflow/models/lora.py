"""LoRA adapters on a policy's denoiser, shared by every ``EditPolicy`` implementation.

Several policies share one denoiser (docs/design.md section 2): the trained adapter ``"default"``, optional extra
adapters (``"old"`` for NFT sampling, ``"ema"`` for evaluation / export) and the frozen base (adapters disabled)
as the KL reference. Switching adapters never changes which parameters are trainable (peft's own ``set_adapter``
would). A policy mixes ``LoRAAdapters`` in, keeps its denoiser in ``self.transformer`` and sets the ``lora_*``
attributes below in its constructor.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from mtflow.models.base import TRAINED_ADAPTER


class LoRAAdapters:
    """Adds, routes, reads and loads the LoRA adapters of ``self.transformer``."""

    transformer: nn.Module
    lora_rank: int
    lora_alpha: float
    lora_targets: list[str]
    lora_dropout: float
    lora_init_seed: int
    lora_weights: str | None
    adapter_names: list[str]

    def _add_lora_adapters(self, names: Sequence[str]) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(
            r=self.lora_rank,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.lora_targets,
            init_lora_weights=True,  # B = 0: every adapter starts as the base model
        )
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # several adapters in one model is the point here, not an accident
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            torch.manual_seed(self.lora_init_seed)
            for name in names:
                if hasattr(self.transformer, "add_adapter"):  # diffusers models: their own peft integration
                    self.transformer.add_adapter(config, adapter_name=name)
                else:
                    inject_adapter_in_model(config, self.transformer, adapter_name=name)
        self.adapter_names = list(names)
        if self.lora_weights:
            self.load_lora_file(self.lora_weights, TRAINED_ADAPTER)
        for layer in self._lora_layers():
            for name in names:
                for weights in (layer.lora_A, layer.lora_B):
                    weights[name].float()  # LoRA in float32 under a bf16 base
        for name in names[1:]:
            self.copy_adapter(TRAINED_ADAPTER, name)
        for pname, param in self.transformer.named_parameters():
            param.requires_grad_(f".{TRAINED_ADAPTER}." in pname and "lora_" in pname)
        self._activate(TRAINED_ADAPTER)

    def _lora_layers(self) -> list[nn.Module]:
        from peft.tuners.lora import LoraLayer

        return [m for m in self.transformer.modules() if isinstance(m, LoraLayer)]

    def _activate(self, name: str | None) -> None:
        # peft's set_adapter/enable_adapters also flip requires_grad; only the routing flags are changed here.
        for layer in self._lora_layers():
            if name is None:
                layer._disable_adapters = True
            else:
                layer._active_adapter = [name]
                layer._disable_adapters = False

    @contextmanager
    def use_adapter(self, name: str | None) -> Iterator[None]:
        """Route forward passes through adapter ``name`` (None: adapters disabled, i.e. the frozen base)."""
        if not self.adapter_names:  # bare model (lora_rank=0): every policy is the base
            yield
            return
        if name is not None and name not in self.adapter_names:
            raise KeyError(f"unknown adapter {name!r}; have {self.adapter_names}")
        layers = self._lora_layers()
        saved = [(layer._active_adapter, layer._disable_adapters) for layer in layers]
        self._activate(name)
        try:
            yield
        finally:
            for layer, (active, disabled) in zip(layers, saved):
                layer._active_adapter = active
                layer._disable_adapters = disabled

    def adapter_parameters(self, name: str = TRAINED_ADAPTER) -> list[nn.Parameter]:
        """The LoRA parameters of one adapter, in a fixed order (same order for every adapter)."""
        return [p for n, p in self.adapter_named_parameters(name)]

    def adapter_named_parameters(self, name: str = TRAINED_ADAPTER) -> list[tuple[str, nn.Parameter]]:
        """(module path without the adapter name, parameter) pairs, e.g. ``transformer_blocks.0.attn.to_q.lora_A.weight``."""
        marker = f".{name}."
        out = []
        for pname, param in self.transformer.named_parameters():
            if "lora_" in pname and marker in pname:
                out.append((pname.replace(marker, "."), param))
        return out

    # ------------------------------------------------------------------ LoRA files
    # Prefix of the module keys in this editor's LoRA files ("transformer.": diffusers' Flux format, which
    # FluxKontextPipeline and ComfyUI read). A policy whose stock pipeline reads another layout overrides
    # ``lora_file_tensors`` and ``lora_tensors_from_file``.
    lora_file_prefix = "transformer."

    def lora_file_tensors(self, tensors: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
        """``<prefix><module>.lora_A.weight`` / ``.lora_B.weight`` and one ``<prefix><module>.alpha`` scalar per
        module: alpha as a tensor, not in the header, so that ComfyUI also applies alpha / r (see
        ``mtflow/export.py``)."""
        return prefixed_lora_tensors(tensors, alpha, self.lora_file_prefix)

    def lora_tensors_from_file(
        self, tensors: dict[str, torch.Tensor], source: str = ""
    ) -> dict[str, torch.Tensor]:
        """The inverse of ``lora_file_tensors``: module path -> tensor at this policy's alpha (the file's scale
        alpha / r folded into ``lora_B``; a module without an ``.alpha`` has alpha = r, scale 1, as diffusers and
        ComfyUI read it). ``source`` names the file in errors."""
        prefix = self.lora_file_prefix
        out = {}
        for key, value in tensors.items():
            if not key.startswith(prefix) or key.endswith(".alpha"):
                continue
            name = key[len(prefix) :]
            if ".lora_B." in name:
                module = name.rsplit(".lora_B.", 1)[0]
                alpha = tensors.get(f"{prefix}{module}.alpha")
                file_alpha = float(alpha) if alpha is not None else float(value.shape[1])
                value = value * (file_alpha / self.lora_alpha)
            out[name] = value
        if not out:
            raise KeyError(
                f"{source}: no LoRA tensor starts with {prefix!r} (keys look like {next(iter(tensors), None)!r})"
            )
        return out

    @torch.no_grad()
    def load_lora_file(self, path: str | Path, adapter: str = TRAINED_ADAPTER) -> None:
        """Load a LoRA file in this editor's format (``lora_file_tensors``: ``mtflow export`` writes it, and so does
        diffusers for Kontext) into ``adapter``, so that the effective update (alpha / r) B A is exactly the file's."""
        from safetensors.torch import load_file

        loaded_tensors = self.lora_tensors_from_file(load_file(str(path)), source=str(path))
        params = dict(self.adapter_named_parameters(adapter))
        loaded = set()
        for name, value in loaded_tensors.items():
            if name not in params:
                raise KeyError(
                    f"{path}: {name} does not match a LoRA module of this policy (targets {self.lora_targets})"
                )
            target = params[name]
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(
                    f"{path}: {name} has shape {tuple(value.shape)}, this policy expects {tuple(target.shape)}"
                )
            target.copy_(value.to(target.dtype))
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise KeyError(f"{path} lacks {len(missing)} LoRA tensors of this policy, e.g. {missing[:3]}")

    @torch.no_grad()
    def copy_adapter(self, source: str, target: str) -> None:
        """target <- source, parameter by parameter."""
        for dst, src in zip(self.adapter_parameters(target), self.adapter_parameters(source), strict=True):
            dst.copy_(src)


def prefixed_lora_tensors(
    tensors: dict[str, torch.Tensor], alpha: float, prefix: str
) -> dict[str, torch.Tensor]:
    """``{prefix}<module>.lora_A.weight`` / ``.lora_B.weight`` (float32, contiguous, on the CPU) and a
    ``{prefix}<module>.alpha`` scalar tensor per module."""
    out: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        out[prefix + name] = value.detach().to("cpu", torch.float32).contiguous()
        out[f"{prefix}{name.rsplit('.lora_', 1)[0]}.alpha"] = torch.tensor(float(alpha))
    return out
