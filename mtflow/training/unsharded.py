"""The no-grad rollout with the FSDP2-sharded base gathered once (``model.rollout.unsharded``).

A rollout of T steps x K turns calls the transformer T x K x (N / forward batch) times; under FSDP2 every call
all-gathers each block again (``reshard_after_forward``). With the whole base unsharded once before the rollout and
resharded right after it (before the update), the rollout makes one all-gather per unit instead. The gathered
weights are the same bytes, so the rollout's outputs are bit for bit the same; the cost is the unsharded base's
memory for the rollout's duration (``mtflow check`` counts it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


def fsdp_units(units: Sequence[nn.Module]) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [u for u in units if isinstance(u, FSDPModule)]


def unsharded_bytes(units: Sequence[nn.Module], compute_dtype: torch.dtype) -> int:
    """Bytes the whole base takes once unsharded (every parameter in the compute dtype)."""
    size = torch.empty((), dtype=compute_dtype).element_size()
    seen, total = set(), 0
    for unit in units:
        for param in unit.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel() * size
    return total


@contextmanager
def unsharded(units: Sequence[nn.Module]) -> Iterator[None]:
    """Within the block, every FSDP2 unit of ``units`` (innermost first, the root last) stays unsharded: gathered
    once on entry, resharded on exit, with FSDP2's defaults restored (non-root units reshard after forward, the
    root does not). Units that are not FSDP2 modules (a single process) are left alone."""
    sharded = fsdp_units(units)
    if not sharded:
        yield
        return
    for unit in sharded:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in sharded:
            unit.set_reshard_after_forward(unit is not sharded[-1], recurse=False)
            unit.reshard()
