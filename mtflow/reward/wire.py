"""JSON wire format of the reward service (no pickle anywhere): images as base64 PNG, NaN as null.

Request  ``POST /v1/score``::

    {"items": [{"item_id": str, "chain_id": str, "source": <b64 png>, "outputs": [<b64 png>, ...],
                "instructions": [str, ...], "metadata": {...}}, ...]}

Response::

    {"instruction_following": [[float | null, ...], ...],   # [N, K]
     "content_consistency":   [[float | null, ...], ...],   # [N, K]
     "scored": [[bool, ...], ...],                          # [N, K]
     "diagnostics": [{...}, ...], "latency_s": float}
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from mtflow.reward.base import ScoreBatch, ScoringItem


class WireFormatError(ValueError):
    """A request or response does not follow the wire format (the message names the offending field)."""


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HEADER_BYTES = 33  # signature (8) + IHDR length and type (8) + IHDR data (13) + CRC (4)
_HEADER_BASE64_CHARS = 44  # ceil(33 / 3) * 4
_VALID_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


class NotPngError(WireFormatError):
    """An image on the wire is not a PNG (the only format the service decodes)."""


class ImageTooLargeError(WireFormatError):
    """An image has more pixels than the service (or Pillow's decompression-bomb guard) accepts."""


@dataclass(frozen=True)
class PngHeader:
    """What a PNG's IHDR chunk declares."""

    width: int
    height: int
    bit_depth: int
    colour_type: int

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decodes_to_rgb(self) -> bool:
        """True when Pillow decodes it straight to mode RGB (8- or 16-bit truecolour without alpha)."""
        return self.colour_type == 2

    @property
    def native_bytes_per_pixel(self) -> int:
        """Bytes per pixel of the mode Pillow decodes it to (L / P: 1; 16-bit grey through mode I: 4; else 4)."""
        if self.colour_type in (0, 3) and self.bit_depth <= 8:
            return 1
        return 4


def parse_png_header(raw: bytes, where: str) -> PngHeader:
    """The IHDR of a PNG from its first 33 bytes; ``NotPngError`` / ``WireFormatError`` naming ``where``."""
    if not raw.startswith(PNG_SIGNATURE):
        raise NotPngError(
            f"{where}: not a PNG image (the wire format is PNG only; it starts with {raw[:8]!r})"
        )
    if len(raw) < _HEADER_BYTES or raw[12:16] != b"IHDR":
        raise WireFormatError(f"{where}: a PNG without a complete IHDR header")
    width, height, depth, colour = struct.unpack(">IIBB", raw[16:26])
    if not (0 < width < 2**31 and 0 < height < 2**31):
        raise WireFormatError(f"{where}: a PNG of {width}x{height} pixels")
    if depth not in _VALID_DEPTHS.get(colour, ()):
        raise WireFormatError(f"{where}: a PNG with colour type {colour} and bit depth {depth}")
    return PngHeader(width, height, depth, colour)


def peek_png_header(data: str, where: str) -> PngHeader:
    """The PNG header of a base64 string (or ``data:`` URL), decoding only its first 44 characters."""
    if not isinstance(data, str):
        raise WireFormatError(f"{where}: expected a base64 string, got {type(data).__name__}")
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if ";base64" not in header:
            raise WireFormatError(f"{where}: only base64 data URLs are accepted, got {header[:40]!r}")
    try:
        raw = base64.b64decode(data[:_HEADER_BASE64_CHARS], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise WireFormatError(f"{where}: not valid base64 ({exc})") from exc
    return parse_png_header(raw, where)


def resize_to_max_side(image: Image.Image, max_side: int | None) -> Image.Image:
    """``image`` scaled down (aspect kept, bicubic) so that its longer side is at most ``max_side``."""
    if max_side is None or max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def encode_image(image: Image.Image, max_side: int | None = None) -> str:
    """Base64 of a lossless PNG of ``image`` (RGB), optionally downscaled to ``max_side``."""
    buffer = io.BytesIO()
    resize_to_max_side(image.convert("RGB"), max_side).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def image_data_url(image: Image.Image, max_side: int | None = None) -> str:
    """``data:image/png;base64,...`` URL of ``image`` (what OpenAI-compatible servers accept)."""
    return "data:image/png;base64," + encode_image(image, max_side)


def decode_image(
    data: str, where: str, max_pixels: int | None = None, max_side: int | None = None
) -> Image.Image:
    """Decode a base64 PNG (a bare string or a ``data:`` URL) into RGB; ``where`` names it in errors.

    Only PNG is decoded (the wire format; other formats never reach Pillow's plugins). Images above
    ``max_pixels``, or above Pillow's decompression-bomb limit, raise ``ImageTooLargeError`` from the header
    alone. With ``max_side`` the image is downscaled right after decoding (``resize_to_max_side``), so only the
    small copy is kept.
    """
    header = peek_png_header(data, where)
    if max_pixels is not None and header.pixels > max_pixels:
        raise ImageTooLargeError(
            f"{where}: {header.width}x{header.height} = {header.pixels} pixels exceeds the limit {max_pixels}"
        )
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise WireFormatError(f"{where}: not valid base64 ({exc})") from exc
    try:
        image = Image.open(io.BytesIO(raw), formats=["PNG"])
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{where}: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
        raise WireFormatError(f"{where}: not a decodable PNG ({type(exc).__name__}: {exc})") from exc
    if image.mode != "RGB":
        image = image.convert("RGB")
    return resize_to_max_side(image, max_side)


def item_to_json(item: ScoringItem, max_side: int | None = None) -> dict[str, Any]:
    """One ``ScoringItem`` as a JSON-ready dict."""
    return {
        "item_id": item.item_id,
        "chain_id": item.chain_id,
        "source": encode_image(item.source, max_side),
        "outputs": [encode_image(image, max_side) for image in item.outputs],
        "instructions": list(item.instructions),
        "metadata": item.metadata,
    }


def _nan_to_none(values: torch.Tensor) -> list[list[float | None]]:
    return [[None if math.isnan(v) else v for v in row] for row in values.tolist()]


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by None and tuples by lists (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def score_batch_to_json(batch: ScoreBatch) -> dict[str, Any]:
    """A ``ScoreBatch`` as a strict-JSON dict (NaN -> null)."""
    return {
        "instruction_following": _nan_to_none(batch.instruction_following.float()),
        "content_consistency": _nan_to_none(batch.content_consistency.float()),
        "scored": batch.scored.bool().tolist(),
        "diagnostics": json_safe(batch.diagnostics),
        "latency_s": float(batch.latency_s),
    }


def _matrix(
    payload: dict[str, Any], key: str, num_items: int, num_turns: int, source: str
) -> list[list[Any]]:
    rows = payload.get(key)
    if (
        not isinstance(rows, list)
        or len(rows) != num_items
        or any(not isinstance(row, list) or len(row) != num_turns for row in rows)
    ):
        raise WireFormatError(f"{source}: {key!r} is not a [{num_items}, {num_turns}] list of lists")
    return rows


def score_batch_from_json(payload: Any, num_items: int, num_turns: int, source: str) -> ScoreBatch:
    """Parse and validate a response; a score outside [1, 5] or a non-number is a format error.

    Where ``scored`` is False the scores are forced to NaN, so nothing unscored carries a value.
    """
    if not isinstance(payload, dict):
        raise WireFormatError(f"{source}: response is {type(payload).__name__}, not a JSON object")
    tensors = {}
    for key in ("instruction_following", "content_consistency"):
        rows = _matrix(payload, key, num_items, num_turns, source)
        values = []
        for row in rows:
            for value in row:
                if value is None:
                    values.append(math.nan)
                elif isinstance(value, (int, float)) and not isinstance(value, bool) and 1.0 <= value <= 5.0:
                    values.append(float(value))
                else:
                    raise WireFormatError(f"{source}: {key} holds {value!r}, not a score in [1, 5] or null")
        tensors[key] = torch.tensor(values, dtype=torch.float32).reshape(num_items, num_turns)
    scored_rows = _matrix(payload, "scored", num_items, num_turns, source)
    if any(not isinstance(v, bool) for row in scored_rows for v in row):
        raise WireFormatError(f"{source}: 'scored' must hold booleans")
    scored = torch.tensor(scored_rows, dtype=torch.bool).reshape(num_items, num_turns)
    scored &= ~(tensors["instruction_following"].isnan() | tensors["content_consistency"].isnan())
    for key in tensors:
        tensors[key] = tensors[key].masked_fill(~scored, math.nan)
    diagnostics = payload.get("diagnostics") or [{} for _ in range(num_items)]
    if not isinstance(diagnostics, list) or len(diagnostics) != num_items:
        raise WireFormatError(f"{source}: 'diagnostics' must be a list of {num_items} objects")
    latency = payload.get("latency_s", 0.0)
    return ScoreBatch(
        instruction_following=tensors["instruction_following"],
        content_consistency=tensors["content_consistency"],
        scored=scored,
        diagnostics=[d if isinstance(d, dict) else {"raw": d} for d in diagnostics],
        latency_s=float(latency) if isinstance(latency, (int, float)) else 0.0,
    )


def check_same_turns(items: Sequence[ScoringItem], who: str) -> int:
    """The shared number of turns K of ``items``; raises naming the first item that differs."""
    if not items:
        raise ValueError(f"{who}: no items to score")
    num_turns = items[0].num_turns
    for item in items:
        if item.num_turns != num_turns:
            raise ValueError(
                f"{who}: item {item.item_id!r} has {item.num_turns} turns but {items[0].item_id!r} has {num_turns}; "
                "score trajectories with different turn counts in separate calls"
            )
    return num_turns
