"""Drive real RL iterations for the benchmark: the tiny Kontext model, chains, ``FlowRLModule`` in a Lightning
``Trainer`` (as ``mtflow fit`` runs it), per-iteration wall time, peak memory and the network calls each iteration
made (``recorder.IterationRecorder``). ``worker.run_worker`` runs one measurement in a fresh process.

A module is given as ``FlowRLModule`` keyword arguments with the redesigned groups as objects, e.g.
``{"algorithm": NFT(train_timesteps=2), "rollout": RolloutConfig(group_size=8)}``; ``module_to_json`` /
``module_from_json`` carry them to a worker process (the algorithm as ``class_path`` + ``init_args``, as
``mtflow fit``'s config writes it).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import statistics
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from PIL import Image

from benchkit.recorder import IterationRecorder
from mtflow.advantage import AdvantageConfig
from mtflow.algorithms import Algorithm
from mtflow.data.loader import ChainBatches
from mtflow.data.records import EditChain
from mtflow.eval.evaluate import EvalConfig
from mtflow.models.base import OLD_ADAPTER
from mtflow.rollout import RolloutConfig
from mtflow.training.optim import OptimConfig

WORDS = (
    "make add remove turn move replace red green blue yellow circle square star tree sky left right".split()
)


@dataclass
class ModelSpec:
    """The tiny Kontext model the benchmark runs (``TinyKontextSpec`` sizes plus policy settings).

    Attributes:
        num_layers: double-stream blocks.
        num_single_layers: single-stream blocks.
        attention_head_dim: head width (= sum of the rope axes).
        num_attention_heads: heads; the hidden width is heads * head_dim.
        text_width: T5 / CLIP width (joint attention dim).
        resolution: image side in pixels (the tiny VAE downsamples by 2, packing by 2: (res / 4)^2 tokens).
        max_sequence_length: T5 tokens per instruction.
        lora_rank: LoRA rank of the trained adapter.
        gradient_checkpointing: recompute transformer activations in backward.
        seed: weights seed.
    """

    num_layers: int = 1
    num_single_layers: int = 1
    attention_head_dim: int = 16
    num_attention_heads: int = 2
    text_width: int = 32
    resolution: int = 32
    max_sequence_length: int = 32
    lora_rank: int = 4
    gradient_checkpointing: bool = False
    seed: int = 0

    def rope_axes(self) -> tuple[int, int, int]:
        """Split the head width over FLUX's three rope axes (FLUX.1: 16, 56, 56 of 128)."""
        d = self.attention_head_dim
        if d % 4:
            raise ValueError(f"attention_head_dim must be a multiple of 4, got {d}")
        first = d // 4 if (d // 4) % 2 == 0 else d // 4 - 1
        rest = (d - first) // 2
        if rest % 2:
            first, rest = first + 2, rest - 1
        return (first, rest, d - first - rest)

    def folder_name(self) -> str:
        return (
            f"tiny-kontext-l{self.num_layers}s{self.num_single_layers}h{self.num_attention_heads}"
            f"x{self.attention_head_dim}t{self.text_width}-seed{self.seed}"
        )


def build_model(spec: ModelSpec, root: str | Path) -> Path:
    """Build (once) the tiny pipeline of ``spec`` under ``root``; returns its folder."""
    from mtflow.testing.tiny_kontext import TinyKontextSpec, build_tiny_kontext

    path = Path(root) / spec.folder_name()
    if (path / "model_index.json").exists():
        return path
    tiny = TinyKontextSpec(
        num_layers=spec.num_layers,
        num_single_layers=spec.num_single_layers,
        attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads,
        axes_dims_rope=spec.rope_axes(),
        text_width=spec.text_width,
    )
    return build_tiny_kontext(path, tiny, seed=spec.seed)


