"""The bad-input battery against a live reward server: malformed JSON, wrong types, limits, pixel bombs, foreign
image formats, unicode and credentials. Every case must get its documented 4xx with a one-line JSON message that
names the problem, never a 5xx, and the server must go on scoring honest requests afterwards."""

from __future__ import annotations

import base64
import json
import struct
import zlib

import httpx
import pytest
from PIL import Image

from mtflow.reward.server import BackgroundServer, create_app
from mtflow.testing.scorers import BrightnessScorer

from .conftest import blank_png, encode, item_json

TOKEN = "tok-battery"
AUTH = {"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
LIMITS = dict(
    token=TOKEN,
    max_batch_size=8,
    max_wait_ms=1.0,
    max_body_mb=1.0,
    max_inflight_body_mb=4.0,
    max_items_per_request=8,
    max_images_per_item=4,
    max_pixels=1024 * 1024,
    max_request_decoded_mb=16.0,
    max_inflight_decoded_mb=32.0,
)


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(create_app(BrightnessScorer(), **LIMITS)) as running:
        yield running


def crafted_png(
    width: int, height: int, colour_type: int = 2, depth: int = 8, idat: bytes | None = None
) -> str:
    """A PNG whose IHDR says ``width x height``; the pixel data is ``idat`` (default: none at all)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
    raw += chunk(b"IDAT", idat if idat is not None else zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


def small() -> str:
    return blank_png(16)


def body(*items: dict) -> bytes:
    return json.dumps({"items": list(items)}).encode()


def one(images: list[str] | None = None, **extra) -> bytes:
    return body(item_json("t0", images or [small(), small()], **extra))


EPS = base64.b64encode(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n").decode()


def foreign(fmt: str) -> str:
    image = Image.new("RGB", (16, 16), (200, 10, 10))
    return encode(image, fmt)


# (case, raw body, extra headers, expected status, substring of the detail)
CASES = [
    # malformed JSON
    ("truncated JSON", b'{"items": [', {}, 400, "the body is not valid JSON"),
    ("JSON array", b"[]", {}, 422, "invalid request"),
    ("JSON null", b"null", {}, 422, "invalid request"),
    ("empty body", b"", {}, 422, "Field required"),
    ("not UTF-8", b'{"items": "\xff\xfe"}', {}, 400, "error parsing the body"),
    ("pickle", b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00}\x94.", {}, 400, "error parsing the body"),
    ("deep nesting", b"[" * 50_000 + b"]" * 50_000, {}, 400, "error parsing the body"),
    ("NaN literal", b'{"items": [{"item_id": NaN}]}', {}, 422, "invalid request"),
    # wrong types
    ("items a string", b'{"items": "x"}', {}, 422, "items"),
    ("item a number", b'{"items": [1]}', {}, 422, "items.0"),
    ("item_id a number", None, {}, 422, "item_id"),
    ("outputs a string", None, {}, 422, "outputs"),
    ("instructions numbers", None, {}, 422, "instructions"),
    ("metadata a list", None, {}, 422, "metadata"),
    ("source null", None, {}, 422, "source"),
    ("unknown field", None, {}, 422, "Extra inputs are not permitted"),
    # limits
    ("no items", b'{"items": []}', {}, 422, "at least 1 item"),
    ("too many items", None, {}, 422, "9 items in one request; the limit is 8"),
    ("too many images", None, {}, 422, "5 images; the limit is 4"),
    ("no turns", None, {}, 422, "0 outputs for 0 instructions"),
    ("outputs vs instructions", None, {}, 422, "2 outputs for 1 instructions"),
    ("mixed turn counts", None, {}, 422, "send different turn counts in separate requests"),
    ("body too large", b"x" * (2 * 1024 * 1024), {}, 413, "request body of 2097152 bytes exceeds the limit"),
    ("decoded bytes over the request budget", None, {}, 413, "the limit per request is 16.0 MiB"),
    # pixel bombs
    ("blank 2048 x 2048 PNG", None, {}, 422, "2048x2048 = 4194304 pixels exceeds the limit 1048576"),
    ("IHDR of 100000 x 100000", None, {}, 422, "100000x100000 = 10000000000 pixels"),
    ("IHDR of 0 x 5", None, {}, 400, "a PNG of 0x5 pixels"),
    ("invalid bit depth", None, {}, 400, "colour type 2 and bit depth 3"),
    ("truncated pixel data", None, {}, 400, "not a decodable PNG"),
    (
        "PNG signature only",
        base64.b64encode(b"\x89PNG\r\n\x1a\n").decode(),
        {},
        400,
        "without a complete IHDR",
    ),
    # formats other than PNG
    *[
        (f"{fmt} image", fmt, {}, 400, "not a PNG image")
        for fmt in ("JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
    ],
    ("EPS document", "EPS", {}, 400, "not a PNG image"),
    ("SVG text", "SVG", {}, 400, "not a PNG image"),
    ("not base64", "%%%", {}, 400, "not valid base64"),
    ("non-base64 data URL", "data:image/png,abc", {}, 400, "only base64 data URLs"),
    # unicode
    ("lone surrogate in item_id", None, {}, 422, "not valid Unicode"),
    ("lone surrogate in a metadata key", None, {}, 422, "not valid Unicode"),
    ("lone surrogate in an unknown field", None, {}, 422, "invalid request: body.items.0"),
    ("lone surrogate in an instruction", None, {}, 422, "not valid Unicode"),
]


def case_body(name: str, raw) -> bytes:
    """The request body of a battery case (the ones listed with ``None`` or an image are built here)."""
    if isinstance(raw, bytes):
        return raw
    if isinstance(raw, str) and name.endswith(("image", "document", "text", "base64", "data URL", "only")):
        image = {
            "EPS": EPS,
            "SVG": base64.b64encode(b"<svg xmlns='http://www.w3.org/2000/svg'/>").decode(),
        }.get(raw)
        if image is None and raw.isupper():
            image = foreign(raw)
        return one([small(), image or raw])
    item = item_json("t0", [small(), small()])
    text = {
        "item_id a number": lambda: body({**item, "item_id": 5}),
        "outputs a string": lambda: body({**item, "outputs": "abc"}),
        "instructions numbers": lambda: body({**item, "instructions": [1]}),
        "metadata a list": lambda: body({**item, "metadata": []}),
        "source null": lambda: body({**item, "source": None}),
        "unknown field": lambda: body({**item, "colour": "red"}),
        "too many items": lambda: body(*[item_json(f"t{i}", [small(), small()]) for i in range(9)]),
        "too many images": lambda: one([small()] * 5),
        "no turns": lambda: one([small()]),
        "outputs vs instructions": lambda: body({**item_json("t0", [small()] * 3), "instructions": ["a"]}),
        "mixed turn counts": lambda: body(item, item_json("t1", [small()] * 3)),
        "decoded bytes over the request budget": lambda: body(
            item_json("a", [blank_png(1024)] * 3), item_json("b", [blank_png(1024)] * 3)
        ),
        "blank 2048 x 2048 PNG": lambda: one([small(), blank_png(2048)]),
        "IHDR of 100000 x 100000": lambda: one([small(), crafted_png(100_000, 100_000)]),
        "IHDR of 0 x 5": lambda: one([small(), crafted_png(0, 5)]),
        "invalid bit depth": lambda: one([small(), crafted_png(8, 8, depth=3)]),
        "truncated pixel data": lambda: one([small(), crafted_png(64, 64, idat=b"\x78\x9c\x01")]),
        "lone surrogate in item_id": lambda: one().replace(b'"t0"', b'"t\\ud800"'),
        "lone surrogate in a metadata key": lambda: one().replace(
            b'"metadata": {}', b'"metadata": {"\\udfff": 1}'
        ),
        "lone surrogate in an unknown field": lambda: one().replace(b'"metadata": {}', b'"\\ud800x": 1'),
        "lone surrogate in an instruction": lambda: one().replace(b"add a red circle", b"add \\udc00"),
    }
    return text[name]()


@pytest.mark.parametrize(("name", "raw", "headers", "status", "detail"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_its_status_and_a_clear_line(server, name, raw, headers, status, detail):
    content = case_body(name, raw)
    response = httpx.post(
        f"{server.url}/v1/score",
        content=content,
        headers={**AUTH, **headers},
        timeout=30,
    )
    assert response.status_code == status, (name, response.text[:500])
    assert response.headers["content-type"] == "application/json"
    message = response.json()["detail"]
    assert isinstance(message, str) and "\n" not in message and "Traceback" not in message
    assert detail in message, (name, message)


def test_eps_never_reaches_ghostscript(server, monkeypatch):
    import PIL.EpsImagePlugin

    calls = []
    monkeypatch.setattr(PIL.EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a))
    response = httpx.post(f"{server.url}/v1/score", content=one([small(), EPS]), headers=AUTH, timeout=30)
    assert response.status_code == 400 and calls == []


def test_pillows_own_bomb_limit_is_the_same_422(server, monkeypatch):
    """Images above Pillow's decompression-bomb limit get the status of every oversized image."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 16 x 16 image is now above 2 x the limit
    response = httpx.post(f"{server.url}/v1/score", content=one(), headers=AUTH, timeout=30)
    assert response.status_code == 422 and "decompression bomb" in response.json()["detail"]


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (f"Bearer {TOKEN}", 200),
        (f"bearer {TOKEN}", 200),
        (f"BEARER {TOKEN}", 200),
        (f"Bearer  {TOKEN}", 200),
        (f"Basic {TOKEN}", 401),
        ("Bearer wrong", 401),
        (TOKEN, 401),
        ("Bearer", 401),
        ("Bearer t\u00f6k".encode("latin-1"), 401),
    ],
)
def test_bearer_scheme_is_case_insensitive_and_nothing_else_passes(server, header, status):
    response = httpx.post(
        f"{server.url}/v1/score",
        content=one(),
        headers={"Authorization": header, "content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == status, response.text
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "item_id",
    ["emoji \U0001f3a8", "rtl \u05e9\u05dc\u05d5\u05dd", "nul \x00 byte", "cjk \u7de8\u96c6", "e\u0301"],
)
def test_valid_unicode_is_scored_and_echoed_exactly(server, item_id):
    response = httpx.post(
        f"{server.url}/v1/score",
        content=body(item_json(item_id, [small(), small()])),
        headers=AUTH,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.json()["diagnostics"][0]["item_id"] == item_id
    assert response.json()["scored"] == [[True]]


def test_health_shows_no_configuration_without_the_token(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/health", headers={"Authorization": "Bearer no"}).json() == {
        "status": "ok"
    }
    details = httpx.get(f"{server.url}/health", headers=AUTH).json()
    assert details["admission"]["request_decoded_mib_limit"] == 16.0 and "scorer" in details


def test_the_server_still_scores_after_the_battery(server):
    image = Image.new("RGB", (8, 8), (255, 255, 255))
    response = httpx.post(
        f"{server.url}/v1/score",
        content=body(item_json("after", [encode(image), encode(image)])),
        headers=AUTH,
    )
    assert response.status_code == 200
    assert response.json()["instruction_following"] == [[5.0]]  # BrightnessScorer: 1 + 4 x mean brightness 1
    assert response.json()["content_consistency"] == [[5.0]]  # 5 - 4 x mean |output - source| 0
