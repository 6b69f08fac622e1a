"""One benchmark measurement in a fresh process (peak-memory points must not share a process).

``run_worker(job)`` starts ``python -m benchkit.worker '<WorkerJob as JSON>'`` with ``tools/`` on ``PYTHONPATH``;
the worker loads the tiny model, fits ``FlowRLModule`` for the job's iterations and prints its ``RunResult`` as
JSON on one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchkit.harness import (
    ModelSpec,
    RunResult,
    bench_chains,
    load_policy,
    module_from_json,
    run_iterations,
)
from benchkit.recorder import compile_transformer

TOOLS = Path(__file__).resolve().parents[1]  # the folder holding the benchkit package
RESULT_PREFIX = "MTFLOW_BENCH_RESULT "


@dataclass
class WorkerJob:
    """One measurement in a fresh process.

    Attributes:
        model_path: folder of the tiny pipeline.
        spec: the model spec (as a dict of ``ModelSpec`` fields).
        num_chains: B.
        module: ``FlowRLModule`` keyword arguments in JSON form (``harness.module_to_json``).
        num_turns: K of the benchmark chains.
        iterations: timed iterations (per variant).
        warmup: untimed iterations first (per variant).
        threads: torch intra-op threads.
        variants: ``recorder.VARIANTS`` to alternate (empty: none).
        compile_transformer: ``torch.compile`` the transformer first (for the "eager" / "compiled" variants).
        memory: record the peak RSS of every iteration.
    """

    model_path: str
    spec: dict[str, Any]
    num_chains: int
    module: dict[str, Any]
    num_turns: int = 3
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
    chains = bench_chains(2 * job.num_chains, job.num_turns, size=spec.resolution, seed=1)
    if job.compile_transformer:
        compile_transformer(policy)
    result = run_iterations(
        policy,
        chains,
        job.num_chains,
        module_from_json(job.module),
        job.iterations,
        job.warmup,
        memory=job.memory,
        variants=job.variants or None,
    )
    return {"result": asdict(result)}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit(
            "usage: python -m benchkit.worker '<WorkerJob as JSON>'  (with tools/ on PYTHONPATH)"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    job = WorkerJob(**json.loads(argv[0]))
    result = run_job(job)
    print(RESULT_PREFIX + json.dumps(result))


def run_worker(job: WorkerJob, timeout: float = 900.0, env: dict[str, str] | None = None) -> RunResult:
    """Run ``job`` in a fresh Python process (``env`` added to this process's environment) and return its
    result."""
    env = {**os.environ, **(env or {})}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TOOLS), env.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-m", "benchkit.worker", json.dumps(asdict(job))]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return RunResult(**json.loads(line[len(RESULT_PREFIX) :])["result"])
    tail = (done.stderr or done.stdout)[-2000:]
    raise RuntimeError(f"benchmark worker failed (exit {done.returncode}) for {job}: {tail}")


if __name__ == "__main__":
    main()