def load_policy(path: str | Path, spec: ModelSpec, extra_adapters: tuple[str, ...] = (OLD_ADAPTER,)):
    """A float32 ``KontextPolicy`` without a cross-call text cache (every iteration encodes its instructions, as
    a real run whose chains all differ does)."""
    from mtflow.models.kontext import KontextPolicy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return KontextPolicy(
            str(path),
            dtype="float32",
            resolution=spec.resolution,
            max_sequence_length=spec.max_sequence_length,
            lora_rank=spec.lora_rank,
            gradient_checkpointing=spec.gradient_checkpointing,
            text_cache_size=0,
            local_files_only=True,
        ).load(extra_adapters=extra_adapters)


def bench_chains(num_chains: int, num_turns: int, size: int = 32, seed: int = 0) -> list[EditChain]:
    """Random sources; every instruction of every chain is distinct (no text-cache hit within or across batches)."""
    rng = np.random.default_rng(seed)
    chains = []
    for b in range(num_chains):
        instructions = [
            " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), 4)) + f" {b} {k}"
            for k in range(num_turns)
        ]
        image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        chains.append(EditChain(f"chain{b:04d}", image, instructions))
    return chains


# ------------------------------------------------------------------------------------------- module arguments

CONFIG_GROUPS: dict[str, type] = {
    "rollout": RolloutConfig,
    "advantage": AdvantageConfig,
    "optim": OptimConfig,
    "evaluation": EvalConfig,
}
"""``FlowRLModule``'s typed config groups (frozen dataclasses)."""


def module_to_json(module: dict[str, Any]) -> dict[str, Any]:
    """``FlowRLModule`` keyword arguments -> plain JSON values: the algorithm as ``{"class_path", "init_args"}``,
    config groups as their fields, everything else as given."""
    out: dict[str, Any] = {}
    for key, value in module.items():
        if isinstance(value, Algorithm):
            out[key] = {"class_path": value.class_path, "init_args": value.config()}
        elif dataclasses.is_dataclass(value):
            out[key] = dataclasses.asdict(value)
        else:
            out[key] = value
    return out


