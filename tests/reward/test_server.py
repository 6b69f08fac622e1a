"""The reward server in process (uvicorn on a loopback thread): guards, 4xx answers, dynamic batching, 503."""

from __future__ import annotations

import base64
import json
import pickle
import threading

import httpx
import numpy as np
import pytest
import torch

from mtflow.reward.base import ScorerUnavailableError
from mtflow.reward.client import RemoteScorer
from mtflow.reward.judge import VLMJudge
from mtflow.reward.openai_backend import OpenAIBackend
from mtflow.reward.server import BackgroundServer, create_app
from mtflow.reward.wire import item_to_json

from .conftest import make_items, random_image
from .test_judge import ScriptedBackend

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def guarded(tiny_backend):
    app = create_app(
        VLMJudge(tiny_backend),
        token=TOKEN,
        max_body_mb=0.1,
        max_items_per_request=4,
        max_images_per_item=3,
        max_pixels=64 * 64,
        max_wait_ms=1.0,
    )
    with BackgroundServer(app) as server:
        yield server


def post(server, body=None, token=TOKEN, content=None, content_type="application/json") -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if content is None:
        return httpx.post(f"{server.url}/v1/score", json=body, headers=headers, timeout=60)
    headers["content-type"] = content_type
    return httpx.post(f"{server.url}/v1/score", content=content, headers=headers, timeout=60)


def body_of(items) -> dict:
    return {"items": [item_to_json(item) for item in items]}


def test_valid_request_and_open_health(guarded):
    response = post(guarded, body_of(make_items(2)))
    assert response.status_code == 200, response.text
    payload = response.json()
    assert np.array(payload["instruction_following"]).shape == (2, 2)
    assert [d["item_id"] for d in payload["diagnostics"]] == ["chain0/g0", "chain0/g1"]
    assert httpx.get(f"{guarded.url}/health").json() == {"status": "ok"}  # no configuration without the token
    health = httpx.get(f"{guarded.url}/health", headers={"Authorization": f"bearer {TOKEN}"}).json()
    assert health["backend"] == "transformers" and health["model"].endswith("tiny-qwen3vl")
    assert health["batching"]["queue_depth"] == 0 and health["batching"]["requests"] == 1


@pytest.mark.parametrize("token", [None, "wrong"])
def test_missing_or_wrong_token_is_401(guarded, token):
    response = post(guarded, body_of(make_items(1)), token=token)
    assert response.status_code == 401
    assert ("missing" if token is None else "wrong") in response.json()["detail"]


