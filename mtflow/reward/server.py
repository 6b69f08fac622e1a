"""The reward service: any ``Scorer`` behind FastAPI + uvicorn, with dynamic batching.

``POST /v1/score`` takes the JSON of ``mtflow.reward.wire`` (images base64 PNG; nothing is ever unpickled) and
answers per-turn IF/CC scores. Concurrent requests are merged into one scorer call (up to ``max_batch_size``
items, waiting at most ``max_wait_ms`` for company), so eight training ranks calling at once become one
backend batch. ``GET /health`` reports the scorer (model, backend), queue depth and batching counters.

Guards: binds 127.0.0.1 by default; optional bearer token (401); request body limit (413); items per request,
images per item and pixels per image limits (422); undecodable images (400); a judge that cannot be reached
(503); any other scorer failure (500). Run it with

    python -m mtflow.reward.server --config reward.yaml

where the YAML holds ``RewardServer``'s arguments (``scorer: {class_path: ..., init_args: ...}``, ``port``, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from mtflow.reward.base import ScoreBatch, Scorer, ScorerUnavailableError, ScoringItem
from mtflow.reward.wire import WireFormatError, decode_image, score_batch_to_json

log = logging.getLogger(__name__)


class ItemPayload(BaseModel):
    """One trajectory on the wire (images base64 PNG)."""

    model_config = ConfigDict(extra="forbid")
    item_id: str
    chain_id: str
    source: str
    outputs: list[str]
    instructions: list[str]
    metadata: dict[str, Any] = Field(default_factory=dict)


class ScoreRequest(BaseModel):
    """Body of ``POST /v1/score``."""

    model_config = ConfigDict(extra="forbid")
    items: list[ItemPayload] = Field(min_length=1)


class PixelLimitError(WireFormatError):
    """An image has more pixels than the server accepts."""


@dataclass
class _Pending:
    items: list[ScoringItem]
    num_turns: int
    future: asyncio.Future


@dataclass
class BatcherStats:
    """Counters of a ``DynamicBatcher`` (reported by ``/health``)."""

    requests: int = 0
    items: int = 0
    batches: int = 0
    queued_items: int = 0
    in_flight_items: int = 0
    largest_batch: int = 0
    recent_batch_sizes: deque = field(default_factory=lambda: deque(maxlen=64))


class DynamicBatcher:
    """Merges concurrent scoring requests into scorer calls of up to ``max_batch_size`` items.

    The first waiting request opens a batch; requests arriving within ``max_wait_ms`` join it while they fit.
    A request larger than ``max_batch_size`` is scored on its own. Items with different turn counts go to
    separate scorer calls. The scorer runs on one worker thread, so the event loop keeps accepting requests
    (which form the next batch) while a batch is scored.
    """

    def __init__(self, scorer: Scorer, max_batch_size: int, max_wait_ms: float) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.scorer = scorer
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.stats = BatcherStats()
        self._queue: asyncio.Queue[_Pending] | None = None
        self._held: _Pending | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scorer")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run(), name="reward-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, items: list[ScoringItem]) -> ScoreBatch:
        """Score ``items`` (same turn count) as part of whatever batch forms."""
        if self._queue is None:
            raise RuntimeError("DynamicBatcher.start() was not called")
        future = asyncio.get_running_loop().create_future()
        self.stats.queued_items += len(items)
        await self._queue.put(_Pending(items, items[0].num_turns, future))
        return await future

    async def _next(self, timeout: float | None) -> _Pending | None:
        if self._held is not None:
            pending, self._held = self._held, None
            return pending
        assert self._queue is not None
        if timeout is None:
            return await self._queue.get()
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _collect(self) -> list[_Pending]:
        first = await self._next(None)
        assert first is not None
        batch, size = [first], len(first.items)
        deadline = time.monotonic() + self.max_wait_s
        while size < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            pending = await self._next(remaining)
            if pending is None:
                break
            if size + len(pending.items) > self.max_batch_size:
                self._held = pending  # opens the next batch
                break
            batch.append(pending)
            size += len(pending.items)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            by_turns: dict[int, list[_Pending]] = {}
            for pending in batch:
                by_turns.setdefault(pending.num_turns, []).append(pending)
            for group in by_turns.values():
                items = [item for pending in group for item in pending.items]
                self.stats.queued_items -= len(items)
                self.stats.in_flight_items = len(items)
                try:
                    result = await loop.run_in_executor(self._executor, self.scorer.score, items)
                    error: BaseException | None = None
                    if tuple(result.scored.shape) != (len(items), group[0].num_turns):
                        raise RuntimeError(
                            f"{type(self.scorer).__name__} returned scores of shape {tuple(result.scored.shape)} "
                            f"for {len(items)} items of {group[0].num_turns} turns"
                        )
                except Exception as exc:  # reported to every waiting request, the worker keeps serving
                    result, error = None, exc
                    log.exception("scorer failed on a batch of %d items", len(items))
                finally:
                    self.stats.in_flight_items = 0
                self.stats.batches += 1
                self.stats.requests += len(group)
                self.stats.items += len(items)
                self.stats.largest_batch = max(self.stats.largest_batch, len(items))
                self.stats.recent_batch_sizes.append(len(items))
                self._deliver(group, result, error)

    @staticmethod
    def _deliver(group: list[_Pending], result: ScoreBatch | None, error: BaseException | None) -> None:
        start = 0
        for pending in group:
            if pending.future.done():  # the caller went away
                start += len(pending.items)
                continue
            if error is not None or result is None:
                pending.future.set_exception(error or RuntimeError("scorer returned nothing"))
                continue
            stop = start + len(pending.items)
            pending.future.set_result(
                ScoreBatch(
                    instruction_following=result.instruction_following[start:stop],
                    content_consistency=result.content_consistency[start:stop],
                    scored=result.scored[start:stop],
                    diagnostics=result.diagnostics[start:stop] if result.diagnostics else [],
                    latency_s=result.latency_s,
                )
            )
            start = stop


def _json_error(status: int, detail: str, headers: dict[str, str] | None = None) -> tuple[dict, bytes]:
    body = json.dumps({"detail": detail}).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        + [(k.encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    return start, body


class GuardMiddleware:
    """ASGI middleware for ``/v1/*``: bearer token (401) and body size (413), checked before the app parses.

    The body is read here (up to the limit) and replayed to the app, so an oversized upload is refused after
    at most ``max_body_bytes`` bytes whether or not it declares a Content-Length.
    """

    def __init__(self, app: Any, token: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.token = token
        self.max_body_bytes = max_body_bytes

    async def _reply(
        self, send: Any, status: int, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        start, body = _json_error(status, detail, headers)
        await send(start)
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.token is not None:
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                reason = "missing bearer token" if not given else "wrong bearer token"
                await self._reply(send, 401, f"{reason} for {scope['path']}", {"www-authenticate": "Bearer"})
                return
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._reply(
                send, 413, f"request body of {declared} bytes exceeds the limit {self.max_body_bytes}"
            )
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._reply(send, 413, f"request body exceeds the limit of {self.max_body_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _describe(scorer: Scorer) -> dict[str, Any]:
    describe = getattr(scorer, "describe", None)
    if callable(describe):
        try:
            return dict(describe())
        except Exception as exc:  # health must answer even if the scorer cannot describe itself
            return {"scorer": type(scorer).__name__, "describe_error": str(exc)}
    return {"scorer": type(scorer).__name__}


def create_app(
    scorer: Scorer,
    token: str | None = None,
    max_batch_size: int = 32,
    max_wait_ms: float = 20.0,
    max_body_mb: float = 256.0,
    max_items_per_request: int = 256,
    max_images_per_item: int = 16,
    max_pixels: int = 4096 * 4096,
) -> FastAPI:
    """The FastAPI app serving ``scorer`` (arguments as in ``RewardServer``)."""
    batcher = DynamicBatcher(scorer, max_batch_size, max_wait_ms)
    description = _describe(scorer)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="mtflow reward service", lifespan=lifespan)
    app.state.batcher = batcher
    app.add_middleware(GuardMiddleware, token=token, max_body_bytes=int(max_body_mb * 1024 * 1024))

    def decode(request: ScoreRequest) -> list[ScoringItem]:
        if len(request.items) > max_items_per_request:
            raise HTTPException(
                422, f"{len(request.items)} items in one request; the limit is {max_items_per_request}"
            )
        num_turns = len(request.items[0].instructions)
        items = []
        for index, payload in enumerate(request.items):
            where = f"items[{index}] ({payload.item_id!r})"
            if len(payload.outputs) != len(payload.instructions) or not payload.instructions:
                raise HTTPException(
                    422,
                    f"{where}: {len(payload.outputs)} outputs for {len(payload.instructions)} instructions",
                )
            if len(payload.instructions) != num_turns:
                raise HTTPException(
                    422,
                    f"{where}: {len(payload.instructions)} turns, but items[0] has {num_turns}; "
                    "send different turn counts in separate requests",
                )
            if 1 + len(payload.outputs) > max_images_per_item:
                raise HTTPException(
                    422,
                    f"{where}: {1 + len(payload.outputs)} images; the limit is {max_images_per_item} per item",
                )
            try:
                source = decode_image(payload.source, f"{where}.source", max_pixels)
                outputs = [
                    decode_image(data, f"{where}.outputs[{k}]", max_pixels)
                    for k, data in enumerate(payload.outputs)
                ]
            except WireFormatError as exc:
                status = 422 if "exceeds the limit" in str(exc) else 400
                raise HTTPException(status, str(exc)) from exc
            items.append(
                ScoringItem(
                    item_id=payload.item_id,
                    chain_id=payload.chain_id,
                    source=source,
                    outputs=outputs,
                    instructions=payload.instructions,
                    metadata=payload.metadata,
                )
            )
        return items

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default handler echoes the offending input: megabytes of base64, or undecodable bytes
        # (which crash its encoder). Location and message are what the caller needs.
        problems = [
            f"{'.'.join(str(part) for part in error.get('loc', ()))}: {error.get('msg', 'invalid')}"
            for error in exc.errors()[:20]
        ]
        return JSONResponse({"detail": "invalid request: " + "; ".join(problems)}, status_code=422)

    @app.post("/v1/score")
    async def score(request: ScoreRequest) -> JSONResponse:
        items = await asyncio.get_running_loop().run_in_executor(None, decode, request)
        try:
            batch = await batcher.submit(items)
        except ScorerUnavailableError as exc:
            raise HTTPException(503, f"judge unavailable: {exc}") from exc
        except Exception as exc:
            raise HTTPException(500, f"scorer failed: {type(exc).__name__}: {exc}") from exc
        return JSONResponse(score_batch_to_json(batch))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = batcher.stats
        return {
            "status": "ok",
            "model": description.get("model"),
            "backend": description.get("backend"),
            "scorer": description,
            "queue_depth": stats.queued_items,
            "in_flight_items": stats.in_flight_items,
            "requests": stats.requests,
            "items": stats.items,
            "batches": stats.batches,
            "largest_batch": stats.largest_batch,
            "recent_batch_sizes": list(stats.recent_batch_sizes),
            "max_batch_size": max_batch_size,
            "max_wait_ms": max_wait_ms,
        }

    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP explicitly: asyncio only sets TCP_NODELAY on accepted sockets whose proto is
    # IPPROTO_TCP, and without it Nagle's algorithm adds ~40 ms to every keep-alive response.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class BackgroundServer:
    """An ASGI app served by uvicorn on a daemon thread (tests, benchmarks, in-process services)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.socket = bind_socket(host, port)
        self.host = host
        self.port = self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.url} did not start within {timeout_s} s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def is_loopback(host: str) -> bool:
    """True when ``host`` is reachable from this machine only (127.0.0.0/8, ::1, "localhost")."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: may resolve to any interface
        return False


class RewardServer:
    """The reward service process: a ``Scorer`` served over HTTP with dynamic batching."""

    def __init__(
        self,
        scorer: Scorer,
        host: str = "127.0.0.1",
        port: int = 8000,
        token: str | None = None,
        token_env: str | None = None,
        max_batch_size: int = 32,
        max_wait_ms: float = 20.0,
        max_body_mb: float = 256.0,
        max_items_per_request: int = 256,
        max_images_per_item: int = 16,
        max_pixels: int = 4096 * 4096,
        ready_file: str | None = None,
        log_level: str = "info",
    ) -> None:
        """
        Args:
            scorer: what scores the trajectories (e.g. ``mtflow.reward.VLMJudge``).
            host: interface to bind; keep 127.0.0.1 unless the network in between is trusted.
            port: TCP port; 0 picks a free one (see ``ready_file``).
            token: bearer token clients must send; None disables the check.
            token_env: read the token from this environment variable instead (keeps it out of configs).
            max_batch_size: most items merged into one scorer call.
            max_wait_ms: how long the first waiting request waits for others to join its batch.
            max_body_mb: largest accepted request body in MiB.
            max_items_per_request: most trajectories in one request.
            max_images_per_item: most images (source plus outputs) per trajectory.
            max_pixels: most pixels per image.
            ready_file: once accepting connections, write ``{"host", "port", "pid", "url"}`` JSON here.
            log_level: uvicorn log level.
        """
        if token_env is not None:
            if token_env not in os.environ:
                raise ValueError(f"RewardServer: environment variable {token_env!r} (token_env) is not set")
            token = os.environ[token_env]
        if token is None and not is_loopback(host):
            log.warning(
                "reward service bound to %s without a bearer token: anyone who can reach the port can spend the "
                "judge's GPU time; set token or token_env",
                host,
            )
        self.scorer = scorer
        self.host = host
        self.port = port
        self.token = token
        self.ready_file = ready_file
        self.log_level = log_level
        self.app_kwargs = {
            "max_batch_size": max_batch_size,
            "max_wait_ms": max_wait_ms,
            "max_body_mb": max_body_mb,
            "max_items_per_request": max_items_per_request,
            "max_images_per_item": max_images_per_item,
            "max_pixels": max_pixels,
        }

    def app(self) -> FastAPI:
        return create_app(self.scorer, token=self.token, **self.app_kwargs)

    def run(self) -> None:
        """Serve until interrupted (SIGINT/SIGTERM)."""
        import uvicorn

        sock = bind_socket(self.host, self.port)
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(self.app(), log_level=self.log_level, lifespan="on"))
        if self.ready_file is not None:
            threading.Thread(target=self._announce, args=(server, port), daemon=True).start()
        log.info("reward service on http://%s:%d (%s)", self.host, port, _describe(self.scorer))
        try:
            server.run(sockets=[sock])
        finally:
            sock.close()

    def _announce(self, server: Any, port: int) -> None:
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.02)
        assert self.ready_file is not None
        info = {"host": self.host, "port": port, "pid": os.getpid(), "url": f"http://{self.host}:{port}"}
        path = Path(self.ready_file)
        temporary = path.with_suffix(path.suffix + ".tmp")
        temporary.write_text(json.dumps(info))
        temporary.replace(path)  # atomic: readers never see a half-written file


def build_parser():
    """The jsonargparse parser of ``RewardServer`` (``--config`` YAML plus ``--port`` style overrides)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="mtflow serve-reward", description="Serve an mtflow Scorer over HTTP.")
    parser.add_argument("--config", action="config", help="YAML with RewardServer's arguments")
    parser.add_class_arguments(RewardServer, nested_key=None, fail_untyped=True)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m mtflow.reward.server --config reward.yaml``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    config = parser.parse_args(list(argv) if argv is not None else None)
    config = parser.instantiate(config)
    kwargs = {k: v for k, v in vars(config).items() if k != "config" and not k.startswith("__")}
    RewardServer(**kwargs).run()


if __name__ == "__main__":
    main()
