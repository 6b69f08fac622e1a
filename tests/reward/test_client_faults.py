"""RemoteScorer against servers that are down, slow, failing or lying: it retries within its deadline, then
raises naming the URL (or flags the items); it never returns a score the server did not send."""

from __future__ import annotations

import asyncio
import math
import socket
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from mtflow.reward.base import ScorerUnavailableError
from mtflow.reward.client import RemoteScorer
from mtflow.reward.server import BackgroundServer

from .conftest import make_items


def fault_app() -> FastAPI:
    """A server whose /v1/score misbehaves as ``app.state.plan`` says, one entry per request.

    Plan entries: "500", "503", "busy" (503 with Retry-After: 0.6), "slow" (sleeps ``app.state.slow_s`` first),
    "ok" (IF = 2 and CC = 4 for every turn, item ids echoed), "bad-shape", "out-of-range", "wrong-ids". After
    the plan: "ok", except that with ``app.state.max_items`` set, larger requests get 413. ``app.state.times``
    records when each request arrived, ``app.state.sizes`` its item count.
    """
    app = FastAPI()
    app.state.plan = []
    app.state.calls = 0
    app.state.slow_s = 3.0
    app.state.max_items = None
    app.state.times = []
    app.state.sizes = []

    @app.post("/v1/score")
    async def score(request: Request) -> JSONResponse:
        body = await request.json()
        app.state.calls += 1
        app.state.times.append(time.monotonic())
        app.state.sizes.append(len(body["items"]))
        action = app.state.plan.pop(0) if app.state.plan else "ok"
        if app.state.max_items is not None and len(body["items"]) > app.state.max_items:
            return JSONResponse({"detail": "the images would decode to too much"}, status_code=413)
        if action in ("500", "503"):
            return JSONResponse({"detail": f"injected {action}"}, status_code=int(action))
        if action == "busy":
            return JSONResponse({"detail": "saturated"}, status_code=503, headers={"retry-after": "0.6"})
        if action == "slow":
            await asyncio.sleep(app.state.slow_s)
        items = body["items"]
        turns = len(items[0]["instructions"])
        payload = {
            "instruction_following": [[2.0] * turns for _ in items],
            "content_consistency": [[4.0] * turns for _ in items],
            "scored": [[True] * turns for _ in items],
            "diagnostics": [{"item_id": item["item_id"]} for item in items],
            "latency_s": 0.0,
        }
        if action == "bad-shape":
            payload["instruction_following"] = payload["instruction_following"][:-1]
        elif action == "out-of-range":
            payload["content_consistency"][0][0] = 7.0
        elif action == "wrong-ids":
            payload["diagnostics"].reverse()
        return JSONResponse(payload)

    return app


@pytest.fixture(scope="module")
def faulty():
    app = fault_app()
    with BackgroundServer(app) as server:
        yield server, app


@pytest.fixture
def plan(faulty):
    server, app = faulty
    app.state.plan, app.state.calls, app.state.times, app.state.sizes = [], 0, [], []
    app.state.max_items = None
    return server, app


def client(url: str, **kwargs) -> RemoteScorer:
    defaults = {"max_retries": 3, "backoff_s": 0.02, "backoff_max_s": 0.05, "deadline_s": 20.0, "seed": 0}
    return RemoteScorer(url, **{**defaults, **kwargs})


def test_recovers_after_server_errors(plan):
    server, app = plan
    app.state.plan = ["500", "503"]
    batch = client(server.url).score(make_items(3))
    assert app.state.calls == 3
    assert batch.scored.all()
    assert batch.instruction_following.eq(2.0).all() and batch.content_consistency.eq(4.0).all()


def test_persistent_500_raises_naming_url_and_cause(plan):
    server, app = plan
    app.state.plan = ["500"] * 10
    with pytest.raises(ScorerUnavailableError) as error:
        client(server.url, max_retries=2).score(make_items(2))
    message = str(error.value)
    assert f"{server.url}/v1/score" in message and "3 attempt(s)" in message and "injected 500" in message
    assert app.state.calls == 3


def test_persistent_500_can_flag_instead(plan):
    server, app = plan
    app.state.plan = ["500"] * 10
    batch = client(server.url, max_retries=1, on_unavailable="flag").score(make_items(2))
    assert not batch.scored.any()
    assert batch.instruction_following.isnan().all() and batch.content_consistency.isnan().all()
    assert all("injected 500" in d["error"] and server.url in d["error"] for d in batch.diagnostics)