def test_oversized_body_is_413(guarded):
    rng = np.random.default_rng(0)
    items = make_items(1)
    items[0].outputs[0] = random_image(rng, (64, 64))
    body = json.dumps(body_of(items)).encode()
    padded = body[:-1] + b', "padding": "' + b"x" * 200_000 + b'"}'
    assert post(guarded, content=padded).status_code == 413
    # without a Content-Length (chunked upload) the limit still holds
    chunks = (padded[i : i + 4096] for i in range(0, len(padded), 4096))
    response = httpx.post(
        f"{guarded.url}/v1/score",
        content=chunks,
        headers={"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 413


def test_too_many_images_is_422(guarded):
    response = post(guarded, body_of(make_items(1, num_turns=3)))  # 4 images > 3
    assert response.status_code == 422
    assert "items[0] ('chain0/g0'): 4 images" in response.json()["detail"]


def test_too_many_pixels_is_422(guarded):
    rng = np.random.default_rng(1)
    items = make_items(1)
    items[0].outputs[1] = random_image(rng, (80, 60))
    response = post(guarded, body_of(items))
    assert response.status_code == 422
    assert "outputs[1]" in response.json()["detail"] and "4800 pixels" in response.json()["detail"]


def test_undecodable_images_are_400(guarded):
    body = body_of(make_items(1))
    body["items"][0]["outputs"][1] = base64.b64encode(b"definitely not a png").decode()
    response = post(guarded, body)
    assert response.status_code == 400
    assert "items[0] ('chain0/g0').outputs[1]: not a PNG image" in response.json()["detail"]
    body["items"][0]["outputs"][1] = "%%% not base64 %%%"
    response = post(guarded, body)
    assert response.status_code == 400 and "not valid base64" in response.json()["detail"]


def test_malformed_requests_are_422(guarded):
    body = body_of(make_items(1))
    del body["items"][0]["chain_id"]
    assert post(guarded, body).status_code == 422
    body = body_of(make_items(1))
    body["items"][0]["instructions"].append("one more")
    response = post(guarded, body)
    assert response.status_code == 422 and "2 outputs for 3 instructions" in response.json()["detail"]
    mixed = body_of(make_items(1, num_turns=1) + make_items(1, num_turns=2))
    assert post(guarded, mixed).status_code == 422
    assert post(guarded, body_of(make_items(5, num_turns=1))).status_code == 422  # 5 items > 4
    assert post(guarded, {"items": []}).status_code == 422


def test_pickle_is_never_accepted(guarded):
    payload = pickle.dumps({"items": []})
    response = post(guarded, content=payload, content_type="application/octet-stream")
    assert 400 <= response.status_code < 500


def test_client_flags_items_the_server_rejects(guarded):
    client = RemoteScorer(guarded.url, token=TOKEN, max_retries=0)
    batch = client.score(make_items(2, num_turns=3))  # 4 images per item > 3
    assert not batch.scored.any() and batch.instruction_following.isnan().all()
    assert "HTTP 422" in batch.diagnostics[0]["error"] and "4 images" in batch.diagnostics[0]["error"]
    assert [d["item_id"] for d in batch.diagnostics] == ["chain0/g0", "chain0/g1"]
    with pytest.raises(ScorerUnavailableError, match="refused the credentials"):
        RemoteScorer(guarded.url, token="wrong").score(make_items(1))


def test_concurrent_requests_are_batched(tiny_backend):
    judge = VLMJudge(tiny_backend)
    app = create_app(judge, max_batch_size=32, max_wait_ms=300.0)
    clients = 8
    per_client = [make_items(2, num_turns=2, seed=100 + c) for c in range(clients)]
    expected = [judge.score(items) for items in per_client]
    results: list = [None] * clients
    barrier = threading.Barrier(clients)
    with BackgroundServer(app) as server:

        def rank(c: int) -> None:
            scorer = RemoteScorer(server.url, deadline_s=60)
            barrier.wait()
            results[c] = scorer.score(per_client[c])

        threads = [threading.Thread(target=rank, args=(c,)) for c in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        health = httpx.get(f"{server.url}/health").json()["batching"]
    assert health["requests"] == clients and health["items"] == 2 * clients
    assert health["batches"] < clients, health  # fewer, larger backend batches than requests
    assert health["largest_batch"] > 2, health
    for got, want in zip(results, expected):
        assert torch.allclose(got.instruction_following, want.instruction_following, atol=1e-5)
        assert torch.allclose(got.content_consistency, want.content_consistency, atol=1e-5)


def test_unreachable_judge_is_503_and_the_client_gives_up(unused_port):
    backend = OpenAIBackend(f"http://127.0.0.1:{unused_port}/v1", model="x", max_retries=0, timeout_s=2.0)
    app = create_app(VLMJudge(backend), max_wait_ms=1.0)
    try:
        with BackgroundServer(app) as server:
            response = httpx.post(f"{server.url}/v1/score", json=body_of(make_items(1)), timeout=30)
            assert response.status_code == 503
            assert f"127.0.0.1:{unused_port}" in response.json()["detail"]
            client = RemoteScorer(server.url, max_retries=2, backoff_s=0.01)
            with pytest.raises(ScorerUnavailableError) as error:
                client.score(make_items(1))
            message = str(error.value)
            assert server.url in message and "3 attempt(s)" in message and "HTTP 503" in message
    finally:
        backend.close()


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_keep_alive_requests_are_not_delayed_by_nagle():
    """Every keep-alive round trip used to idle ~40 ms (Nagle + delayed ACK) when the listening socket was
    created without proto=IPPROTO_TCP, because asyncio then skips TCP_NODELAY on accepted connections."""
    import time

    app = create_app(VLMJudge(ScriptedBackend({})), max_wait_ms=0.0)
    with BackgroundServer(app) as server, httpx.Client() as http:
        http.get(f"{server.url}/health")
        durations = []
        for _ in range(6):
            start = time.perf_counter()
            assert http.get(f"{server.url}/health").status_code == 200
            durations.append(time.perf_counter() - start)
    assert min(durations) < 0.03, durations


def test_a_scorer_failure_stays_with_its_item():
    """A batch the scorer fails on is scored again item by item: the poisoned item is unscored with the reason,
    its batch mates get their scores, the answer is 200; a wrong-shaped answer is handled the same way."""
    from mtflow.reward.base import ScoreBatch

    class Picky:
        """IF 2, CC 4 for every turn; raises on any call that includes an item id ending in "poison"; answers
        one row short on calls that include an item id ending in "short"."""

        def __init__(self) -> None:
            self.calls: list[list[str]] = []

        def score(self, items):
            ids = [item.item_id for item in items]
            self.calls.append(ids)
            if any(i.endswith("poison") for i in ids):
                raise RuntimeError("judge exploded")
            rows = len(items) - (1 if any(i.endswith("short") for i in ids) else 0)
            full = torch.full((rows, items[0].num_turns), 2.0)
            return ScoreBatch(full, full + 2, torch.ones_like(full, dtype=torch.bool))

    scorer = Picky()
    app = create_app(scorer, max_wait_ms=0.0)
    items = make_items(4)
    items[1].item_id = "x/poison"
    items[2].item_id = "y/short"
    with BackgroundServer(app) as server:
        response = post(server, body_of(items), token=None)
        health = httpx.get(f"{server.url}/health").json()["batching"]
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["scored"] == [[True, True], [False, False], [False, False], [True, True]]
    assert payload["content_consistency"][0] == [4.0, 4.0] and payload["content_consistency"][3] == [4.0, 4.0]
    assert payload["instruction_following"][1] == [None, None]
    poisoned, short = payload["diagnostics"][1], payload["diagnostics"][2]
    assert poisoned["item_id"] == "x/poison" and "RuntimeError: judge exploded" in poisoned["error"]
    assert short["item_id"] == "y/short" and "shape (0, 2) for 1 items" in short["error"]
    assert payload["diagnostics"][0]["scored_alone"] is True
    # one batch call, then each item alone once
    assert scorer.calls == [[item.item_id for item in items]] + [[item.item_id] for item in items]
    assert health["isolated_batches"] == 1 and health["failed_items"] == 2
