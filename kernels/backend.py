"""Choosing between the Triton kernels and their torch references.

``"auto"`` takes Triton when every tensor is on CUDA and ``triton`` imports, torch otherwise (CPU runs, and any
machine without Triton). ``"triton"`` forces the kernels: on CPU tensors that only works under Triton's
interpreter (``TRITON_INTERPRET=1`` set before the first kernel module is imported), which is how the tests run
them. ``"torch"`` forces the references.
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")


@functools.cache
def triton_importable() -> bool:
    """True when ``import triton`` works (cached)."""
    try:
        import triton  # noqa: F401
    except Exception:  # any import-time failure means "not usable", never a crash of the training run
        return False
    return True


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is switched on for kernels defined from now on."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(backend: Backend, *tensors: torch.Tensor | None) -> bool:
    """Resolve ``backend`` for these tensors (None entries are ignored).

    Raises:
        ValueError: unknown backend name.
        RuntimeError: ``"triton"`` forced where it cannot run (no triton, or CPU tensors without the interpreter).
    """
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return False
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if backend == "auto":
        return on_cuda and triton_importable()
    if not triton_importable():
        raise RuntimeError("kernel backend 'triton' was forced but `import triton` fails")
    if not on_cuda and not interpreter_enabled():
        raise RuntimeError(
            "kernel backend 'triton' was forced on CPU tensors; set TRITON_INTERPRET=1 before the first kernel "
            "import to run Triton's interpreter, or use backend='torch'"
        )
    return True


def flat_rows(tensor: torch.Tensor) -> torch.Tensor:
    """[N, ...] -> contiguous [N, D] view (a copy only when the input is not contiguous)."""
    return tensor.reshape(tensor.shape[0], -1).contiguous()


def per_sample(value: torch.Tensor | float, num: int, device: torch.device) -> torch.Tensor:
    """A scalar, 0-d, [N] or [N, 1, ..., 1] value -> contiguous [N] float32 on ``device``."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    if t.numel() == 1:
        return t.reshape(()).expand(num).contiguous()
    if t.numel() != num:
        raise ValueError(f"expected a scalar or {num} per-sample values, got shape {tuple(t.shape)}")
    return t.reshape(num).contiguous()
