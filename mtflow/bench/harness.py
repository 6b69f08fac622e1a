"""Drive real RL iterations for the benchmark: the tiny Kontext model, chains, ``FlowRLModule`` in a Lightning
``Trainer`` (as ``mtflow fit`` runs it), per-iteration wall time, peak memory and the network calls each iteration
made. ``python -m mtflow.bench.harness '<json>'`` runs one measurement in a fresh process and prints its result as
JSON (peak-memory points must not share a process).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
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


class IterationRecorder(L.Callback):
    """Per training batch: wall time (batch start to end), the gap before the next batch starts, the module's
    ``perf/*`` stats, optionally the peak RSS above the level at batch start and the network calls made.

    Args:
        memory: record peak RSS per iteration (``timing.PeakProbe``).
        count: record network calls (transformer by grad mode and adapter, VAE, text encoders, judge, optimiser).
    """

    def __init__(self, memory: bool = False, count: bool = False) -> None:
        self.memory = memory
        self.count = count
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

    def on_fit_start(self, trainer, pl_module) -> None:
        if not self.count:
            return
        policy = pl_module.policy
        layer = policy._lora_layers()[0]

        def record(_module, _args, kwargs):
            if layer._disable_adapters:
                adapter = "none"
            else:
                adapter = layer._active_adapter[0]
            mode = "grad" if torch.is_grad_enabled() else "no_grad"
            self._transformer_calls.append(
                (f"transformer/{mode}/{adapter}", kwargs["hidden_states"].shape[0])
            )

        self._hook = policy.transformer.register_forward_pre_hook(record, with_kwargs=True)
        optimizer = trainer.optimizers[0]
        self._counter = count_calls(
            {
                "text_encode": (policy._pipeline, "encode_prompt"),
                "vae_encode": (policy.vae, "encode"),
                "vae_decode": (policy.vae, "decode"),
                "judge": (pl_module.scorer, "score"),
                "optimizer_step": (optimizer, "step"),
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
    """

    walls: list[float]
    gap: float
    stats: list[dict[str, float]]
    peaks: list[int] = field(default_factory=list)
    calls: dict[str, dict[int, int]] = field(default_factory=dict)
    rollout_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def iteration_s(self) -> float:
        """Median wall time of one iteration including Lightning's between-batch work."""
        import statistics

        return statistics.median(self.walls) + self.gap

    def stat(self, key: str) -> float:
        import statistics

        return statistics.median(s[key] for s in self.stats if key in s)


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
) -> RunResult:
    """Fit ``FlowRLModule(policy, scorer, **module)`` for ``warmup + iterations`` RL iterations of ``num_chains``
    chains each, in a Lightning ``Trainer`` configured like ``mtflow fit`` (CSV logs every step, no progress bar,
    no checkpoints), and return the timings of the last ``iterations``."""
    from mtflow.testing.scorers import BrightnessScorer
    from mtflow.training.module import FlowRLModule

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    scorer = scorer or BrightnessScorer()
    total = warmup + iterations
    model = FlowRLModule(policy, scorer, max_iterations=total, **module)
    recorder = IterationRecorder(memory=memory, count=count)
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
    gaps = recorder.gaps[warmup:] or recorder.gaps or [0.0]
    result = RunResult(
        walls=recorder.walls[warmup:],
        gap=float(np.median(gaps)),
        stats=recorder.stats[warmup:],
        peaks=recorder.peaks[warmup:],
        calls=recorder.calls[-1] if recorder.calls else {},
        rollout_bytes=rollout_bytes(model.last_rollout) if model.last_rollout is not None else {},
    )
    model.last_rollout = None
    model.on_fit_end()
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
        module: ``FlowRLModule`` keyword arguments.
        iterations: timed iterations.
        warmup: untimed iterations first.
        threads: torch intra-op threads.
        compile_transformer: after the eager run, ``transformer.compile()`` and run again (warm-up ``warmup + 1``).
    """

    model_path: str
    spec: dict[str, Any]
    num_chains: int
    module: dict[str, Any]
    iterations: int = 2
    warmup: int = 1
    threads: int = 1
    compile_transformer: bool = False


def run_job(job: WorkerJob) -> dict[str, Any]:
    torch.set_num_threads(job.threads)
    spec = ModelSpec(**job.spec)
    started = time.perf_counter()
    policy = load_policy(job.model_path, spec)
    turns = int(job.module.get("num_turns", 3))
    module = {k: v for k, v in job.module.items() if k != "num_turns"}
    chains = bench_chains(2 * job.num_chains, turns, seed=1)
    loaded_rss = _rss()
    eager = run_iterations(policy, chains, job.num_chains, module, job.iterations, job.warmup, memory=True)
    out: dict[str, Any] = {
        "eager": asdict(eager),
        "loaded_rss": loaded_rss,
        "load_s": time.perf_counter() - started,
    }
    if job.compile_transformer:
        compile_started = time.perf_counter()
        policy.transformer.compile()
        compiled = run_iterations(policy, chains, job.num_chains, module, job.iterations, job.warmup + 1)
        out["compiled"] = asdict(compiled)
        out["compiled_total_s"] = time.perf_counter() - compile_started
    return out


def _rss() -> int:
    from mtflow.bench.timing import current_rss_bytes

    return current_rss_bytes()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m mtflow.bench.harness '<WorkerJob as JSON>'")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    job = WorkerJob(**json.loads(argv[0]))
    result = run_job(job)
    print("MTFLOW_BENCH_RESULT " + json.dumps(result))


def run_worker(job: WorkerJob, timeout: float = 900.0) -> dict[str, Any]:
    """Run ``job`` in a fresh Python process with ``timing.memory_env()`` and return its JSON result."""
    import subprocess

    from mtflow.bench.timing import memory_env

    env = memory_env()
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = [sys.executable, "-m", "mtflow.bench.harness", json.dumps(asdict(job))]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    for line in done.stdout.splitlines():
        if line.startswith("MTFLOW_BENCH_RESULT "):
            return json.loads(line.split(" ", 1)[1])
    tail = (done.stderr or done.stdout)[-2000:]
    raise RuntimeError(f"benchmark worker failed (exit {done.returncode}) for {job}: {tail}")


if __name__ == "__main__":
    main()
