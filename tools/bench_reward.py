"""Benchmark the reward service: 32 trajectories scored one request at a time vs batched by the server.

Both runs use the same judge (tiny Qwen3-VL by default, transformers backend) behind the real server
(``python -m mtflow.reward.server`` in a subprocess, loopback HTTP), as training ranks would reach it:

- sequential: one client sends one trajectory per request and waits for each answer (how the anchors call
  their judge), against a server that does not wait for company (``max_wait_ms=0``, batch size 1);
- batched: ``--clients`` clients (threads here, training ranks in real use) each send their share of the
  trajectories in one request at the same moment; the server merges the requests into backend batches of up
  to ``--max-batch-size`` items.

The in-process judge is timed the same two ways, to separate backend batching from HTTP costs.

    python tools/bench_reward.py                       # tiny model, 32 trajectories, 2 turns
    python tools/bench_reward.py --model /path/to/judge --mode thinking --max-new-tokens 256
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mtflow.reward.backends import TransformersBackend
from mtflow.reward.base import ScoringItem
from mtflow.reward.client import RemoteScorer
from mtflow.reward.judge import VLMJudge

INSTRUCTIONS = [
    "add a red circle to the left",
    "make the sky blue",
    "remove the cat",
    "turn the square into a star",
]


def make_trajectories(count: int, turns: int, side: int, seed: int) -> list[ScoringItem]:
    rng = np.random.default_rng(seed)

    def image() -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))

    return [
        ScoringItem(
            item_id=f"chain{i // 4}/g{i % 4}",
            chain_id=f"chain{i // 4}",
            source=image(),
            outputs=[image() for _ in range(turns)],
            instructions=[INSTRUCTIONS[(i + k) % len(INSTRUCTIONS)] for k in range(turns)],
        )
        for i in range(count)
    ]


def time_sequential(url: str, items: list[ScoringItem]) -> float:
    scorer = RemoteScorer(url, deadline_s=3600)
    scorer.health()
    start = time.perf_counter()
    for item in items:
        scorer.score([item])
    return time.perf_counter() - start


def time_concurrent(url: str, items: list[ScoringItem], clients: int) -> float:
    shares = [items[c::clients] for c in range(clients)]
    barrier = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def client(share: list[ScoringItem]) -> None:
        scorer = RemoteScorer(url, deadline_s=3600)
        scorer.health()  # a rank's client and connection outlive one iteration: set them up untimed
        barrier.wait()
        try:
            scorer.score(share)  # one call per rank and iteration, as the trainer makes it
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


@contextmanager
def served(config: dict, workdir: Path, threads: int):
    """``python -m mtflow.reward.server`` on a free loopback port; yields its URL, always stops it."""
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    ready = workdir / "ready.json"
    config = {**config, "host": "127.0.0.1", "port": 0, "ready_file": str(ready), "log_level": "warning"}
    (workdir / "server.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with open(workdir / "server.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mtflow.reward.server", "--config", str(workdir / "server.yaml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        while not ready.exists():
            if process.poll() is not None:
                raise RuntimeError((workdir / "server.log").read_text()[-3000:])
            time.sleep(0.1)
        yield json.loads(ready.read_text())["url"]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


def best_of(repeats: int, run) -> float:
    return min(run() for _ in range(repeats))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="judge folder or hub id (default: build the tiny Qwen3-VL)"
    )
    parser.add_argument("--trajectories", type=int, default=32)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--image-side", type=int, default=64)
    parser.add_argument("--mode", choices=["non_thinking", "thinking"], default="non_thinking")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="thinking mode answer budget")
    parser.add_argument(
        "--clients", type=int, default=8, help="concurrent clients (ranks) in the batched run"
    )
    parser.add_argument("--max-batch-size", type=int, default=32, help="server batch limit (items)")
    parser.add_argument("--max-wait-ms", type=float, default=50.0, help="server batching wait")
    parser.add_argument("--backend-batch", type=int, default=32, help="prompts per forward pass")
    parser.add_argument("--repeats", type=int, default=3, help="report the best of this many runs")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (server and in-process runs)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if model is None:
            from mtflow.testing.tiny_qwen3vl import build_tiny_qwen3vl

            model = str(build_tiny_qwen3vl(Path(scratch) / "tiny-qwen3vl", seed=0))
        backend = TransformersBackend(model, device=args.device, max_batch_size=args.backend_batch)
        judge = VLMJudge(backend, mode=args.mode, max_new_tokens=args.max_new_tokens)
        items = make_trajectories(args.trajectories, args.turns, args.image_side, seed=0)
        judge.score(items[:2])  # warm up kernels and allocator

        in_process_one_by_one = best_of(args.repeats, lambda: sum(judge.score([i]).latency_s for i in items))
        in_process_batched = best_of(args.repeats, lambda: judge.score(items).latency_s)

        scorer = {
            "class_path": "mtflow.reward.judge.VLMJudge",
            "init_args": {
                "backend": {
                    "class_path": "mtflow.reward.backends.TransformersBackend",
                    "init_args": {
                        "model": model,
                        "device": args.device,
                        "max_batch_size": args.backend_batch,
                    },
                },
                "mode": args.mode,
                "max_new_tokens": args.max_new_tokens,
            },
        }
        plain_config = {"scorer": scorer, "max_batch_size": 1, "max_wait_ms": 0.0}
        batching_config = {
            "scorer": scorer,
            "max_batch_size": args.max_batch_size,
            "max_wait_ms": args.max_wait_ms,
        }
        root = Path(scratch)
        with (
            served(plain_config, root / "plain", args.threads) as plain_url,
            served(batching_config, root / "batching", args.threads) as batching_url,
        ):
            time_sequential(plain_url, items[:2])
            sequential = best_of(args.repeats, lambda: time_sequential(plain_url, items))
            time_concurrent(batching_url, items[: args.clients], args.clients)
            before = RemoteScorer(batching_url).health()["batches"]
            concurrent = best_of(args.repeats, lambda: time_concurrent(batching_url, items, args.clients))
            health = RemoteScorer(batching_url).health()
            sizes = health["recent_batch_sizes"][-(health["batches"] - before) :]

    n = args.trajectories
    result = {
        "trajectories": n,
        "turns": args.turns,
        "mode": args.mode,
        "model": args.model or "tiny-qwen3vl",
        "http_sequential_s": round(sequential, 4),
        "http_batched_s": round(concurrent, 4),
        "http_speedup": round(sequential / concurrent, 2),
        "http_sequential_traj_per_s": round(n / sequential, 1),
        "http_batched_traj_per_s": round(n / concurrent, 1),
        "server_batches_per_run": round((health["batches"] - before) / args.repeats, 1),
        "server_mean_batch_items": round(statistics.mean(sizes), 1) if sizes else 0.0,
        "in_process_one_by_one_s": round(in_process_one_by_one, 4),
        "in_process_batched_s": round(in_process_batched, 4),
        "in_process_speedup": round(in_process_one_by_one / in_process_batched, 2),
    }
    print(json.dumps(result, indent=2))
    print(
        f"\n{n} trajectories: {sequential:.2f} s one request at a time, {concurrent:.2f} s batched by the server "
        f"-> {result['http_speedup']}x throughput"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
