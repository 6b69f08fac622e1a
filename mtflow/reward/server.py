"""The reward service: any ``Scorer`` behind FastAPI + uvicorn, with dynamic batching and admission control.

``POST /v1/score`` takes the JSON of ``mtflow.reward.wire`` (images base64 PNG; nothing is ever unpickled) and
answers per-turn IF/CC scores. Concurrent requests are merged into scorer calls (``mtflow.reward.batcher``: up to
``max_batch_size`` items, ``max_batches_in_flight`` calls at once, one item's failure kept to that item).
``GET /health`` says "ok"; with the bearer token it also reports the scorer, the queues, the budgets and the
batching counters.

Every request is bounded before it costs anything:

- bearer token (401; the scheme is case-insensitive), body size (413) and body read time (408) are checked by
  ``GuardMiddleware`` before the app parses a byte; bodies being received share ``max_inflight_body_mb``;
- items, images per item, turn counts (422); PNG only (400 for anything else or an undecodable image); more
  than ``max_pixels`` pixels (422, also for Pillow's own decompression-bomb limit), all from the PNG headers;
- decoded bytes (``mtflow.reward.admission``): a request that would decode to more than
  ``max_request_decoded_mb`` is 413 with the numbers; the requests being decoded and scored share
  ``max_inflight_decoded_mb``, and a request that does not fit waits in a bounded queue (503 with Retry-After
  when the queue is full or the wait too long);
- 503 when the judge behind the service cannot be reached; 500 only for a fault of the service itself.

    python -m mtflow.reward.server --config reward.yaml      # or: mtflow serve-reward --config reward.yaml
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError

from mtflow.reward.admission import (
    MIB,
    RGB_BYTES_PER_PIXEL,
    BudgetBusyError,
    ByteBudget,
    RequestCost,
    image_cost,
    mib,
)
from mtflow.reward.api import (
    RETRY_AFTER_S,
    GuardMiddleware,
    HealthResponse,
    SafeJSONResponse,
    ScoreRequest,
    ScoreResponse,
    bearer_matches,
    responses,
)
from mtflow.reward.base import Scorer, ScorerUnavailableError, ScoringItem
from mtflow.reward.batcher import DynamicBatcher
from mtflow.reward.wire import (
    ImageTooLargeError,
    PngHeader,
    WireFormatError,
    decode_image,
    peek_png_header,
    score_batch_to_json,
)

log = logging.getLogger(__name__)


# ----- budgets -----
NOMINAL_IMAGE_SIDE = 1024  # what the automatic budgets assume when the scorer does not say its input size
AUTO_REQUEST_IMAGES = 256  # 64 trajectories of K = 3 (RemoteScorer's default request size)
AUTO_TRAJECTORY_IMAGES = 4


def auto_budgets(
    max_side: int | None, max_pixels: int, max_batch_size: int, max_batches_in_flight: int
) -> tuple[int, int]:
    """The automatic decoded-bytes budgets (per request, in flight), from the size images are kept at.

    Per request: 256 images at that size, plus one image of ``max_pixels`` being decoded. In flight: room for
    ``max_batches_in_flight`` + 1 full batches of 4-image trajectories at that size (the next batch decodes while
    the others are scored), plus two images of ``max_pixels`` being decoded, and never less than one request.
    """
    side = max_side or NOMINAL_IMAGE_SIDE
    kept = side * side * RGB_BYTES_PER_PIXEL
    decoding = max_pixels * 2 * RGB_BYTES_PER_PIXEL  # native decode + RGB copy (the worst case of image_cost)
    per_request = AUTO_REQUEST_IMAGES * kept + decoding
    batches = (max_batches_in_flight + 1) * max_batch_size * AUTO_TRAJECTORY_IMAGES * kept
    return per_request, max(per_request, batches + 2 * decoding)


def _scorer_input_side(scorer: Scorer) -> int | None:
    side = getattr(scorer, "input_max_side", None)
    return side if isinstance(side, int) and side > 0 else None


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
    max_batches_in_flight: int = 4,
    max_body_mb: float = 256.0,
    max_inflight_body_mb: float = 1024.0,
    body_timeout_s: float = 60.0,
    max_items_per_request: int = 256,
    max_images_per_item: int = 16,
    max_pixels: int = 4096 * 4096,
    image_max_side: int | Literal["auto"] | None = "auto",
    max_request_decoded_mb: float | Literal["auto"] = "auto",
    max_inflight_decoded_mb: float | Literal["auto"] = "auto",
    max_waiting_requests: int = 256,
    max_queue_wait_s: float = 60.0,
) -> FastAPI:
    """The FastAPI app serving ``scorer`` (arguments as in ``RewardServer``)."""
    side = _scorer_input_side(scorer) if image_max_side == "auto" else image_max_side
    auto_request, auto_inflight = auto_budgets(side, max_pixels, max_batch_size, max_batches_in_flight)
    request_limit = auto_request if max_request_decoded_mb == "auto" else int(max_request_decoded_mb * MIB)
    inflight_limit = (
        auto_inflight if max_inflight_decoded_mb == "auto" else int(max_inflight_decoded_mb * MIB)
    )
    if request_limit > inflight_limit:
        raise ValueError(
            f"max_request_decoded_mb ({mib(request_limit)}) exceeds max_inflight_decoded_mb ({mib(inflight_limit)}): "
            "such a request could never be admitted"
        )
    if max_inflight_body_mb < max_body_mb:
        raise ValueError(
            f"max_inflight_body_mb ({max_inflight_body_mb}) must be >= max_body_mb ({max_body_mb})"
        )
    decoded_budget = ByteBudget(inflight_limit, max_waiting_requests, "the decoded-bytes budget in flight")
    body_budget = ByteBudget(
        int(max_inflight_body_mb * MIB), max_waiting_requests, "the body budget in flight"
    )
    batcher = DynamicBatcher(scorer, max_batch_size, max_wait_ms, max_batches_in_flight)
    decoders = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="png-decode")
    description = _describe(scorer)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()
        decoders.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="mtflow reward service", lifespan=lifespan, default_response_class=SafeJSONResponse, version="1"
    )
    app.state.batcher = batcher
    app.state.decoded_budget = decoded_budget
    app.state.body_budget = body_budget
    app.add_middleware(
        GuardMiddleware,
        token=token,
        max_body_bytes=int(max_body_mb * MIB),
        body_budget=body_budget,
        body_timeout_s=body_timeout_s,
        queue_wait_s=max_queue_wait_s,
    )

    def plan(request: ScoreRequest) -> tuple[list[list[PngHeader]], RequestCost]:
        """Check the request's shape and every PNG header; price it in decoded bytes. Decodes nothing."""
        if len(request.items) > max_items_per_request:
            raise HTTPException(
                422, f"{len(request.items)} items in one request; the limit is {max_items_per_request}"
            )
        num_turns = len(request.items[0].instructions)
        headers, costs = [], []
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
            named = [(f"{where}.source", payload.source)]
            named += [(f"{where}.outputs[{k}]", data) for k, data in enumerate(payload.outputs)]
            row = []
            for name, data in named:
                try:
                    header = peek_png_header(data, name)
                except WireFormatError as exc:
                    raise HTTPException(400, str(exc)) from exc
                if header.pixels > max_pixels:
                    raise HTTPException(
                        422,
                        f"{name}: {header.width}x{header.height} = {header.pixels} pixels exceeds the limit "
                        f"{max_pixels}",
                    )
                row.append(header)
                costs.append(image_cost(header, side))
            headers.append(row)
        cost = RequestCost.of(costs)
        if cost.total > request_limit:
            raise HTTPException(
                413,
                f"the {len(costs)} images of this request would decode to {mib(cost.total)} ({mib(cost.held)} kept "
                f"+ {mib(cost.transient)} while decoding); the limit per request is {mib(request_limit)} "
                "(max_request_decoded_mb): send fewer or smaller images per request",
            )
        return headers, cost

    def decode(request: ScoreRequest) -> list[ScoringItem]:
        items = []
        for index, payload in enumerate(request.items):
            where = f"items[{index}] ({payload.item_id!r})"
            try:
                source = decode_image(payload.source, f"{where}.source", max_pixels, side)
                outputs = [
                    decode_image(data, f"{where}.outputs[{k}]", max_pixels, side)
                    for k, data in enumerate(payload.outputs)
                ]
            except ImageTooLargeError as exc:
                raise HTTPException(422, str(exc)) from exc
            except WireFormatError as exc:
                raise HTTPException(400, str(exc)) from exc
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
    async def invalid_request(request: Request, exc: RequestValidationError) -> SafeJSONResponse:
        # FastAPI's default handler echoes the offending input: megabytes of base64, or undecodable bytes.
        # Location and message are what the caller needs.
        errors = exc.errors()
        if errors and errors[0].get("type") == "json_invalid":
            reason = (errors[0].get("ctx") or {}).get("error", "invalid JSON")
            return SafeJSONResponse({"detail": f"the body is not valid JSON: {reason}"}, status_code=400)
        problems = [
            f"{'.'.join(str(part) for part in error.get('loc', ()))}: {error.get('msg', 'invalid')}"
            for error in errors[:20]
        ]
        return SafeJSONResponse({"detail": "invalid request: " + "; ".join(problems)}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> SafeJSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail, default=str)
        return SafeJSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        responses=responses(400, 401, 408, 413, 422, 500, 503),
        summary="Score trajectories",
    )
    async def score(request: ScoreRequest) -> SafeJSONResponse:
        _, cost = plan(request)
        try:
            await decoded_budget.acquire(cost.total, max_queue_wait_s)
        except BudgetBusyError as exc:
            raise HTTPException(
                503, f"service saturated: {exc}", headers={"retry-after": str(RETRY_AFTER_S)}
            ) from exc
        held = cost.total
        try:
            items = await asyncio.get_running_loop().run_in_executor(decoders, decode, request)
            decoded_budget.release(cost.transient)  # decoding is over: only the kept images remain
            held = cost.held
            try:
                batch = await batcher.submit(items)
            except ScorerUnavailableError as exc:
                raise HTTPException(503, f"judge unavailable: {exc}") from exc
            except Exception as exc:  # the batcher itself failed: a fault of this service
                raise HTTPException(500, f"reward service fault: {type(exc).__name__}: {exc}") from exc
        finally:
            decoded_budget.release(held)
        return SafeJSONResponse(score_batch_to_json(batch))

    @app.get("/health", response_model=HealthResponse, summary="Liveness; details with the bearer token")
    async def health(request: Request) -> SafeJSONResponse:
        if token is not None and not bearer_matches(request.headers.get("authorization"), token):
            return SafeJSONResponse({"status": "ok"})
        stats = batcher.stats
        return SafeJSONResponse(
            {
                "status": "ok",
                "model": description.get("model"),
                "backend": description.get("backend"),
                "scorer": description,
                "batching": {
                    "queue_depth": stats.queued_items,
                    "in_flight_items": stats.in_flight_items,
                    "batches_in_flight": stats.batches_in_flight,
                    "requests": stats.requests,
                    "items": stats.items,
                    "batches": stats.batches,
                    "largest_batch": stats.largest_batch,
                    "isolated_batches": stats.isolated_batches,
                    "failed_items": stats.failed_items,
                    "recent_batch_sizes": list(stats.recent_batch_sizes),
                    "max_batch_size": max_batch_size,
                    "max_wait_ms": max_wait_ms,
                    "max_batches_in_flight": max_batches_in_flight,
                },
                "admission": {
                    "image_max_side": side,
                    "decoded_mib_in_use": round(decoded_budget.used / MIB, 2),
                    "decoded_mib_peak": round(decoded_budget.peak / MIB, 2),
                    "decoded_mib_limit": round(inflight_limit / MIB, 2),
                    "request_decoded_mib_limit": round(request_limit / MIB, 2),
                    "body_mib_in_use": round(body_budget.used / MIB, 2),
                    "body_mib_peak": round(body_budget.peak / MIB, 2),
                    "body_mib_limit": round(body_budget.capacity / MIB, 2),
                    "waiting_requests": decoded_budget.waiting + body_budget.waiting,
                },
            }
        )

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

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        **uvicorn_kwargs: Any,
    ) -> None:
        import uvicorn

        self.socket = bind_socket(host, port)
        self.host = host
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, lifespan="on", **uvicorn_kwargs)
        self.server = uvicorn.Server(config)
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
    """The reward service process: a ``Scorer`` served over HTTP with dynamic batching and admission control."""

    def __init__(
        self,
        scorer: Scorer,
        host: str = "127.0.0.1",
        port: int = 8000,
        token: str | None = None,
        token_env: str | None = None,
        max_batch_size: int = 32,
        max_wait_ms: float = 20.0,
        max_batches_in_flight: int = 4,
        max_body_mb: float = 256.0,
        max_inflight_body_mb: float = 1024.0,
        body_timeout_s: float = 60.0,
        max_items_per_request: int = 256,
        max_images_per_item: int = 16,
        max_pixels: int = 4096 * 4096,
        image_max_side: int | Literal["auto"] | None = "auto",
        max_request_decoded_mb: float | Literal["auto"] = "auto",
        max_inflight_decoded_mb: float | Literal["auto"] = "auto",
        max_waiting_requests: int = 256,
        max_queue_wait_s: float = 60.0,
        max_connections: int = 2048,
        ready_file: str | None = None,
        log_level: str = "info",
    ) -> None:
        """
        Args:
            scorer: what scores the trajectories (e.g. ``mtflow.reward.VLMJudge``); called from several threads.
            host: interface to bind; keep 127.0.0.1 unless the network in between is trusted.
            port: TCP port; 0 picks a free one (see ``ready_file``).
            token: bearer token clients must send; None disables the check.
            token_env: read the token from this environment variable instead (keeps it out of configs).
            max_batch_size: most items merged into one scorer call.
            max_wait_ms: how long the first waiting request waits for others to join its batch.
            max_batches_in_flight: scorer calls running at once (keeps a continuously batching judge busy).
            max_body_mb: largest accepted request body in MiB (413 above).
            max_inflight_body_mb: MiB of request bodies being received at once; others wait (503 past the wait).
            body_timeout_s: a request body must arrive within this many seconds (408 otherwise).
            max_items_per_request: most trajectories in one request.
            max_images_per_item: most images (source plus outputs) per trajectory.
            max_pixels: most pixels per image, read from the PNG header (422 above).
            image_max_side: downscale images to this longer side right after decoding; "auto": the scorer's
                ``input_max_side`` (the size it resizes to anyway, so scores do not change); None: keep the size.
            max_request_decoded_mb: MiB one request may decode to (413 above); "auto": see ``auto_budgets``.
            max_inflight_decoded_mb: MiB of decoded images all requests in flight may hold; "auto": see
                ``auto_budgets``.
            max_waiting_requests: requests that may wait for a budget at once (503 beyond).
            max_queue_wait_s: longest wait for a budget in seconds (503 with Retry-After beyond).
            max_connections: concurrent connections uvicorn accepts (503 beyond).
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
        self.max_connections = max_connections
        self.app_kwargs = {
            "max_batch_size": max_batch_size,
            "max_wait_ms": max_wait_ms,
            "max_batches_in_flight": max_batches_in_flight,
            "max_body_mb": max_body_mb,
            "max_inflight_body_mb": max_inflight_body_mb,
            "body_timeout_s": body_timeout_s,
            "max_items_per_request": max_items_per_request,
            "max_images_per_item": max_images_per_item,
            "max_pixels": max_pixels,
            "image_max_side": image_max_side,
            "max_request_decoded_mb": max_request_decoded_mb,
            "max_inflight_decoded_mb": max_inflight_decoded_mb,
            "max_waiting_requests": max_waiting_requests,
            "max_queue_wait_s": max_queue_wait_s,
        }
        self._app = create_app(self.scorer, token=self.token, **self.app_kwargs)  # refuses bad budgets now

    def app(self) -> FastAPI:
        return self._app

    def run(self) -> None:
        """Serve until interrupted (SIGINT/SIGTERM)."""
        import uvicorn

        sock = bind_socket(self.host, self.port)
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app, log_level=self.log_level, lifespan="on", limit_concurrency=self.max_connections
        )
        server = uvicorn.Server(config)
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
