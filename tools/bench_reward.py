"""Benchmark the judge's plumbing: what keeps a judge server busy, measured as ratios in one run.

The judge is the scripted OpenAI-compatible server (``python -m mtflow.reward.openai_compat_server --scripted``, a
subprocess) with a fixed latency per request, standing in for ``vllm serve``: the figures are about mtflow's
side (how many requests it keeps in flight, and where), not about a model. 64 trajectories of K turns:

- inflight: 16 clients send 4 trajectories each to the reward service (a subprocess, batches of 8 items), which
  runs 4 batches in flight vs 1;
- criteria: ``VLMJudge`` sends a trajectory's IF and CC prompts together vs IF first, then CC;
- endpoints: ``OpenAIBackend`` spreads the prompts over two judge endpoints vs one (each serves ``--capacity``
  requests at once, as a GPU's batch slots would);
- failover: two endpoints, one killed (SIGKILL) mid-run: every trajectory must still be scored exactly once,
  with the scores of a run where nothing died;
- batching (``--parts batching``): the tiny Qwen3-VL behind the service, one request at a time vs 8 concurrent
  clients merged by the server (the judge's own batching gain on a CPU).

    python tools/bench_reward.py                        # inflight, criteria, endpoints, failover
    python tools/bench_reward.py --parts batching       # the tiny-model batching comparison
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from mtflow.reward.base import ScoringItem
from mtflow.reward.client import RemoteScorer
from mtflow.reward.judge import VLMJudge
from mtflow.reward.openai_backend import OpenAIBackend

MODEL = "Qwen/Qwen3-VL-8B-Instruct"
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


def child_env(threads: int = 1) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JUDGE_API_KEY", "OPENAI_API_KEY")}
    env.update(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return env


@contextmanager
def launched(command: list[str], ready: Path, threads: int = 1) -> Iterator[tuple[subprocess.Popen, str]]:
    """Run a server that writes ``{"url": ...}`` to ``ready``; yields (process, url); always stops it."""
    log = ready.with_suffix(".log")
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=child_env(threads), start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(log.read_text()[-3000:])
            time.sleep(0.05)
        yield process, json.loads(ready.read_text())["url"]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


def scripted_judge(workdir: Path, name: str, latency_ms: float, capacity: int | None = None):
    """The scripted judge in a subprocess; yields (process, base URL ending in /v1)."""
    ready = workdir / f"{name}.json"
    command = [sys.executable, "-m", "mtflow.reward.openai_compat_server", "--scripted"]
    command += ["--latency-ms", str(latency_ms), "--port", "0", "--ready-file", str(ready)]
    if capacity:
        command += ["--max-concurrent", str(capacity)]
    return launched(command, ready)


def reward_server(workdir: Path, name: str, config: dict, threads: int = 1):
    """``python -m mtflow.reward.server --config`` in a subprocess; yields (process, URL)."""
    import yaml

    ready = workdir / f"{name}.json"
    config = {**config, "host": "127.0.0.1", "port": 0, "ready_file": str(ready), "log_level": "warning"}
    (workdir / f"{name}.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "mtflow.reward.server", "--config", str(workdir / f"{name}.yaml")]
    return launched(command, ready, threads)


def openai_judge(base_url: str | list[str], concurrency: int) -> dict:
    return {
        "class_path": "mtflow.reward.judge.VLMJudge",
        "init_args": {
            "backend": {
                "class_path": "mtflow.reward.openai_backend.OpenAIBackend",
                "init_args": {"base_url": base_url, "model": MODEL, "max_concurrency": concurrency},
            },
            "mode": "non_thinking",
        },
    }


def best_of(repeats: int, run) -> float:
    return min(run() for _ in range(repeats))


def time_clients(url: str, shares: list[list[ScoringItem]]) -> float:
    """Wall time until every client (one thread each, its RemoteScorer set up untimed) has its scores."""
    scorers = [RemoteScorer(url, deadline_s=600) for _ in shares]
    for scorer in scorers:
        scorer.score(shares[0][:1])  # connection and event loop, as a rank has them from earlier iterations
    barrier = threading.Barrier(len(shares) + 1)
    errors: list[BaseException] = []

    def client(scorer: RemoteScorer, share: list[ScoringItem]) -> None:
        barrier.wait()
        try:
            if not scorer.score(share).scored.all():
                raise RuntimeError("a trajectory came back unscored")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=pair) for pair in zip(scorers, shares)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    for scorer in scorers:
        scorer.close()
    if errors:
        raise errors[0]
    return elapsed


def bench_inflight(args, items, workdir: Path) -> dict:
    shares = [items[i : i + 4] for i in range(0, len(items), 4)]
    result = {}
    with scripted_judge(workdir, "judge-inflight", args.latency_ms) as (_, judge_url):
        for in_flight in (1, 4):
            config = {
                "scorer": openai_judge(judge_url, 512),
                "max_batch_size": 8,
                "max_wait_ms": 5.0,
                "max_batches_in_flight": in_flight,
            }
            with reward_server(workdir, f"reward-{in_flight}", config) as (_, url):
                result[in_flight] = best_of(args.repeats, lambda url=url: time_clients(url, shares))
    return {
        "inflight_1_s": round(result[1], 3),
        "inflight_4_s": round(result[4], 3),
        "inflight_speedup": round(result[1] / result[4], 2),
    }


def time_judge(judge: VLMJudge, items: list[ScoringItem]) -> tuple[float, object]:
    start = time.perf_counter()
    batch = judge.score(items)
    elapsed = time.perf_counter() - start
    if not batch.scored.all():
        raise RuntimeError("a trajectory came back unscored")
    return elapsed, batch


def bench_criteria(args, items, workdir: Path) -> dict:
    with scripted_judge(workdir, "judge-criteria", args.latency_ms) as (_, judge_url):
        backend = OpenAIBackend(judge_url, MODEL, max_concurrency=1024)
        times = {}
        for together in (False, True):
            judge = VLMJudge(backend, criteria_together=together)
            time_judge(judge, items[:2])  # the client's loop and connections
            times[together] = best_of(args.repeats, lambda judge=judge: time_judge(judge, items)[0])
        backend.close()
    return {
        "criteria_apart_s": round(times[False], 3),
        "criteria_together_s": round(times[True], 3),
        "criteria_speedup": round(times[False] / times[True], 2),
    }


def bench_endpoints(args, items, workdir: Path) -> dict:
    with (
        scripted_judge(workdir, "judge-a", args.latency_ms, args.capacity) as (_, url_a),
        scripted_judge(workdir, "judge-b", args.latency_ms, args.capacity) as (_, url_b),
    ):
        times = {}
        for name, urls in (("one", url_a), ("two", [url_a, url_b])):
            backend = OpenAIBackend(urls, MODEL, max_concurrency=4 * args.capacity)
            judge = VLMJudge(backend)
            time_judge(judge, items[:2])
            times[name] = best_of(args.repeats, lambda judge=judge: time_judge(judge, items)[0])
            backend.close()
    return {
        "endpoints_one_s": round(times["one"], 3),
        "endpoints_two_s": round(times["two"], 3),
        "endpoints_speedup": round(times["one"] / times["two"], 2),
    }


def bench_failover(args, items, workdir: Path) -> dict:
    with scripted_judge(workdir, "judge-ref", args.latency_ms) as (_, reference_url):
        backend = OpenAIBackend(reference_url, MODEL, max_concurrency=1024)
        reference = VLMJudge(backend).score(items)
        backend.close()
    with (
        scripted_judge(workdir, "judge-victim", args.latency_ms, args.capacity) as (victim, victim_url),
        scripted_judge(workdir, "judge-survivor", args.latency_ms, args.capacity) as (_, survivor_url),
    ):
        backend = OpenAIBackend(
            [victim_url, survivor_url], MODEL, max_concurrency=4 * args.capacity, max_retries=1
        )
        outcome = {}
        thread = threading.Thread(target=lambda: outcome.update(batch=VLMJudge(backend).score(items)))
        start = time.perf_counter()
        thread.start()
        stats_url = victim_url.removesuffix("/v1") + "/stats"
        while httpx.get(stats_url, timeout=5).json()["received"] < len(
            items
        ):  # a good part of the run is there
            time.sleep(0.01)
        os.killpg(victim.pid, signal.SIGKILL)
        killed_after = time.perf_counter() - start
        thread.join()
        elapsed = time.perf_counter() - start
        routes = backend.pool.describe()
        backend.close()
    batch = outcome["batch"]
    once = [d["item_id"] for d in batch.diagnostics] == [item.item_id for item in items]
    same = torch.equal(batch.instruction_following, reference.instruction_following) and torch.equal(
        batch.content_consistency, reference.content_consistency
    )
    return {
        "failover_killed_after_s": round(killed_after, 3),
        "failover_total_s": round(elapsed, 3),
        "failover_scored": int(batch.trajectory_scored.sum()),
        "failover_each_once": once,
        "failover_same_scores": bool(same),
        "failover_victim_requests": routes[0]["requests"],
        "failover_survivor_requests": routes[1]["requests"],
    }


def bench_batching(args, workdir: Path) -> dict:
    """The tiny Qwen3-VL behind the service: one request at a time vs 8 concurrent clients merged by the server."""
    from mtflow.reward.backends import TransformersBackend
    from mtflow.testing.tiny_qwen3vl import build_tiny_qwen3vl

    model = str(build_tiny_qwen3vl(workdir / "tiny-qwen3vl", seed=0))
    items = make_trajectories(32, 2, 64, seed=0)
    judge = VLMJudge(TransformersBackend(model, max_batch_size=32))
    judge.score(items[:2])
    one_by_one = best_of(args.repeats, lambda: sum(judge.score([i]).latency_s for i in items))
    batched = best_of(args.repeats, lambda: judge.score(items).latency_s)
    scorer = {
        "class_path": "mtflow.reward.judge.VLMJudge",
        "init_args": {
            "backend": {
                "class_path": "mtflow.reward.backends.TransformersBackend",
                "init_args": {"model": model, "max_batch_size": 32},
            }
        },
    }
    plain = {"scorer": scorer, "max_batch_size": 1, "max_wait_ms": 0.0, "max_batches_in_flight": 1}
    merging = {"scorer": scorer, "max_batch_size": 32, "max_wait_ms": 50.0, "max_batches_in_flight": 1}
    with (
        reward_server(workdir, "plain", plain) as (_, plain_url),
        reward_server(workdir, "merging", merging) as (_, merging_url),
    ):
        sequential = best_of(args.repeats, lambda: _one_by_one(plain_url, items))
        concurrent = best_of(args.repeats, lambda: time_clients(merging_url, [items[c::8] for c in range(8)]))
        health = httpx.get(f"{merging_url}/health", timeout=10).json()["batching"]
    return {
        "batching_http_one_by_one_s": round(sequential, 3),
        "batching_http_merged_s": round(concurrent, 3),
        "batching_http_speedup": round(sequential / concurrent, 2),
        "batching_server_mean_batch": round(statistics.mean(health["recent_batch_sizes"]), 1),
        "batching_in_process_speedup": round(one_by_one / batched, 2),
    }


def _one_by_one(url: str, items: list[ScoringItem]) -> float:
    scorer = RemoteScorer(url, deadline_s=600)
    scorer.score(items[:1])
    start = time.perf_counter()
    for item in items:
        scorer.score([item])
    elapsed = time.perf_counter() - start
    scorer.close()
    return elapsed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts", default="inflight,criteria,endpoints,failover", help="comma-separated parts"
    )
    parser.add_argument("--trajectories", type=int, default=64)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--image-side", type=int, default=32)
    parser.add_argument(
        "--latency-ms", type=float, default=2000.0, help="the stand-in judge's latency per request"
    )
    parser.add_argument("--capacity", type=int, default=64, help="requests one endpoint serves at once")
    parser.add_argument("--repeats", type=int, default=3, help="report the best of this many runs")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    parts = args.parts.split(",")
    items = make_trajectories(args.trajectories, args.turns, args.image_side, seed=0)
    result: dict = {"trajectories": args.trajectories, "turns": args.turns, "latency_ms": args.latency_ms}
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        for part, run in (
            ("inflight", lambda: bench_inflight(args, items, workdir)),
            ("criteria", lambda: bench_criteria(args, items, workdir)),
            ("endpoints", lambda: bench_endpoints(args, items, workdir)),
            ("failover", lambda: bench_failover(args, items, workdir)),
            ("batching", lambda: bench_batching(args, workdir)),
        ):
            if part in parts:
                result.update(run())
                print(json.dumps(result), flush=True)
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
