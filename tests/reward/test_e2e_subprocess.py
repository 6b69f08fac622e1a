"""End to end over real HTTP: ``python -m mtflow.reward.server --config`` in a subprocess serving the tiny
Qwen3-VL through the transformers backend, scored through ``RemoteScorer``."""

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

from .conftest import make_items, reward_server_process

TOKEN_ENV = "MTFLOW_TEST_REWARD_TOKEN"


def judge_config(model_path, **server) -> dict:
    return {
        "scorer": {
            "class_path": "mtflow.reward.judge.VLMJudge",
            "init_args": {
                "backend": {
                    "class_path": "mtflow.reward.backends.TransformersBackend",
                    "init_args": {"model": str(model_path), "max_batch_size": 16},
                },
                "mode": "non_thinking",
            },
        },
        **server,
    }


@pytest.fixture(scope="module")
def served(tiny_qwen3vl_path, tmp_path_factory):
    os.environ[TOKEN_ENV] = "tok-123"  # the child inherits it; the YAML names only the variable
    try:
        config = judge_config(tiny_qwen3vl_path, token_env=TOKEN_ENV, max_wait_ms=50.0)
        with reward_server_process(config, tmp_path_factory.mktemp("served")) as (process, url):
            yield process, url
    finally:
        os.environ.pop(TOKEN_ENV, None)


def test_remote_scores_equal_in_process_scores(served, tiny_backend):
    _, url = served
    items = make_items(4, num_turns=2, seed=31)
    remote = RemoteScorer(url, token="tok-123", deadline_s=60).score(items)
    local = VLMJudge(tiny_backend).score(items)
    assert remote.scored.all()
    assert torch.allclose(remote.instruction_following, local.instruction_following, atol=1e-5)
    assert torch.allclose(remote.content_consistency, local.content_consistency, atol=1e-5)
    assert remote.instruction_following.std() > 1e-2
    assert [d["item_id"] for d in remote.diagnostics] == [item.item_id for item in items]
    health = httpx.get(f"{url}/health", headers={"Authorization": "Bearer tok-123"}).json()
    assert health["backend"] == "transformers" and health["scorer"]["mode"] == "non_thinking"


def test_token_from_environment_is_enforced(served):
    _, url = served
    response = httpx.post(f"{url}/v1/score", json={"items": []}, timeout=10)
    assert response.status_code == 401


def test_server_dying_mid_batch(tiny_qwen3vl_path, tmp_path):
    """Kill the server while it scores a batch: the client retries, then flags every item; nothing invented."""
    config = judge_config(tiny_qwen3vl_path, max_wait_ms=1.0)
    config["scorer"]["init_args"]["backend"]["init_args"]["max_batch_size"] = 4
    with reward_server_process(config, tmp_path) as (process, url):
        items = make_items(48, num_turns=3, seed=32)  # 576 prompts in chunks of 4: seconds of work
        outcome = {}

        def call() -> None:
            scorer = RemoteScorer(url, max_retries=2, backoff_s=0.05, deadline_s=60, on_unavailable="flag")
            outcome["batch"] = scorer.score(items)

        thread = threading.Thread(target=call)
        thread.start()
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/health", timeout=5).json()["batching"]["in_flight_items"] == 0:
            assert time.monotonic() < deadline, "the batch never started"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        thread.join(timeout=60)
    batch = outcome["batch"]
    assert batch.scored.shape == (48, 3) and not batch.scored.any()
    assert batch.instruction_following.isnan().all() and batch.content_consistency.isnan().all()
    error = batch.diagnostics[0]["error"]
    assert url in error and "3 attempt(s)" in error
