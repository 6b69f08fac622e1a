"""Servers killed (SIGKILL) in the middle of a scoring call, in real subprocesses.

- The only reward server dies: the client retries within its deadline, then flags (or raises); nothing invented.
- One of two reward servers dies, or one of two judge endpoints behind the OpenAI backend: every trajectory is
  still scored exactly once, with the same scores as a run where nothing died.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest
import torch

from mtflow.reward.client import RemoteScorer
from mtflow.reward.judge import VLMJudge
from mtflow.reward.openai_backend import OpenAIBackend

from .conftest import (
    JUDGE_MODEL,
    make_items,
    openai_judge_config,
    reward_server_process,
    scripted_judge_process,
)


def kill_when(process, ready: callable, timeout_s: float = 60.0) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` is true."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < deadline, "the victim never got work"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def in_background(function) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = function()
        except BaseException as exc:  # checked by the test
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def assert_same_scores_once(batch, reference, items) -> None:
    assert [d["item_id"] for d in batch.diagnostics] == [
        item.item_id for item in items
    ]  # each once, in order
    assert batch.scored.all()
    assert torch.equal(batch.instruction_following, reference.instruction_following)
    assert torch.equal(batch.content_consistency, reference.content_consistency)


@pytest.fixture(scope="module")
def reference_judge(scripted_judge):
    server, _ = scripted_judge
    backend = OpenAIBackend(f"{server.url}/v1", JUDGE_MODEL)
    yield VLMJudge(backend)
    backend.close()


def in_flight(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).json()["batching"]["in_flight_items"] > 0
    except httpx.HTTPError:
        return False


def test_the_only_reward_server_dies_mid_request(scripted_judge, tmp_path):
    server, _ = scripted_judge
    config = {"scorer": openai_judge_config(f"{server.url}/v1"), "max_wait_ms": 1.0}
    items = make_items(8, seed=40)
    with reward_server_process(config, tmp_path) as (process, url):
        scorer = RemoteScorer(
            url, max_retries=2, backoff_s=0.05, backoff_max_s=0.2, deadline_s=20, on_unavailable="flag"
        )
        killed = threading.Event()

        def keep_scoring() -> list:
            # a judge answer takes 20 ms: calls follow each other until one is caught mid-request
            results = []
            while not killed.is_set():
                results.append(scorer.score(items))
            return results

        thread, outcome = in_background(keep_scoring)
        kill_when(process, lambda: in_flight(url))
        killed.set()
        started = time.monotonic()
        thread.join(timeout=60)
        scorer.close()
    assert "error" not in outcome, outcome.get("error")
    last = outcome["result"][-1]
    assert not last.scored.any() and last.instruction_following.isnan().all()
    assert url in last.diagnostics[0]["error"] and "3 attempt(s)" in last.diagnostics[0]["error"]
    assert time.monotonic() - started < 20


@pytest.mark.slow
def test_one_of_two_reward_servers_dies(scripted_judge, reference_judge, tmp_path):
    server, _ = scripted_judge
    config = {"scorer": openai_judge_config(f"{server.url}/v1"), "max_wait_ms": 5.0}
    items = make_items(64, seed=41)
    reference = reference_judge.score(items)
    with (
        reward_server_process(config, tmp_path / "a") as (victim, victim_url),
        reward_server_process(config, tmp_path / "b") as (_, survivor_url),
    ):
        scorer = RemoteScorer(
            [victim_url, survivor_url], max_items_per_request=2, max_concurrent_requests=8, deadline_s=60
        )
        thread, outcome = in_background(lambda: scorer.score(items))
        kill_when(victim, lambda: in_flight(victim_url))
        thread.join(timeout=90)
        routes = scorer.pool.describe()
        scorer.close()
    assert "error" not in outcome, outcome.get("error")
    assert_same_scores_once(outcome["result"], reference, items)
    assert (
        routes[0]["requests"] >= 1 and routes[0]["consecutive_failures"] >= 1
    )  # the victim served, then died


@pytest.mark.slow
def test_one_of_two_judge_endpoints_dies(reference_judge, tmp_path):
    items = make_items(64, seed=42)
    reference = reference_judge.score(items)
    with (
        scripted_judge_process(tmp_path, "a", 100.0, "--max-concurrent", "8") as (victim, victim_url),
        scripted_judge_process(tmp_path, "b", 100.0, "--max-concurrent", "8") as (_, survivor_url),
    ):
        backend = OpenAIBackend([victim_url, survivor_url], JUDGE_MODEL, max_concurrency=32, max_retries=1)
        thread, outcome = in_background(lambda: VLMJudge(backend).score(items))

        def victim_busy() -> bool:
            stats = httpx.get(victim_url.removesuffix("/v1") + "/stats", timeout=2).json()
            return stats["received"] >= 16

        kill_when(victim, victim_busy)
        thread.join(timeout=90)
        routes = backend.pool.describe()
        backend.close()
    assert "error" not in outcome, outcome.get("error")
    assert_same_scores_once(outcome["result"], reference, items)
    assert routes[0]["consecutive_failures"] >= 1 and routes[1]["requests"] > routes[0]["requests"]
