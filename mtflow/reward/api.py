"""The HTTP surface of the reward service: the wire models (they are the OpenAPI schema), error bodies that
never fail to encode, and ``GuardMiddleware``, which checks token, body size, body read time and the budget of
bodies in flight before the app parses a byte."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mtflow.reward.admission import BudgetBusyError, ByteBudget

RETRY_AFTER_S = 1


def _first_lone_surrogate(value: Any) -> str | None:
    """A description of the first string in ``value`` (nested) that is not valid Unicode, or None."""
    stack = [value]
    while stack:
        current = stack.pop()
        if isinstance(current, str):
            try:
                current.encode("utf-8")
            except UnicodeEncodeError:
                return repr(current[:40])
        elif isinstance(current, dict):
            stack.extend(current.keys())
            stack.extend(current.values())
        elif isinstance(current, list):
            stack.extend(current)
    return None


class ItemPayload(BaseModel):
    """One trajectory on the wire."""

    model_config = ConfigDict(extra="forbid")
    item_id: str = Field(description="unique id of the trajectory, echoed in its diagnostic")
    chain_id: str = Field(description="id of its edit chain")
    source: str = Field(
        description="source image, base64 PNG", json_schema_extra={"contentMediaType": "image/png"}
    )
    outputs: list[str] = Field(description="the K edited images in turn order, base64 PNG")
    instructions: list[str] = Field(description="the K instructions")
    metadata: dict[str, Any] = Field(default_factory=dict, description="facts handed to the judge")

    @model_validator(mode="after")
    def _valid_unicode(self) -> ItemPayload:
        bad = _first_lone_surrogate([self.item_id, self.chain_id, self.instructions, self.metadata])
        if bad is not None:
            raise ValueError(f"{bad} is not valid Unicode (a lone surrogate)")
        return self


_EXAMPLE_SOURCE = "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGM8UaHBwMDAxMDAwMDAAAARqgFsecZ2JgAAAABJRU5ErkJggg=="
_EXAMPLE_OUTPUT = "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGOMWnCHgYGBiYGBgYGBAQAVsAHan+TOvgAAAABJRU5ErkJggg=="
_EXAMPLE = {
    "items": [
        {
            "item_id": "chain0/g0",
            "chain_id": "chain0",
            "source": _EXAMPLE_SOURCE,
            "outputs": [_EXAMPLE_OUTPUT],
            "instructions": ["make the square blue"],
            "metadata": {},
        }
    ]
}


class ScoreRequest(BaseModel):
    """Body of ``POST /v1/score``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_EXAMPLE]})
    items: list[ItemPayload] = Field(min_length=1)


class ScoreResponse(BaseModel):
    """Answer of ``POST /v1/score``: [N][K] scores on the 1-5 scale, null where not scored."""

    instruction_following: list[list[float | None]]
    content_consistency: list[list[float | None]]
    scored: list[list[bool]]
    diagnostics: list[dict[str, Any]]
    latency_s: float


class ErrorResponse(BaseModel):
    """Every error: one message naming the offending item and field, or the limit and the numbers."""

    detail: str


class HealthResponse(BaseModel):
    """``GET /health``: ``status`` for everyone; the rest only with the bearer token (when one is set)."""

    status: Literal["ok"]
    model: str | None = None
    backend: str | None = None
    scorer: dict[str, Any] | None = None
    batching: dict[str, Any] | None = None
    admission: dict[str, Any] | None = None


_ERRORS = {
    400: "an image is not a decodable PNG, or the body is not JSON",
    401: "missing or wrong bearer token",
    408: "the request body did not arrive within body_timeout_s",
    413: "the body exceeds max_body_mb, or the images would decode to more than max_request_decoded_mb",
    422: "malformed request: wrong fields or types, invalid Unicode, too many items, images or pixels, mixed K",
    500: "a fault of the service itself",
    503: "the judge behind the service cannot be reached, or the service is saturated (see Retry-After)",
}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse, "description": _ERRORS[code]} for code in codes}


class SafeJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a string that is not valid Unicode can never break the encoder into a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _error_start(status: int, detail: str, headers: dict[str, str] | None = None) -> tuple[dict, bytes]:
    body = SafeJSONResponse({"detail": detail}).body
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        + [(k.encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    return start, body


def bearer_matches(authorization: str | None, token: str) -> bool:
    """True when an ``Authorization`` header carries ``token`` with the Bearer scheme (any letter case)."""
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        credentials.strip().encode("latin-1", "replace"), token.encode("latin-1", "replace")
    )


class GuardMiddleware:
    """ASGI middleware for ``/v1/*``: bearer token (401), body size (413), body read time (408) and the budget of
    bodies in flight (503), all before the app parses anything. The body is read here and replayed to the app,
    so an oversized upload is refused after at most ``max_body_bytes`` bytes, declared or chunked."""

    def __init__(
        self,
        app: Any,
        token: str | None,
        max_body_bytes: int,
        body_budget: ByteBudget,
        body_timeout_s: float,
        queue_wait_s: float,
    ) -> None:
        self.app = app
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.body_budget = body_budget
        self.body_timeout_s = body_timeout_s
        self.queue_wait_s = queue_wait_s

    @staticmethod
    async def _reply(send: Any, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        start, body = _error_start(status, detail, headers)
        await send(start)
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.token is not None:
            given = headers.get("authorization")
            if not bearer_matches(given, self.token):
                reason = "missing bearer token" if not given else "wrong bearer token"
                await self._reply(send, 401, f"{reason} for {scope['path']}", {"www-authenticate": "Bearer"})
                return
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._reply(
                send,
                413,
                f"request body of {declared} bytes exceeds the limit of {self.max_body_bytes} bytes",
            )
            return
        held = 0

        async def hold(total: int) -> bool:
            """Hold ``total`` bytes of the body budget (waiting in its queue); False after answering 503."""
            nonlocal held, reading_deadline
            waited = time.monotonic()
            try:
                await self.body_budget.acquire(total - held, self.queue_wait_s)
            except BudgetBusyError as exc:
                headers = {"retry-after": str(RETRY_AFTER_S), "connection": "close"}
                await self._reply(send, 503, f"service saturated: {exc}", headers)
                return False
            held = total
            reading_deadline += time.monotonic() - waited  # the wait is ours, not the client's
            return True

        try:
            chunks, size = [], 0
            reading_deadline = time.monotonic() + self.body_timeout_s
            # a declared length is held at once: bodies half-held while they wait for the rest could block
            # each other until the queue timeout
            if (
                declared is not None
                and declared.isdigit()
                and int(declared) > 0
                and not await hold(int(declared))
            ):
                return
            while True:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, reading_deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    await self._reply(
                        send,
                        408,
                        f"request body not received within {self.body_timeout_s:g} s",
                        {"connection": "close"},
                    )
                    return
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body_bytes:
                    await self._reply(
                        send,
                        413,
                        f"request body exceeds the limit of {self.max_body_bytes} bytes",
                        {"connection": "close"},
                    )
                    return
                if size > held and not await hold(size):
                    return
                if chunk:
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
        finally:
            if held:
                self.body_budget.release(held)
