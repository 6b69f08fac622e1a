"""Timing, line fits and peak-memory probes for the benchmark.

Peak memory on CPU: torch has no allocator statistics for CPU tensors and ``tracemalloc`` does not see them, so the
benchmark reads the process's resident-set high-water mark (``VmHWM`` in ``/proc/self/status``) after resetting it
through ``/proc/self/clear_refs`` (Linux >= 4.0), and first returns the heap's free pages to the OS
(``malloc_trim(0)``), so that the starting RSS is live memory and the peak above it is what the measured work touched.
(Forcing every large allocation through mmap with ``MALLOC_MMAP_THRESHOLD_`` works too, but makes a tiny-model
iteration about 3x slower, which would distort the times measured in the same run.)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class Timing:
    """Wall times of repeated runs of one thing.

    Attributes:
        times: seconds per run (warm-up runs excluded).
    """

    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (``time.perf_counter``)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return Timing(times)


@dataclass(frozen=True)
class LineFit:
    """Least-squares line y = slope * x + intercept and its coefficient of determination R^2."""

    slope: float
    intercept: float
    r2: float

    def __call__(self, x: float) -> float:
        return self.slope * x + self.intercept


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> LineFit:
    """Ordinary least squares over >= 2 points with distinct x. R^2 = 1 - SS_res / SS_tot (1 when y is constant
    and fitted exactly)."""
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} x values for {len(ys)} y values")
    if len(xs) < 2 or len(set(xs)) < 2:
        raise ValueError(f"a line needs at least two distinct x values, got {list(xs)}")
    n = len(xs)
    mean_x = sum(xs) / n
    mean_y = sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    slope = sxy / sxx
    intercept = mean_y - slope * mean_x
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - mean_y) ** 2 for y in ys)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    return LineFit(slope, intercept, r2)


# ---------------------------------------------------------------------------------------------------- memory


def _status_kib(key: str) -> int:
    try:
        text = STATUS.read_text()
    except OSError as err:
        raise RuntimeError(f"cannot read {STATUS} (peak-memory probes need Linux procfs): {err}") from err
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{STATUS} has no {key} line")


def current_rss_bytes() -> int:
    """Resident set size of this process now."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Resident-set high-water mark since process start or the last ``reset_peak_rss``."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Reset the high-water mark to the current RSS (writes 5 to /proc/self/clear_refs)."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError as err:
        raise RuntimeError(f"cannot reset the peak RSS through {CLEAR_REFS}: {err}") from err


def trim_heap() -> None:
    """Return free heap pages to the OS (glibc ``malloc_trim(0)``); a no-op where glibc is not the allocator."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@dataclass
class PeakProbe:
    """Peak resident memory above the level at ``start``. Use: ``probe.start(); ...work...; probe.stop()``.

    Attributes:
        baseline: RSS in bytes when the probe started.
        peaks: bytes above the baseline reached between each start/stop pair.
    """

    baseline: int = 0
    peaks: list[int] = field(default_factory=list)

    def start(self) -> None:
        trim_heap()
        reset_peak_rss()
        self.baseline = current_rss_bytes()

    def stop(self) -> int:
        peak = peak_rss_bytes() - self.baseline
        self.peaks.append(peak)
        return peak


# ---------------------------------------------------------------------------------------------------- counting


@dataclass
class CallLog:
    """Calls made to wrapped methods: ``calls[name]`` lists the batch size (first dim of the first tensor argument,
    or the length of the first list argument) of every call."""

    calls: dict[str, list[int]] = field(default_factory=dict)

    def count(self, name: str) -> int:
        return len(self.calls.get(name, []))

    def samples(self, name: str) -> int:
        return sum(self.calls.get(name, []))

    def histogram(self, name: str) -> dict[int, int]:
        """batch size -> number of calls."""
        out: dict[int, int] = {}
        for size in self.calls.get(name, []):
            out[size] = out.get(size, 0) + 1
        return dict(sorted(out.items()))


def _batch_size(args: tuple, kwargs: dict) -> int:
    for value in (*args, *kwargs.values()):
        shape = getattr(value, "shape", None)
        if shape is not None and len(shape) > 0:
            return int(shape[0])
        if isinstance(value, (list, tuple)):
            return len(value)
    return 1


@contextmanager
def count_calls(targets: dict[str, tuple[Any, str]]) -> Iterator[CallLog]:
    """Wrap ``getattr(obj, method)`` for each ``name -> (obj, method)`` with a counter (instance attribute, removed on
    exit) and yield the log. For ``nn.Module.forward`` pass the module and ``"forward"``: keyword-only calls are
    counted too (the batch size is read from the first tensor among the keyword arguments)."""
    log = CallLog()
    patched: list[tuple[Any, str, bool, Any]] = []
    try:
        for name, (obj, method) in targets.items():
            original = getattr(obj, method)
            had_instance_attr = method in vars(obj)
            log.calls[name] = []

            def wrapper(*args, __original=original, __name=name, **kwargs):
                log.calls[__name].append(_batch_size(args, kwargs))
                return __original(*args, **kwargs)

            setattr(obj, method, wrapper)
            patched.append((obj, method, had_instance_attr, original))
        yield log
    finally:
        for obj, method, had_instance_attr, original in reversed(patched):
            if had_instance_attr:
                setattr(obj, method, original)
            else:
                delattr(obj, method)
