"""Admission control of the reward service: what a request costs in memory, known before anything is decoded.

A 0.3 MiB request of blank 4096 x 4096 PNGs decodes to gigabytes, so the body size bounds nothing. The service
reads every image's PNG header (width, height, colour type, bit depth: the first 33 bytes) and prices the request
in *decoded bytes* before it decodes a single pixel:

- an image *holds* its RGB pixels from decoding until the request is answered (Pillow keeps RGB in 4 bytes per
  pixel), at the size the server keeps: images larger than the judge's input size are downscaled right after
  decoding (PNG has no reduced decode, so the full image exists for a moment);
- while it is decoded, converted and downscaled it needs *transient* bytes on top (the native decode, the RGB
  copy, the full-size copy before the downscale);
- a request's images are decoded one after another, so its cost is the sum of what they hold plus the largest
  transient.

``ByteBudget`` then lets requests take bytes out of a server-wide budget, waiting in a bounded FIFO queue for a
bounded time when it is exhausted.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from mtflow.reward.wire import PngHeader

RGB_BYTES_PER_PIXEL = 4  # Pillow stores an RGB image as 32-bit pixels
MIB = 1024 * 1024


def downscaled_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """The size ``wire.resize_to_max_side`` gives an image of ``width`` x ``height`` (same rounding)."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


@dataclass(frozen=True)
class ImageCost:
    """Decoded bytes of one image: ``held`` until its request is answered, ``transient`` on top while decoding."""

    held: int
    transient: int


def image_cost(header: PngHeader, max_side: int | None) -> ImageCost:
    """What decoding an image with ``header`` and downscaling it to ``max_side`` costs (see the module doc)."""
    full_rgb = header.pixels * RGB_BYTES_PER_PIXEL
    width, height = downscaled_size(header.width, header.height, max_side)
    downscaled = (width, height) != (header.width, header.height)
    held = width * height * RGB_BYTES_PER_PIXEL
    peak = header.pixels * header.native_bytes_per_pixel
    if not header.decodes_to_rgb:
        peak += full_rgb  # convert("RGB") copies while the native image lives
    if downscaled:
        peak += held  # the resize output exists next to the full-size image
    return ImageCost(held=held, transient=max(0, peak - held))


@dataclass(frozen=True)
class RequestCost:
    """Decoded bytes of a request: what its images hold, plus the largest transient (decoded one at a time)."""

    held: int
    transient: int

    @property
    def total(self) -> int:
        return self.held + self.transient

    @classmethod
    def of(cls, costs: list[ImageCost]) -> RequestCost:
        return cls(sum(c.held for c in costs), max((c.transient for c in costs), default=0))


def mib(num_bytes: float) -> str:
    """``num_bytes`` as MiB for messages (``12.5 MiB``)."""
    return f"{num_bytes / MIB:.1f} MiB"


class BudgetBusyError(Exception):
    """A request could not get its bytes: the wait queue was full or the wait timed out (the message says which)."""


class ByteBudget:
    """Bytes that requests in flight may hold, handed out first come, first served.

    ``acquire`` takes bytes at once when they are free and nobody waits before it; otherwise it waits in a FIFO
    queue of at most ``max_waiting`` requests for at most ``timeout_s``. Not thread-safe: use it from the event loop.
    """

    def __init__(self, capacity: int, max_waiting: int, name: str) -> None:
        if capacity < 1:
            raise ValueError(f"{name}: the budget must be at least 1 byte, got {capacity}")
        self.capacity = capacity
        self.max_waiting = max_waiting
        self.name = name
        self.used = 0
        self.peak = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _take(self, amount: int) -> None:
        self.used += amount
        self.peak = max(self.peak, self.used)

    async def acquire(self, amount: int, timeout_s: float) -> None:
        """Take ``amount`` bytes (<= capacity), waiting if needed; ``BudgetBusyError`` if that is not possible."""
        if amount > self.capacity:
            raise ValueError(f"{self.name}: {amount} bytes can never fit a budget of {self.capacity}")
        if not self._waiters and self.used + amount <= self.capacity:
            self._take(amount)
            return
        if len(self._waiters) >= self.max_waiting:
            raise BudgetBusyError(
                f"{self.name} is exhausted ({mib(self.used)} of {mib(self.capacity)} in use) and "
                f"{len(self._waiters)} requests already wait for it"
            )
        future = asyncio.get_running_loop().create_future()
        entry = (amount, future)
        self._waiters.append(entry)
        try:
            await asyncio.wait({future}, timeout=timeout_s)
        except BaseException:  # the caller was cancelled (client gone): give back what may have been granted
            self._abandon(entry)
            raise
        if not future.done():
            self._abandon(entry)
            raise BudgetBusyError(
                f"waited {timeout_s:g} s for {mib(amount)} of {self.name} ({mib(self.used)} of "
                f"{mib(self.capacity)} in use)"
            )

    def _abandon(self, entry: tuple[int, asyncio.Future]) -> None:
        amount, future = entry
        if future.done() and not future.cancelled():
            self.release(amount)  # granted just before the caller gave up
            return
        future.cancel()
        try:
            self._waiters.remove(entry)
        except ValueError:
            pass
        self._grant()  # the head of the queue may have been this entry

    def release(self, amount: int) -> None:
        """Give back ``amount`` bytes and wake the waiters that now fit, in order."""
        self.used -= amount
        if self.used < 0:
            raise RuntimeError(f"{self.name}: released more bytes than were taken")
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            amount, future = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            if self.used + amount > self.capacity:
                return
            self._waiters.popleft()
            self._take(amount)
            future.set_result(None)
