"""A flood of maximal requests against a reward server in a real subprocess: its resident memory stays within the
configured decoded-bytes budget plus a stated constant, every admissible request is scored, and every request
that could never fit gets 413 with the numbers.

The flood: 24 clients at once, each with two trajectories of two blank 2048 x 2048 PNGs (16 MiB each decoded, a
few KiB on the wire: 64 MiB per request, unbounded they would hold 1.5 GiB), plus 8 clients whose requests would
decode to 128 MiB. The server keeps full-size images (its judge does not downscale) and may hold 160 MiB of
decoded images in flight; the judge answers after 300 ms, so requests pile up.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from mtflow.reward.openai_compat_server import create_scripted_openai_app
from mtflow.reward.server import BackgroundServer

from .conftest import (
    JUDGE_MODEL,
    blank_png,
    item_json,
    memory_kib,
    openai_judge_config,
    reset_peak_rss,
    reward_server_process,
)

BUDGET_MIB = 160
# What the server may hold beyond the decoded images: request bodies and their parsed JSON (a few KiB each
# here), the judge's PNG re-encoding of one image per batch in flight (16 MiB each, two batches), thread stacks
# and allocator slack.
CONSTANT_MIB = 96


@pytest.mark.slow
def test_memory_stays_within_the_budget_under_a_flood(tmp_path):
    judge_app = create_scripted_openai_app(JUDGE_MODEL, latency_s=0.3)
    with BackgroundServer(judge_app) as judge:
        config = {
            "scorer": openai_judge_config(f"{judge.url}/v1", image_max_side=None, max_concurrency=64),
            "max_batch_size": 2,
            "max_wait_ms": 5.0,
            "max_batches_in_flight": 2,
            "max_request_decoded_mb": 80,
            "max_inflight_decoded_mb": BUDGET_MIB,
            "max_queue_wait_s": 300,
        }
        with reward_server_process(config, tmp_path) as (process, url):
            image = blank_png(2048)
            admissible = {"items": [item_json(f"a{i}", [image, image]) for i in range(2)]}
            oversized = {"items": [item_json(f"b{i}", [image, image]) for i in range(4)]}
            warm = httpx.post(f"{url}/v1/score", json=admissible, timeout=120)  # threads, pools, imports
            assert warm.status_code == 200, warm.text
            time.sleep(0.5)
            baseline = memory_kib(process.pid)["VmRSS"]
            exact_peak = reset_peak_rss(process.pid)
            sampled = [baseline]
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    sampled.append(memory_kib(process.pid)["VmRSS"])
                    time.sleep(0.01)

            bodies = [admissible] * 24 + [oversized] * 8
            responses: list = [None] * len(bodies)
            barrier = threading.Barrier(len(bodies))

            def send(index: int) -> None:
                with httpx.Client(timeout=600) as client:
                    barrier.wait()
                    responses[index] = client.post(f"{url}/v1/score", json=bodies[index])

            sampler = threading.Thread(target=sample)
            sampler.start()
            threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=600)
            stop.set()
            sampler.join()
            peak = memory_kib(process.pid)["VmHWM"] if exact_peak else max(sampled)
            health = httpx.get(f"{url}/health", timeout=10).json()["admission"]
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * 24 + [413] * 8, statuses
    assert all(r.json()["scored"] == [[True], [True]] for r in responses[:24])
    detail = responses[24].json()["detail"]
    assert "would decode to 128.0 MiB" in detail and "the limit per request is 80.0 MiB" in detail
    growth_mib = (max(peak, max(sampled)) - baseline) / 1024
    print(
        f"baseline {baseline / 1024:.0f} MiB, growth {growth_mib:.0f} MiB, budget peak {health['decoded_mib_peak']}"
    )
    assert health["decoded_mib_peak"] <= BUDGET_MIB
    assert growth_mib <= BUDGET_MIB + CONSTANT_MIB, growth_mib
