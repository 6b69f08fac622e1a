"""Time is bounded on both sides: a server that trickles its answer cannot hold ``RemoteScorer`` or the OpenAI
backend past their ``deadline_s`` (+ 1 s), and a client that sends half a body cannot hold a server connection past
``body_timeout_s``."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest

from mtflow.reward.base import ScorerUnavailableError
from mtflow.reward.client import RemoteScorer
from mtflow.reward.judge import VLMJudge
from mtflow.reward.openai_backend import OpenAIBackend
from mtflow.reward.server import BackgroundServer, create_app
from mtflow.testing.scorers import BrightnessScorer

from .conftest import JUDGE_MODEL, make_items

DEADLINE_S = 2.0


async def trickling_app(scope, receive, send) -> None:
    """Answers every request with 200 and then one byte of body every 0.2 s for two minutes."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    while (await receive()).get("more_body"):
        pass
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    for _ in range(600):
        await send({"type": "http.response.body", "body": b" ", "more_body": True})
        await asyncio.sleep(0.2)
    await send({"type": "http.response.body", "body": b"{}"})


@pytest.fixture(scope="module")
def trickler():
    with BackgroundServer(trickling_app) as server:
        yield server


@pytest.mark.parametrize("on_unavailable", ["raise", "flag"])
def test_remote_scorer_returns_within_its_deadline_against_a_trickling_server(trickler, on_unavailable):
    scorer = RemoteScorer(trickler.url, deadline_s=DEADLINE_S, max_retries=5, on_unavailable=on_unavailable)
    start = time.monotonic()
    try:
        batch = scorer.score(make_items(2))
    except ScorerUnavailableError as exc:
        assert on_unavailable == "raise" and "no complete answer within" in str(exc)
    else:
        assert (
            on_unavailable == "flag" and not batch.scored.any() and batch.instruction_following.isnan().all()
        )
    finally:
        scorer.close()
    assert time.monotonic() - start < DEADLINE_S + 1.0


def test_remote_scorer_deadline_holds_with_several_requests_and_endpoints(trickler):
    scorer = RemoteScorer(
        [trickler.url, trickler.url.replace("127.0.0.1", "localhost")],
        deadline_s=DEADLINE_S,
        max_items_per_request=1,
        on_unavailable="flag",
    )
    start = time.monotonic()
    batch = scorer.score(make_items(6))
    scorer.close()
    assert time.monotonic() - start < DEADLINE_S + 1.0
    assert not batch.scored.any()


def test_openai_backend_returns_within_its_deadline_against_a_trickling_judge(trickler):
    backend = OpenAIBackend(
        f"{trickler.url}/v1", JUDGE_MODEL, deadline_s=DEADLINE_S, timeout_s=120, max_retries=3
    )
    start = time.monotonic()
    try:
        with pytest.raises(ScorerUnavailableError, match="no answer within the deadline of 2 s"):
            VLMJudge(backend).score(make_items(2))
    finally:
        backend.close()
    assert time.monotonic() - start < DEADLINE_S + 1.0


def half_sent(url: str, count: int) -> list[socket.socket]:
    """``count`` connections that each declare a 1000-byte body and send 10 bytes of it."""
    host, port = url.removeprefix("http://").split(":")
    request = (
        f"POST /v1/score HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n" + '{"items": '
    ).encode()
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((host, int(port)))
        sock.sendall(request)
        sockets.append(sock)
    return sockets


def test_half_sent_bodies_get_408_and_are_closed():
    body_timeout_s = 1.0
    app = create_app(BrightnessScorer(), body_timeout_s=body_timeout_s, max_wait_ms=1.0)
    with BackgroundServer(app) as server:
        start = time.monotonic()
        sockets = half_sent(server.url, 200)
        answers = []
        for sock in sockets:
            sock.settimeout(body_timeout_s + 10)
            received = b""
            while chunk := sock.recv(65536):  # until the server closes the connection
                received += chunk
            answers.append(received)
            sock.close()
        elapsed = time.monotonic() - start
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[0][:200]
        assert b"request body not received within 1 s" in answers[0]
        assert elapsed < body_timeout_s + 10
        # the server goes on serving
        response = httpx.get(f"{server.url}/health", timeout=5)
        assert response.status_code == 200 and app.state.body_budget.used == 0
