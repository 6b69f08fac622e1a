"""Settings flipped between the iterations of one benchmark fit (``VARIANTS``) and the callback that records every
iteration (``IterationRecorder``): wall time, Lightning's gap between batches, the module's ``perf/*`` stats, peak
memory and the network calls made.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import lightning as L
import torch

from benchkit.timing import PeakProbe, count_calls


def _set_overlap(flag: bool):
    def apply(module) -> None:
        module.overlap_scoring = flag

    return apply


def _set_store(dtype: str):
    def apply(module) -> None:
        module.rollout_config = replace(module.rollout_config, store_dtype=dtype)

    return apply


def _set_checkpointing(flag: bool):
    def apply(module) -> None:
        transformer = module.policy.transformer
        if flag:
            transformer.enable_gradient_checkpointing()
        else:
            transformer.disable_gradient_checkpointing()

    return apply


def _set_compiled(flag: bool):
    # ``nn.Module.compile()`` keeps the compiled callable in ``_compiled_call_impl``; parking it elsewhere and
    # putting it back switches between eager and compiled forwards without recompiling.
    def apply(module) -> None:
        transformer = module.policy.transformer
        compiled = getattr(transformer, "_mtflow_bench_compiled", None)
        if compiled is None:
            raise RuntimeError("the 'eager'/'compiled' variants need transformer.compile() first")
        transformer._compiled_call_impl = compiled if flag else None

    return apply


VARIANTS: dict[str, Callable[[Any], None]] = {
    "overlap_off": _set_overlap(False),
    "overlap_on": _set_overlap(True),
    "store_float32": _set_store("float32"),
    "store_bfloat16": _set_store("bfloat16"),
    "checkpointing_off": _set_checkpointing(False),
    "checkpointing_on": _set_checkpointing(True),
    "eager": _set_compiled(False),
    "compiled": _set_compiled(True),
}
"""Settings the benchmark flips between iterations of one fit, so that two variants are timed side by side (same
process, same warm caches, interleaved so that load from other jobs hits both alike)."""


def compile_transformer(policy) -> None:
    """``torch.compile`` the transformer's forward in place and keep the compiled callable for the variants."""
    policy.transformer.compile()
    policy.transformer._mtflow_bench_compiled = policy.transformer._compiled_call_impl


class IterationRecorder(L.Callback):
    """Per training batch: wall time (batch start to end), the gap before the next batch starts, the module's
    ``perf/*`` stats, optionally the peak RSS above the level at batch start and the network calls made. With
    ``variants``, batch i first applies ``VARIANTS[variants[i % len(variants)]]`` to the module.

    Args:
        memory: record peak RSS per iteration (``timing.PeakProbe``).
        count: record network calls (transformer by grad mode and adapter, VAE, text encoders, judge, optimiser).
        variants: names of ``VARIANTS`` to cycle through, one per iteration.
    """

    def __init__(self, memory: bool = False, count: bool = False, variants: list[str] | None = None) -> None:
        unknown = [v for v in variants or [] if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown benchmark variants {unknown}; known: {sorted(VARIANTS)}")
        self.memory = memory
        self.count = count
        self.variants = list(variants or [])
        self.applied: list[str] = []
        self.walls: list[float] = []
        self.gaps: list[float] = []
        self.stats: list[dict[str, float]] = []
        self.peaks: list[int] = []
        self.calls: list[dict[str, dict[int, int]]] = []
        self._probe = PeakProbe()
        self._started = 0.0
        self._ended: float | None = None
        self._counter = None
        self._log = None
        self._transformer_calls: list[tuple[str, int]] = []
        self._hook = None
        self._variant = ""

    def on_fit_start(self, trainer, pl_module) -> None:
        if not self.count:
            return
        policy = pl_module.policy
        layer = policy._lora_layers()[0]

        def record(_module, _args, kwargs):
            adapter = "none" if layer._disable_adapters else layer._active_adapter[0]
            mode = "grad" if torch.is_grad_enabled() else "no_grad"
            self._transformer_calls.append(
                (f"transformer/{mode}/{adapter}", kwargs["hidden_states"].shape[0])
            )

        self._hook = policy.transformer.register_forward_pre_hook(record, with_kwargs=True)
        self._counter = count_calls(
            {
                # every editor's text encoder runs once per encoding call (Kontext: CLIP, then T5 inside one
                # encode_prompt; Qwen-Image-Edit: the VL model; FLUX.2-klein: Qwen3)
                "text_encode": (policy.text_encoder, "forward"),
                "vae_encode": (policy.vae, "encode"),
                "vae_decode": (policy.vae, "decode"),
                "judge": (pl_module.scorer, "score"),
                "optimizer_step": (trainer.optimizers[0], "step"),
            }
        )
        self._log = self._counter.__enter__()

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._ended is not None:
            self.gaps.append(now - self._ended)
        if self.variants:
            # (Lightning also calls this hook for the batch the module refuses once max_iterations is reached)
            self._variant = self.variants[len(self.walls) % len(self.variants)]
            VARIANTS[self._variant](pl_module)
        if self._log is not None:
            for calls in self._log.calls.values():
                calls.clear()
            self._transformer_calls.clear()
        if self.memory:
            self._probe.start()
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._ended = time.perf_counter()
        self.walls.append(self._ended - self._started)
        if self.variants:
            self.applied.append(self._variant)
        if self.memory:
            self.peaks.append(self._probe.stop())
        self.stats.append(
            {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("perf/", "nft/"))}
        )
        if self._log is not None:
            calls = {name: self._log.histogram(name) for name in self._log.calls}
            calls["optimizer_step"] = {0: self._log.count("optimizer_step")}
            for name, size in self._transformer_calls:
                calls.setdefault(name, {})
                calls[name][size] = calls[name].get(size, 0) + 1
            self.calls.append(calls)
