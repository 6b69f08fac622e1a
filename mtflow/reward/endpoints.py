"""Several equivalent endpoints behind one client, and the private event loop the HTTP clients run on.

``EndpointPool`` spreads requests over the endpoints that are up (fewest requests in flight first). An endpoint
whose request fails (refused, reset, timed out, 5xx) is skipped for a while: ``backoff_s`` doubled per
consecutive failure, with jitter, capped at ``backoff_max_s`` (or the server's Retry-After), then tried again; a
success clears its record. When every endpoint is resting, the next attempt waits for the first one to come back.
The pool only routes: whether a failed request is retried, and for how long, is the caller's decision.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any


def as_url_list(url: str | Sequence[str], who: str) -> list[str]:
    """``url`` (one URL or several) as a non-empty list without trailing slashes or duplicates."""
    urls = [url] if isinstance(url, str) else list(url)
    cleaned = [u.rstrip("/") for u in urls]
    if not cleaned or any(not u for u in cleaned):
        raise ValueError(f"{who}: needs at least one non-empty URL, got {url!r}")
    if len(set(cleaned)) != len(cleaned):
        raise ValueError(f"{who}: the same URL is listed twice in {cleaned}")
    return cleaned


@dataclass
class Endpoint:
    """One endpoint's routing state."""

    url: str
    in_flight: int = 0
    failures: int = 0
    resting_until: float = 0.0
    last_error: str = ""
    requests: int = 0


class EndpointPool:
    """Routes requests to healthy endpoints (module doc). Thread-safe."""

    def __init__(
        self, urls: Sequence[str], backoff_s: float, backoff_max_s: float, seed: int | None = None
    ) -> None:
        self.endpoints = [Endpoint(url) for url in urls]
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._next = 0

    def pick(self, exclude: set[str] | None = None) -> tuple[Endpoint, float] | None:
        """The endpoint for the next attempt and how long it still rests (0 when it is up); None when every
        endpoint is in ``exclude`` (URLs)."""
        now = time.monotonic()
        with self._lock:
            count = len(self.endpoints)
            order = [self.endpoints[(self._next + i) % count] for i in range(count)]
            order = [e for e in order if not exclude or e.url not in exclude]
            self._next = (self._next + 1) % count
            if not order:
                return None
            # a failed endpoint back from its rest gets one probe at a time, not a rush of requests
            up = [e for e in order if e.resting_until <= now and not (e.failures and e.in_flight)]
            if up:
                return min(up, key=lambda e: e.in_flight), 0.0
            soonest = min(order, key=lambda e: e.resting_until)
            return soonest, soonest.resting_until - now

    def started(self, endpoint: Endpoint) -> None:
        with self._lock:
            endpoint.in_flight += 1
            endpoint.requests += 1

    def finished(self, endpoint: Endpoint, error: str | None, retry_after_s: float | None = None) -> None:
        """Record the end of a request to ``endpoint``: ``error`` None for a success."""
        with self._lock:
            endpoint.in_flight -= 1
            if error is None:
                endpoint.failures = 0
                endpoint.resting_until = 0.0
                return
            endpoint.failures += 1
            endpoint.last_error = error
            rest = retry_after_s
            if rest is None:
                rest = min(self.backoff_max_s, self.backoff_s * 2 ** (endpoint.failures - 1))
                rest *= self._random.uniform(0.5, 1.0)
            endpoint.resting_until = max(endpoint.resting_until, time.monotonic() + rest)

    def describe(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        with self._lock:
            return [
                {
                    "url": e.url,
                    "up": e.resting_until <= now,
                    "requests": e.requests,
                    "in_flight": e.in_flight,
                    "consecutive_failures": e.failures,
                    "last_error": e.last_error,
                }
                for e in self.endpoints
            ]


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds (delay-seconds form only; an HTTP date is ignored)."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds < 3600 else None


class LoopThread:
    """An asyncio event loop running forever on a daemon thread: async clients behind a synchronous API, callable
    from any thread (including from inside another event loop)."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
