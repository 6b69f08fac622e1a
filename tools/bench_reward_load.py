"""Load benchmark of the reward service: one client, then 64 concurrent clients, each for 30 s, in one run.

The service (``python -m mtflow.reward.server``, a subprocess, with its default admission control and 4 batches
in flight) serves a ``VLMJudge`` over the scripted OpenAI-compatible judge (a subprocess answering after a fixed
latency, standing in for vLLM). Every client sends request after request of ``--items`` trajectories (K turns,
random ``--image-side`` px PNGs) as fast as the answers come back. Reported per phase: requests, errors (anything
but a 200 with every turn scored), p50 / p99 latency and throughput; and the 64-client figures as ratios to the
single client's.

    python tools/bench_reward_load.py                      # 1 client 30 s, then 64 clients 30 s
    python tools/bench_reward_load.py --seconds 10 --clients 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_reward import MODEL, make_trajectories, openai_judge, reward_server, scripted_judge  # noqa: E402

from mtflow.reward.wire import item_to_json  # noqa: E402


async def phase(url: str, bodies: list[bytes], clients: int, seconds: float, items: int) -> dict:
    """``clients`` loops posting ``bodies`` (round robin) for ``seconds``; latency and outcome of every request."""
    latencies: list[float] = []
    errors: list[str] = []
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(timeout=300, limits=limits) as http:

        async def client(index: int) -> None:
            turn = index
            while time.monotonic() < stop:
                body = bodies[turn % len(bodies)]
                turn += clients
                start = time.perf_counter()
                try:
                    response = await http.post(
                        f"{url}/v1/score", content=body, headers={"content-type": "application/json"}
                    )
                    ok = response.status_code == 200 and all(all(row) for row in response.json()["scored"])
                    if not ok:
                        errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                latencies.append(time.perf_counter() - start)

        began = time.monotonic()
        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.monotonic() - began
    values = np.array(latencies)
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "requests": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "p50_latency_s": round(float(np.percentile(values, 50)), 3),
        "p99_latency_s": round(float(np.percentile(values, 99)), 3),
        "requests_per_s": round(len(latencies) / elapsed, 2),
        "trajectories_per_s": round(len(latencies) * items / elapsed, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    parser.add_argument("--items", type=int, default=4, help="trajectories per request")
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--image-side", type=int, default=64)
    parser.add_argument(
        "--latency-ms", type=float, default=200.0, help="the stand-in judge's latency per request"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    pool = make_trajectories(16 * args.items, args.turns, args.image_side, seed=0)
    bodies = [
        json.dumps({"items": [item_to_json(item) for item in pool[i : i + args.items]]}).encode()
        for i in range(0, len(pool), args.items)
    ]
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        with scripted_judge(workdir, "judge", args.latency_ms) as (_, judge_url):
            config = {"scorer": openai_judge(judge_url, 1024), "max_batch_size": 32, "max_wait_ms": 20.0}
            with reward_server(workdir, "reward", config) as (_, url):
                asyncio.run(phase(url, bodies, 1, 2.0, args.items))  # warm-up
                single = asyncio.run(phase(url, bodies, 1, args.seconds, args.items))
                print(json.dumps(single), flush=True)
                many = asyncio.run(phase(url, bodies, args.clients, args.seconds, args.items))
                print(json.dumps(many), flush=True)
    result = {
        "model": MODEL,
        "judge_latency_ms": args.latency_ms,
        "items_per_request": args.items,
        "turns": args.turns,
        "single": single,
        "concurrent": many,
        "throughput_ratio": round(many["requests_per_s"] / single["requests_per_s"], 2),
        "p99_latency_ratio": round(many["p99_latency_s"] / single["p99_latency_s"], 2),
    }
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
