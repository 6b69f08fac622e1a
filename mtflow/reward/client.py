"""``RemoteScorer``: the ``Scorer`` interface over HTTP, talking to ``mtflow.reward.server``.

Each call has a deadline. Connection failures, timeouts, 429/5xx and a server dying mid-request are retried
with exponential backoff and jitter, up to ``max_retries`` times and never past the deadline. If the server
stays unreachable the call raises ``ScorerUnavailableError`` naming the URL, the attempts and the last cause
(or, with ``on_unavailable="flag"``, returns the items unscored with that reason). A request the server
rejects as malformed (4xx) flags its items with the server's explanation; a rejected token raises. No score is
ever filled in: every unscored turn is NaN with ``scored`` False.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any, Literal

import httpx

from mtflow.reward.base import ScoreBatch, ScorerUnavailableError, ScoringItem
from mtflow.reward.wire import WireFormatError, check_same_turns, item_to_json, score_batch_from_json

log = logging.getLogger(__name__)

_RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


class _Unavailable(Exception):
    """Internal: retries exhausted or deadline passed (message says why)."""


class RemoteScorer:
    """Scores trajectories through a remote reward server (``POST {url}/v1/score``)."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        token_env: str | None = None,
        deadline_s: float = 600.0,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        backoff_max_s: float = 15.0,
        request_timeout_s: float | None = None,
        connect_timeout_s: float = 10.0,
        max_items_per_request: int = 64,
        image_max_side: int | None = None,
        on_unavailable: Literal["raise", "flag"] = "raise",
        seed: int | None = None,
    ) -> None:
        """
        Args:
            url: server root, e.g. ``http://127.0.0.1:8000``.
            token: bearer token the server expects; None sends none.
            token_env: read the token from this environment variable instead (keeps it out of configs).
            deadline_s: wall-time budget of one ``score`` call in seconds, retries included.
            max_retries: retries of one request after a transport error, timeout, 429 or 5xx.
            backoff_s: first retry delay in seconds; doubles per retry, with jitter in [0.5, 1] of it.
            backoff_max_s: cap on one retry delay in seconds.
            request_timeout_s: per-attempt read timeout; None lets one attempt use the rest of the deadline.
            connect_timeout_s: per-attempt connect timeout in seconds.
            max_items_per_request: split larger calls into requests of this many trajectories.
            image_max_side: downscale images to this longer side before sending; None sends them as they are.
            on_unavailable: ``raise`` ScorerUnavailableError, or ``flag`` every item unscored, when the server
                cannot be reached.
            seed: seed of the retry jitter.
        """
        if token_env is not None:
            if token_env not in os.environ:
                raise ValueError(f"RemoteScorer: environment variable {token_env!r} (token_env) is not set")
            token = os.environ[token_env]
        if on_unavailable not in ("raise", "flag"):
            raise ValueError(f"on_unavailable must be 'raise' or 'flag', got {on_unavailable!r}")
        if max_items_per_request < 1:
            raise ValueError(f"max_items_per_request must be >= 1, got {max_items_per_request}")
        self.url = url.rstrip("/")
        self.endpoint = f"{self.url}/v1/score"
        self.token = token
        self.deadline_s = deadline_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.request_timeout_s = request_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_items_per_request = max_items_per_request
        self.image_max_side = image_max_side
        self.on_unavailable = on_unavailable
        self._random = random.Random(seed)
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"scorer": "RemoteScorer", "backend": "http", "url": self.url}

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
                # Without TCP_NODELAY, headers and body leave as two small segments and Nagle's algorithm
                # meets the server's delayed ACK: about 40 ms of idle time on every request.
                transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
                self._client = httpx.Client(headers=headers, transport=transport)
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def health(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """The server's ``/health`` JSON (raises ``ScorerUnavailableError`` if it cannot be fetched)."""
        try:
            response = self._http().get(f"{self.url}/health", timeout=timeout_s)
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ScorerUnavailableError(
                f"GET {self.url}/health failed: {type(exc).__name__}: {exc}"
            ) from exc

    def score(self, items: Sequence[ScoringItem]) -> ScoreBatch:
        start = time.monotonic()
        num_turns = check_same_turns(items, f"RemoteScorer({self.url})")
        deadline = start + self.deadline_s
        batches = []
        for first in range(0, len(items), self.max_items_per_request):
            chunk = list(items[first : first + self.max_items_per_request])
            try:
                batches.append(self._score_chunk(chunk, num_turns, deadline))
            except _Unavailable as exc:
                message = f"reward server {self.endpoint} unavailable: {exc}"
                if self.on_unavailable == "raise":
                    raise ScorerUnavailableError(message) from None
                log.error("%s; flagging %d items unscored", message, len(items) - first)
                batches.append(self._flagged(items[first:], num_turns, message))
                break
        result = ScoreBatch.concat(batches)
        result.latency_s = time.monotonic() - start
        return result

    @staticmethod
    def _flagged(items: Sequence[ScoringItem], num_turns: int, reason: str) -> ScoreBatch:
        batch = ScoreBatch.unscored(len(items), num_turns, reason)
        for diagnostic, item in zip(batch.diagnostics, items):
            diagnostic["item_id"] = item.item_id
        return batch

    def _delay(self, attempt: int) -> float:
        return min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)) * self._random.uniform(0.5, 1.0)

    def _score_chunk(self, items: list[ScoringItem], num_turns: int, deadline: float) -> ScoreBatch:
        body = {"items": [item_to_json(item, self.image_max_side) for item in items]}
        attempts = 0
        last_error = "no attempt was made"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Unavailable(
                    f"deadline of {self.deadline_s:g} s passed after {attempts} attempt(s); last error: {last_error}"
                )
            read_timeout = (
                remaining if self.request_timeout_s is None else min(self.request_timeout_s, remaining)
            )
            timeout = httpx.Timeout(read_timeout, connect=min(self.connect_timeout_s, read_timeout))
            attempts += 1
            try:
                response = self._http().post(self.endpoint, json=body, timeout=timeout)
            except httpx.TimeoutException as exc:
                last_error = f"{type(exc).__name__} after {read_timeout:.3g} s"
            except httpx.TransportError as exc:  # refused, reset, server died mid-request
                last_error = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    return self._parse(response, items, num_turns)
                detail = _detail(response)
                if response.status_code in (401, 403):
                    raise ScorerUnavailableError(
                        f"reward server {self.endpoint} refused the credentials: HTTP {response.status_code} {detail}"
                    )
                if response.status_code not in _RETRY_STATUSES:
                    reason = f"reward server {self.endpoint} rejected the request: HTTP {response.status_code} {detail}"
                    log.error("%s (%d items flagged unscored)", reason, len(items))
                    return self._flagged(items, num_turns, reason)
                last_error = f"HTTP {response.status_code}: {detail}"
            if attempts > self.max_retries:
                raise _Unavailable(f"gave up after {attempts} attempt(s); last error: {last_error}")
            delay = self._delay(attempts)
            log.warning(
                "%s attempt %d failed (%s); retrying in %.2f s", self.endpoint, attempts, last_error, delay
            )
            time.sleep(max(0.0, min(delay, deadline - time.monotonic())))

    def _parse(self, response: httpx.Response, items: list[ScoringItem], num_turns: int) -> ScoreBatch:
        source = f"reward server {self.endpoint}"
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