def module_from_json(data: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``module_to_json``."""
    out = dict(data)
    if "algorithm" in out:
        module_name, _, class_name = out["algorithm"]["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        out["algorithm"] = cls(**out["algorithm"].get("init_args", {}))
    for key, cls in CONFIG_GROUPS.items():
        if key in out:
            fields = dict(out[key])
            if key == "optim" and "betas" in fields:
                fields["betas"] = tuple(fields["betas"])  # JSON has no tuples
            out[key] = cls(**fields)
    return out


@dataclass
class RunResult:
    """Timed RL iterations of one configuration (warm-up iterations removed).

    Attributes:
        walls: seconds per iteration, batch start to batch end.
        gap: median seconds Lightning spends between batches (data fetch, logging, callbacks).
        stats: the module's ``perf/*`` stats of each timed iteration.
        peaks: peak RSS above the level at iteration start, bytes (empty unless measured).
        calls: network calls of the last timed iteration (empty unless counted).
        rollout_bytes: bytes of the last rollout's stored tensors (states, next states, log-probs, latents).
        variants: the variant applied before each timed iteration (empty without variants).
        warmup_walls: seconds of the warm-up iterations.
    """

    walls: list[float]
    gap: float
    stats: list[dict[str, float]]
    peaks: list[int] = field(default_factory=list)
    calls: dict[str, dict[int, int]] = field(default_factory=dict)
    rollout_bytes: dict[str, int] = field(default_factory=dict)
    variants: list[str] = field(default_factory=list)
    warmup_walls: list[float] = field(default_factory=list)

    @property
    def iteration_s(self) -> float:
        """Median wall time of one iteration including Lightning's between-batch work."""
        return statistics.median(self.walls) + self.gap

    @property
    def peak(self) -> int:
        """Largest per-iteration peak."""
        return max(self.peaks)

    def stat(self, key: str) -> float:
        return statistics.median(s[key] for s in self.stats if key in s)

    def split(self) -> dict[str, RunResult]:
        """One result per variant (iterations in the order they ran)."""
        out: dict[str, RunResult] = {}
        for name in dict.fromkeys(self.variants):
            rows = [i for i, v in enumerate(self.variants) if v == name]
            out[name] = RunResult(
                walls=[self.walls[i] for i in rows],
                gap=self.gap,
                stats=[self.stats[i] for i in rows],
                peaks=[self.peaks[i] for i in rows] if self.peaks else [],
                variants=[name] * len(rows),
            )
        return out

    @staticmethod
    def merge(results: list[RunResult]) -> RunResult:
        """Pool the iterations of several runs of the same configuration."""
        return RunResult(
            walls=[w for r in results for w in r.walls],
            gap=statistics.median(r.gap for r in results),
            stats=[s for r in results for s in r.stats],
            peaks=[p for r in results for p in r.peaks],
            calls=next((r.calls for r in results if r.calls), {}),
            rollout_bytes=results[-1].rollout_bytes,
            variants=[v for r in results for v in r.variants],
            warmup_walls=[w for r in results for w in r.warmup_walls],
        )


def rollout_bytes(result) -> dict[str, int]:
    """Bytes held by a ``Rollout``'s tensors, by field."""
    out = {}
    for name in ("states", "next_states", "log_probs", "final_latents", "reference_latents", "images"):
        t = getattr(result, name)
        out[name] = t.numel() * t.element_size()
    return out


def run_iterations(
    policy,
    chains: list[EditChain],
    num_chains: int,
    module: dict[str, Any],
    iterations: int,
    warmup: int = 1,
    scorer=None,
    memory: bool = False,
    count: bool = False,
    variants: list[str] | None = None,
) -> RunResult:
    """Fit ``FlowRLModule(policy, scorer, **module)`` (``module``: keyword arguments such as ``algorithm``,
    ``rollout``, ``optim``, ``overlap_scoring``) for ``warmup + iterations`` RL iterations of ``num_chains`` chains
    each, in a Lightning ``Trainer`` configured like ``mtflow fit`` (CSV logs every step, no progress bar, no
    checkpoints), and return the timings of the last ``iterations``. With ``variants`` (names of
    ``recorder.VARIANTS``), ``warmup`` and ``iterations`` count per variant, and the variants alternate iteration by
    iteration."""
    from mtflow.testing.scorers import BrightnessScorer
    from mtflow.training.module import FlowRLModule

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    scorer = scorer or BrightnessScorer()
    per_round = max(1, len(variants or []))
    total = (warmup + iterations) * per_round
    skip = warmup * per_round
    model = FlowRLModule(policy, scorer, max_iterations=total, **module)
    captured: dict[str, Any] = {}  # the module keeps only a small preview; the full rollout is measured here
    rollout_chains = model.rollout_chains

    def capture(chains_):
        captured["last"] = rollout_chains(chains_)
        return captured["last"]

    model.rollout_chains = capture
    recorder = IterationRecorder(memory=memory, count=count, variants=variants)
    with tempfile.TemporaryDirectory(prefix="mtflow-bench-") as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=10_000,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            logger=L.pytorch.loggers.CSVLogger(root, name="bench"),
            log_every_n_steps=1,
            callbacks=[recorder],
        )
        trainer.fit(model, train_dataloaders=ChainBatches(chains, num_chains, shuffle=False))
    if model.iteration != total:
        raise RuntimeError(f"the benchmark fit ran {model.iteration} iterations, expected {total}")
    gaps = recorder.gaps[skip:] or recorder.gaps or [0.0]
    result = RunResult(
        walls=recorder.walls[skip:],
        gap=float(np.median(gaps)),
        stats=recorder.stats[skip:],
        peaks=recorder.peaks[skip:],
        calls=recorder.calls[-1] if recorder.calls else {},
        rollout_bytes=rollout_bytes(captured["last"]) if "last" in captured else {},
        variants=recorder.applied[skip:],
        warmup_walls=recorder.walls[:skip],
    )
    captured.clear()
    # the module leaves the policy in train mode after its update; T5's dropout would then perturb any later
    # text encoding outside the trainer
    policy.eval()
    return result
