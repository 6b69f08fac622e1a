"""Pieces every Triton kernel module shares: the block reduction and the grid sizing (imported lazily, with the
kernels, only when the Triton backend runs).

Row kernels use the grid (N, cdiv(D, BLOCK)) and write one partial sum per (row, block) that the caller reduces
with a fixed-order torch sum (deterministic, no atomics).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def block_sum(values):
    # tl.reduce with a local combine function instead of tl.sum: tl.sum is a @triton.jit function of triton's own
    # library, and when triton was imported before TRITON_INTERPRET=1 was set (diffusers imports it), the
    # interpreter cannot call it. On GPU the two compile to the same reduction.
    return tl.reduce(values, 0, _add)


def row_launch(num_rows: int, num_cols: int, max_block: int = 1024) -> tuple[int, tuple[int, int]]:
    """(BLOCK, grid) of a row kernel over [num_rows, num_cols]: BLOCK a power of two covering ``num_cols`` up to
    ``max_block`` (at least 16, Triton's minimum useful width); grid (num_rows, blocks per row)."""
    block = max(16, min(max_block, triton.next_power_of_2(num_cols)))
    return block, (num_rows, triton.cdiv(num_cols, block))


VECTOR_BLOCK = 1024


def vector_grid(num: int, block: int = VECTOR_BLOCK) -> tuple[int]:
    """Grid of a 1-D kernel over ``num`` elements in blocks of ``block`` (at least one program)."""
    return (max(1, triton.cdiv(num, block)),)