def test_slow_server_past_the_deadline(plan):
    server, app = plan
    app.state.plan = ["slow"] * 5
    start = time.monotonic()
    with pytest.raises(ScorerUnavailableError, match="deadline of 1 s passed") as error:
        client(server.url, deadline_s=1.0).score(make_items(1))
    assert time.monotonic() - start < 2.5
    assert "no complete answer within" in str(error.value)


def test_slow_attempt_is_retried_within_the_deadline(plan):
    server, app = plan
    app.state.plan = ["slow"]  # the first attempt times out, the second is served
    app.state.slow_s = 1.5
    try:
        batch = client(server.url, request_timeout_s=0.5, deadline_s=10.0).score(make_items(1))
    finally:
        app.state.slow_s = 3.0
    assert batch.scored.all() and app.state.calls == 2


@pytest.mark.parametrize("lie", ["bad-shape", "out-of-range", "wrong-ids"])
def test_malformed_answers_are_flagged_not_used(plan, lie):
    server, app = plan
    app.state.plan = [lie]
    batch = client(server.url).score(make_items(2))
    assert not batch.scored.any() and batch.instruction_following.isnan().all()
    assert "reward server" in batch.diagnostics[0]["error"]


def test_large_calls_are_split_and_reassembled(plan):
    server, app = plan
    items = make_items(5)
    batch = client(server.url, max_items_per_request=2).score(items)
    assert app.state.calls == 3
    assert [d["item_id"] for d in batch.diagnostics] == [item.item_id for item in items]


@pytest.fixture
def dead_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_server_down_raises_after_bounded_retries(dead_url):
    start = time.monotonic()
    with pytest.raises(ScorerUnavailableError) as error:
        client(dead_url, max_retries=3).score(make_items(1))
    message = str(error.value)
    assert dead_url in message and "4 attempt(s)" in message and "ConnectError" in message
    assert time.monotonic() - start < 5.0


def test_server_down_can_flag(dead_url):
    batch = client(dead_url, max_retries=1, on_unavailable="flag").score(make_items(2, num_turns=3))
    assert batch.scored.shape == (2, 3) and not batch.scored.any()
    assert all(math.isnan(v) for v in batch.content_consistency.flatten().tolist())
    assert [d["item_id"] for d in batch.diagnostics] == ["chain0/g0", "chain0/g1"]


def test_retry_after_is_honoured(plan):
    server, app = plan
    app.state.plan = ["busy"]
    batch = client(server.url, backoff_s=0.01, backoff_max_s=0.01).score(make_items(1))
    assert batch.scored.all() and app.state.calls == 2
    assert app.state.times[1] - app.state.times[0] >= 0.6


def test_a_request_too_large_for_the_server_is_split(plan):
    server, app = plan
    app.state.max_items = 1
    items = make_items(4)
    batch = client(server.url).score(items)
    assert batch.scored.all() and [d["item_id"] for d in batch.diagnostics] == [i.item_id for i in items]
    assert sorted(app.state.sizes) == [1, 1, 1, 1, 2, 2, 4]  # 4 -> 2 + 2 -> 1 + 1 + 1 + 1


def test_requests_spread_over_endpoints_and_skip_a_dead_one(plan, dead_url):
    server, app = plan
    second = fault_app()
    with BackgroundServer(second) as other:
        # a rest of 15-30 s: the dead endpoint is still resting when the batch is done, however slow the machine
        scorer = client(
            [dead_url, server.url, other.url],
            max_items_per_request=1,
            max_concurrent_requests=4,
            backoff_s=30.0,
            backoff_max_s=30.0,
        )
        items = make_items(12)
        batch = scorer.score(items)
        routes = {route["url"]: route for route in scorer.pool.describe()}
        scorer.close()
    assert batch.scored.all() and [d["item_id"] for d in batch.diagnostics] == [i.item_id for i in items]
    assert app.state.calls >= 3 and second.state.calls >= 3 and app.state.calls + second.state.calls == 12
    dead = routes[dead_url]
    assert not dead["up"] and dead["consecutive_failures"] >= 1 and "ConnectError" in dead["last_error"]
    assert dead["requests"] <= 4  # tried by the first wave at most, then skipped while it rests
