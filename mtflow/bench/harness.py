"""Drive real RL iterations for the benchmark: the tiny Kontext model, chains, ``FlowRLModule`` in a Lightning
``Trainer`` (as ``mtflow fit`` runs it), per-iteration wall time, peak memory and the network calls each iteration
made. ``python -m mtflow.bench.harness '<json>'`` runs one measurement in a fresh process and prints its result as
JSON (peak-memory points must not share a process).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image

from mtflow.bench.timing import PeakProbe, count_calls
from mtflow.data.loader import ChainBatches
from mtflow.data.records import EditChain

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


def load_policy(path: str | Path, spec: ModelSpec, extra_adapters: tuple[str, ...] = ("old",)):
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


def _set_overlap(flag: bool):
    def apply(module) -> None:
        module.hparams.overlap_scoring = flag

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
                "text_encode": (policy._pipeline, "encode_prompt"),
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
    """Fit ``FlowRLModule(policy, scorer, **module)`` for ``warmup + iterations`` RL iterations of ``num_chains``
    chains each, in a Lightning ``Trainer`` configured like ``mtflow fit`` (CSV logs every step, no progress bar,
    no checkpoints), and return the timings of the last ``iterations``. With ``variants`` (names of ``VARIANTS``),
    ``warmup`` and ``iterations`` count per variant, and the variants alternate iteration by iteration."""
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


# ------------------------------------------------------------------------------------------- subprocess worker


@dataclass
class WorkerJob:
    """One measurement in a fresh process.

    Attributes:
        model_path: folder of the tiny pipeline.
        spec: the model spec (as a dict of ``ModelSpec`` fields).
        num_chains: B.
        module: ``FlowRLModule`` keyword arguments plus ``num_turns`` (K of the benchmark chains).
        iterations: timed iterations (per variant).
        warmup: untimed iterations first (per variant).
        threads: torch intra-op threads.
        variants: ``VARIANTS`` to alternate (empty: none).
        compile_transformer: ``torch.compile`` the transformer first (for the "eager" / "compiled" variants).
        memory: record the peak RSS of every iteration.
    """

    model_path: str
    spec: dict[str, Any]
    num_chains: int
    module: dict[str, Any]
    iterations: int = 2
    warmup: int = 1
    threads: int = 1
    variants: list[str] = field(default_factory=list)
    compile_transformer: bool = False
    memory: bool = True


def run_job(job: WorkerJob) -> dict[str, Any]:
    torch.set_num_threads(job.threads)
    spec = ModelSpec(**job.spec)
    policy = load_policy(job.model_path, spec)
    turns = int(job.module.get("num_turns", 3))
    module = {k: v for k, v in job.module.items() if k != "num_turns"}
    chains = bench_chains(2 * job.num_chains, turns, size=spec.resolution, seed=1)
    if job.compile_transformer:
        compile_transformer(policy)
    result = run_iterations(
        policy,
        chains,
        job.num_chains,
        module,
        job.iterations,
        job.warmup,
        memory=job.memory,
        variants=job.variants or None,
    )
    return {"result": asdict(result)}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m mtflow.bench.harness '<WorkerJob as JSON>'")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    job = WorkerJob(**json.loads(argv[0]))
    result = run_job(job)
    print("MTFLOW_BENCH_RESULT " + json.dumps(result))


def run_worker(job: WorkerJob, timeout: float = 900.0, env: dict[str, str] | None = None) -> RunResult:
    """Run ``job`` in a fresh Python process (``env`` added to this process's environment) and return its
    result."""
    import subprocess

    env = {**os.environ, **(env or {})}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = [sys.executable, "-m", "mtflow.bench.harness", json.dumps(asdict(job))]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    for line in done.stdout.splitlines():
        if line.startswith("MTFLOW_BENCH_RESULT "):
            return RunResult(**json.loads(line.split(" ", 1)[1])["result"])
    tail = (done.stderr or done.stdout)[-2000:]
    raise RuntimeError(f"benchmark worker failed (exit {done.returncode}) for {job}: {tail}")


if __name__ == "__main__":
    main()
