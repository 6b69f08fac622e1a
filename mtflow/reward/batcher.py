"""Dynamic batching for the reward service: concurrent requests merged into scorer calls, several in flight, and
one item's failure kept to that item.

- Batching: the first waiting request opens a batch; requests arriving within ``max_wait_ms`` join it while they
  fit ``max_batch_size`` items (a larger request is scored on its own). Items with different turn counts go to
  separate scorer calls.
- Batches in flight: up to ``max_batches_in_flight`` scorer calls run at once on worker threads, so a judge that
  batches continuously (vLLM) always has work queued. A batch is only formed when a slot is free: while all are
  busy, requests queue and the next batch takes as many as fit.
- Isolation: when the scorer raises on a batch (or returns the wrong shape), each of its items is scored again
  on its own, once. Items that fail alone are reported unscored with the reason; the others get their scores.
  ``ScorerUnavailableError`` (the judge as a whole cannot be reached) is not retried: every request of the batch
  hears about it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from mtflow.reward.base import ScoreBatch, Scorer, ScorerUnavailableError, ScoringItem

log = logging.getLogger(__name__)


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
    batches_in_flight: int = 0
    largest_batch: int = 0
    isolated_batches: int = 0
    failed_items: int = 0
    recent_batch_sizes: deque = field(default_factory=lambda: deque(maxlen=64))


def _with_item_ids(batch: ScoreBatch, items: list[ScoringItem]) -> ScoreBatch:
    """``batch`` with one diagnostic per item, each naming its ``item_id`` (clients check the order with it)."""
    diagnostics = batch.diagnostics or [{} for _ in items]
    batch.diagnostics = [{**d, "item_id": item.item_id} for d, item in zip(diagnostics, items)]
    return batch


def _check_shape(batch: ScoreBatch, items: list[ScoringItem], scorer: Scorer) -> None:
    expected = (len(items), items[0].num_turns)
    if tuple(batch.scored.shape) != expected:
        raise RuntimeError(
            f"{type(scorer).__name__} returned scores of shape {tuple(batch.scored.shape)} for {expected[0]} items "
            f"of {expected[1]} turns"
        )


def score_isolated(scorer: Scorer, items: list[ScoringItem]) -> tuple[ScoreBatch, bool, int]:
    """Score ``items``; if the scorer fails on the batch, score each item alone once (see the module doc).

    Returns the scores (one diagnostic per item, with its ``item_id``), whether the batch had to be split and how
    many items failed alone. Raises only ``ScorerUnavailableError``.
    """
    try:
        batch = scorer.score(items)
        _check_shape(batch, items, scorer)
        return _with_item_ids(batch, items), False, 0
    except ScorerUnavailableError:
        raise
    except Exception as exc:
        log.exception("scorer failed on a batch of %d items; scoring them one by one", len(items))
        first_error = f"{type(exc).__name__}: {exc}"
    parts, failed = [], 0
    for item in items:
        try:
            part = scorer.score([item]) if len(items) > 1 else None
            if part is None:
                raise RuntimeError(first_error)
            _check_shape(part, [item], scorer)
            part = _with_item_ids(part, [item])
            part.diagnostics[0]["scored_alone"] = True  # its batch failed; this item did not
        except ScorerUnavailableError:
            raise
        except Exception as exc:
            reason = f"the scorer failed on item {item.item_id!r}: {type(exc).__name__}: {exc}"
            part = _with_item_ids(ScoreBatch.unscored(1, item.num_turns, reason), [item])
            failed += 1
        parts.append(part)
    return ScoreBatch.concat(parts), True, failed


class DynamicBatcher:
    """Merges concurrent scoring requests into scorer calls of up to ``max_batch_size`` items (module doc)."""

    def __init__(
        self, scorer: Scorer, max_batch_size: int, max_wait_ms: float, max_batches_in_flight: int = 4
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_batches_in_flight < 1:
            raise ValueError(f"max_batches_in_flight must be >= 1, got {max_batches_in_flight}")
        self.scorer = scorer
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_batches_in_flight = max_batches_in_flight
        self.stats = BatcherStats()
        self._queue: asyncio.Queue[_Pending] | None = None
        self._slots: asyncio.Semaphore | None = None
        self._held: _Pending | None = None
        self._worker: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(max_workers=max_batches_in_flight, thread_name_prefix="scorer")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._slots = asyncio.Semaphore(self.max_batches_in_flight)
        self._worker = asyncio.create_task(self._run(), name="reward-batcher")

    async def stop(self) -> None:
        for task in [self._worker, *self._tasks]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
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
            pending = await self._next(max(0.0, deadline - time.monotonic()))
            if pending is None:
                break
            if size + len(pending.items) > self.max_batch_size:
                self._held = pending  # opens the next batch
                break
            batch.append(pending)
            size += len(pending.items)
        return batch

    async def _run(self) -> None:
        assert self._slots is not None
        while True:
            await self._slots.acquire()  # a batch is formed only when it can start at once
            try:
                batch = await self._collect()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.create_task(self._score(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _score(self, batch: list[_Pending]) -> None:
        assert self._slots is not None
        loop = asyncio.get_running_loop()
        self.stats.batches_in_flight += 1
        try:
            by_turns: dict[int, list[_Pending]] = {}
            for pending in batch:
                by_turns.setdefault(pending.num_turns, []).append(pending)
            for group in by_turns.values():
                items = [item for pending in group for item in pending.items]
                self.stats.queued_items -= len(items)
                self.stats.in_flight_items += len(items)
                result: ScoreBatch | None = None
                error: BaseException | None = None
                try:
                    result, split, failed = await loop.run_in_executor(
                        self._executor, score_isolated, self.scorer, items
                    )
                    self.stats.isolated_batches += int(split)
                    self.stats.failed_items += failed
                except Exception as exc:  # ScorerUnavailableError, or a fault of the service itself
                    error = exc
                    if not isinstance(exc, ScorerUnavailableError):
                        log.exception("reward batcher failed on a batch of %d items", len(items))
                finally:
                    self.stats.in_flight_items -= len(items)
                self.stats.batches += 1
                self.stats.requests += len(group)
                self.stats.items += len(items)
                self.stats.largest_batch = max(self.stats.largest_batch, len(items))
                self.stats.recent_batch_sizes.append(len(items))
                self._deliver(group, result, error)
        finally:
            self.stats.batches_in_flight -= 1
            self._slots.release()

    @staticmethod
    def _deliver(group: list[_Pending], result: ScoreBatch | None, error: BaseException | None) -> None:
        start = 0
        for pending in group:
            stop = start + len(pending.items)
            if pending.future.done():  # the caller went away
                start = stop
                continue
            if error is not None or result is None:
                pending.future.set_exception(error or RuntimeError("scorer returned nothing"))
                start = stop
                continue
            pending.future.set_result(
                ScoreBatch(
                    instruction_following=result.instruction_following[start:stop],
                    content_consistency=result.content_consistency[start:stop],
                    scored=result.scored[start:stop],
                    diagnostics=result.diagnostics[start:stop],
                    latency_s=result.latency_s,
                )
            )
            start = stop
