"""``RemoteScorer``: the ``Scorer`` interface over HTTP, talking to one or several ``mtflow.reward.server``\\ s.

Each ``score`` call has a real deadline: every attempt runs under an overall timeout (sending, waiting and
reading the answer, however slowly the server trickles it), so the whole call returns within ``deadline_s``.
Large calls are split into requests of ``max_items_per_request`` trajectories, sent concurrently and spread over
the endpoints that are up (``mtflow.reward.endpoints``); a dead endpoint is skipped and tried again later.
Connection failures, timeouts, 408/425/429/5xx and a server dying mid-request are retried, on another endpoint
when one is up, up to ``max_retries`` times per request and never past the deadline; Retry-After is honoured.
A request the server finds too large (413) is split in two and sent again. If no endpoint answers the call
raises ``ScorerUnavailableError`` naming the URLs, the attempts and the last cause (or, with
``on_unavailable="flag"``, returns those items unscored with that reason). A request the server rejects as
malformed (other 4xx) flags its items with the server's explanation; a rejected token raises. No score is ever
filled in: every unscored turn is NaN with ``scored`` False.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any, Literal

import httpx

from mtflow.reward.base import ScoreBatch, ScorerUnavailableError, ScoringItem
from mtflow.reward.endpoints import EndpointPool, LoopThread, as_url_list, retry_after_seconds
from mtflow.reward.wire import WireFormatError, check_same_turns, item_to_json, score_batch_from_json

log = logging.getLogger(__name__)

_RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


class _Unavailable(Exception):
    """Internal: retries exhausted or deadline passed (message says why)."""


class RemoteScorer:
    """Scores trajectories through remote reward servers (``POST {url}/v1/score``)."""

    def __init__(
        self,
        url: str | list[str],
        token: str | None = None,
        token_env: str | None = None,
        deadline_s: float = 600.0,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        backoff_max_s: float = 15.0,
        request_timeout_s: float | None = None,
        connect_timeout_s: float = 10.0,
        max_items_per_request: int = 64,
        max_concurrent_requests: int = 4,
        image_max_side: int | None = None,
        on_unavailable: Literal["raise", "flag"] = "raise",
        seed: int | None = None,
    ) -> None:
        """
        Args:
            url: server root, e.g. ``http://127.0.0.1:8000``, or a list of equivalent servers to spread over.
            token: bearer token the servers expect; None sends none.
            token_env: read the token from this environment variable instead (keeps it out of configs).
            deadline_s: wall-time bound of one ``score`` call in seconds: retries, slow answers, everything.
            max_retries: retries of one request after a transport error, timeout, 408/425/429 or 5xx.
            backoff_s: how long a failed endpoint rests first, in seconds; doubles per consecutive failure (jitter).
            backoff_max_s: cap on one rest in seconds.
            request_timeout_s: overall bound of one attempt; None lets one attempt use the rest of the deadline.
            connect_timeout_s: connect timeout of one attempt in seconds.
            max_items_per_request: split larger calls into requests of this many trajectories.
            max_concurrent_requests: requests of one call in flight at once (spread over the endpoints).
            image_max_side: downscale images to this longer side before sending; None sends them as they are.
            on_unavailable: ``raise`` ScorerUnavailableError, or ``flag`` the items unscored, when no endpoint
                answers.
            seed: seed of the backoff jitter.
        """
        if token_env is not None:
            if token_env not in os.environ:
                raise ValueError(f"RemoteScorer: environment variable {token_env!r} (token_env) is not set")
            token = os.environ[token_env]
        if on_unavailable not in ("raise", "flag"):
            raise ValueError(f"on_unavailable must be 'raise' or 'flag', got {on_unavailable!r}")
        if max_items_per_request < 1:
            raise ValueError(f"max_items_per_request must be >= 1, got {max_items_per_request}")
        if max_concurrent_requests < 1:
            raise ValueError(f"max_concurrent_requests must be >= 1, got {max_concurrent_requests}")
        self.urls = as_url_list(url, "RemoteScorer")
        self.url = self.urls[0] if len(self.urls) == 1 else ", ".join(self.urls)
        self.endpoint = f"{self.urls[0]}/v1/score"
        self.token = token
        self.deadline_s = deadline_s
        self.max_retries = max_retries
        self.request_timeout_s = request_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_items_per_request = max_items_per_request
        self.max_concurrent_requests = max_concurrent_requests
        self.image_max_side = image_max_side
        self.on_unavailable = on_unavailable
        self.pool = EndpointPool(self.urls, backoff_s, backoff_max_s, seed)
        self._runner: LoopThread | None = None
        self._client: httpx.AsyncClient | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # a copy gets its own loop and connections
        state = dict(self.__dict__)
        state.update(_runner=None, _client=None, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"scorer": "RemoteScorer", "backend": "http", "url": self.url}

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _ensure_started(self) -> LoopThread:
        with self._lock:
            if self._runner is None:
                runner = LoopThread("remote-scorer")

                async def make_client() -> httpx.AsyncClient:
                    # Without TCP_NODELAY, headers and body leave as two small segments and Nagle's algorithm
                    # meets the server's delayed ACK: about 40 ms of idle time on every request.
                    options = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
                    transport = httpx.AsyncHTTPTransport(socket_options=options)
                    return httpx.AsyncClient(headers=self._headers(), transport=transport)

                self._client = runner.run(make_client())
                self._runner = runner
            return self._runner

    def close(self) -> None:
        with self._lock:
            if self._runner is not None:
                if self._client is not None:
                    self._runner.run(self._client.aclose())
                self._runner.stop()
                self._runner = None
                self._client = None

    def health(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """The ``/health`` JSON of the first endpoint that answers (``ScorerUnavailableError`` if none does)."""
        errors = []
        for url in self.urls:
            try:
                response = httpx.get(f"{url}/health", headers=self._headers(), timeout=timeout_s)
                response.raise_for_status()
                return response.json()
            except (httpx.HTTPError, ValueError) as exc:
                errors.append(f"GET {url}/health failed: {type(exc).__name__}: {exc}")
        raise ScorerUnavailableError("; ".join(errors))

    def score(self, items: Sequence[ScoringItem]) -> ScoreBatch:
        start = time.monotonic()
        num_turns = check_same_turns(items, f"RemoteScorer({self.url})")
        runner = self._ensure_started()
        chunks = [
            list(items[first : first + self.max_items_per_request])
            for first in range(0, len(items), self.max_items_per_request)
        ]
        results = runner.run(self._score_all(chunks, num_turns, start + self.deadline_s))
        batches = []
        for chunk, result in zip(chunks, results):
            if isinstance(result, _Unavailable):
                message = f"reward server {self._where()} unavailable: {result}"
                if self.on_unavailable == "raise":
                    raise ScorerUnavailableError(message) from None
                log.error("%s; flagging %d items unscored", message, len(chunk))
                result = self._flagged(chunk, num_turns, message)
            elif isinstance(result, BaseException):
                raise result
            batches.append(result)
        batch = ScoreBatch.concat(batches)
        batch.latency_s = time.monotonic() - start
        return batch

    def _where(self) -> str:
        return ", ".join(f"{url}/v1/score" for url in self.urls)

    async def _score_all(self, chunks: list[list[ScoringItem]], num_turns: int, deadline: float) -> list[Any]:
        slots = asyncio.Semaphore(self.max_concurrent_requests)

        async def one(chunk: list[ScoringItem]) -> ScoreBatch:
            async with slots:
                return await self._score_chunk(chunk, num_turns, deadline)

        return await asyncio.gather(*(one(chunk) for chunk in chunks), return_exceptions=True)

    @staticmethod
    def _flagged(items: Sequence[ScoringItem], num_turns: int, reason: str) -> ScoreBatch:
        batch = ScoreBatch.unscored(len(items), num_turns, reason)
        for diagnostic, item in zip(batch.diagnostics, items):
            diagnostic["item_id"] = item.item_id
        return batch

    async def _score_chunk(self, items: list[ScoringItem], num_turns: int, deadline: float) -> ScoreBatch:
        assert self._client is not None
        body = {"items": [item_to_json(item, self.image_max_side) for item in items]}
        attempts = 0
        last_error = "no attempt was made"
        while True:
            endpoint, wait = self.pool.pick()  # type: ignore[misc]
            remaining = deadline - time.monotonic()
            if wait > 0:  # every endpoint is resting: wait for the first to come back
                if wait >= remaining:
                    await asyncio.sleep(max(0.0, remaining))
                    raise _Unavailable(
                        f"deadline of {self.deadline_s:g} s passed after {attempts} attempt(s); last error: {last_error}"
                    )
                await asyncio.sleep(wait)
                remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Unavailable(
                    f"deadline of {self.deadline_s:g} s passed after {attempts} attempt(s); last error: {last_error}"
                )
            budget = remaining if self.request_timeout_s is None else min(self.request_timeout_s, remaining)
            timeout = httpx.Timeout(budget, connect=min(self.connect_timeout_s, budget))
            url = f"{endpoint.url}/v1/score"
            attempts += 1
            retry_after = None
            self.pool.started(endpoint)
            try:
                # wait_for bounds the whole exchange; httpx's own timeout only bounds each read
                response = await asyncio.wait_for(self._client.post(url, json=body, timeout=timeout), budget)
            except (asyncio.TimeoutError, httpx.TimeoutException) as exc:
                last_error = f"{url}: no complete answer within {budget:.3g} s ({type(exc).__name__})"
            except httpx.TransportError as exc:  # refused, reset, server died mid-request
                last_error = f"{url}: {type(exc).__name__}: {exc}"
            else:
                status, detail = response.status_code, _detail(response)
                if status == 200:
                    self.pool.finished(endpoint, None)
                    return self._parse(response, url, items, num_turns)
                if status not in _RETRY_STATUSES:
                    self.pool.finished(endpoint, None)  # the endpoint is up; the request is the problem
                    if status in (401, 403):
                        raise ScorerUnavailableError(
                            f"reward server {url} refused the credentials: HTTP {status} {detail}"
                        )
                    if status == 413 and len(items) > 1:
                        log.warning(
                            "%s: HTTP 413 (%s); sending the %d items in two requests", url, detail, len(items)
                        )
                        half = len(items) // 2
                        parts = await asyncio.gather(
                            self._score_chunk(items[:half], num_turns, deadline),
                            self._score_chunk(items[half:], num_turns, deadline),
                        )
                        return ScoreBatch.concat(parts)
                    reason = f"reward server {url} rejected the request: HTTP {status} {detail}"
                    log.error("%s (%d items flagged unscored)", reason, len(items))
                    return self._flagged(items, num_turns, reason)
                last_error = f"{url}: HTTP {status}: {detail}"
                retry_after = retry_after_seconds(response.headers.get("retry-after"))
            self.pool.finished(endpoint, last_error, retry_after)
            if attempts > self.max_retries:
                raise _Unavailable(f"gave up after {attempts} attempt(s); last error: {last_error}")
            log.warning("attempt %d failed (%s); retrying", attempts, last_error)

    def _parse(
        self, response: httpx.Response, url: str, items: list[ScoringItem], num_turns: int
    ) -> ScoreBatch:
        source = f"reward server {url}"
        try:
            batch = score_batch_from_json(response.json(), len(items), num_turns, source)
        except (ValueError, WireFormatError) as exc:
            reason = f"{source} sent a malformed response: {exc}"
            log.error(reason)
            return self._flagged(items, num_turns, reason)
        for diagnostic, item in zip(batch.diagnostics, items):
            echoed = diagnostic.get("item_id", item.item_id)
            if echoed != item.item_id:
                reason = f"{source} answered for item {echoed!r} in the place of {item.item_id!r}"
                log.error(reason)
                return self._flagged(items, num_turns, reason)
        return batch


def _detail(response: httpx.Response) -> str:
    try:
        payload = response.json()
        if isinstance(payload, dict) and "detail" in payload:
            return str(payload["detail"])[:500]
    except ValueError:
        pass
    return response.text[:500]
