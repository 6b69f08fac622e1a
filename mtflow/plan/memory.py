"""Per-GPU memory of a run, counted on the real architectures without a weight or a GPU.

- Parameters, gradients and optimiser state: the policy is built on the meta device and sharded with mtflow's own
  FSDP2 plan (``shard_policy``) over torch's fake process group of the configured world size; each rank's bytes
  are the local shards of the resulting DTensors (FSDP2 splits dim 0 as ``torch.chunk`` does).
- Activations: the real forward (and backward) runs on fake tensors while ``LivePeak`` follows every tensor
  storage the ops create and free. Blocks of a kind are identical, so the model runs at three small depths and the
  peak is extrapolated linearly in the number of each kind of block (exact: ``tests/test_plan.py``).
- Stored rollout: the exact shapes and dtypes of every ``Rollout`` tensor.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class LivePeak(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and still alive (views and in-place results count
    once; a storage counts until it is freed). Storages of ``existing`` tensors (parameters, buffers) are not
    counted when an op returns a view of them.

    torch's ``MemTracker`` does the same and more, but it registers a gradient hook on every parameter of a module
    it sees, which fails on a frozen base with LoRA adapters (``cannot register a hook on a tensor that doesn't
    require gradient``), so this is the 20-line subset the plan needs.
    """

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = WeakIdKeyDictionary()
        for tensor in existing:
            self._seen[tensor.untyped_storage()] = 0

    def _free(self, size: int) -> None:
        self.live -= size

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, size)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._track, out)
        return out


def fake_peak(run: Callable[[], None], modules: Iterable[torch.nn.Module] = ()) -> int:
    """Peak live bytes of the tensors ``run`` creates beyond the parameters and buffers of ``modules`` (call it
    inside a ``FakeTensorMode``)."""
    existing = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    tracker = LivePeak(existing)
    with tracker:
        run()
    return tracker.peak


def extrapolate_depth(measure: Callable[[int, int], int], double: int, single: int) -> int:
    """A peak that is linear in the number of double and single blocks, from depths (1, 1), (2, 1), (1, 2)."""
    base = measure(1, 1)
    per_double = measure(2, 1) - base
    per_single = measure(1, 2) - base
    return base + (double - 1) * per_double + (single - 1) * per_single


@contextmanager
def fake_process_group(world_size: int, rank: int = 0) -> Iterator[None]:
    """torch's fake process group (collectives are no-ops) of ``world_size`` ranks, as the default group."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised; the plan needs its own fake one")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def shard_rows(rows: int, world_size: int) -> list[int]:
    """Rows of a dim-0 FSDP2 shard on each rank (``torch.chunk`` sizes, empty chunks for the last ranks)."""
    sizes = [c.shape[0] for c in torch.empty(rows, device="meta").chunk(world_size)]
    return sizes + [0] * (world_size - len(sizes))


def local_bytes(param: torch.Tensor, world_size: int) -> list[int]:
    """Bytes of ``param`` held by each rank: its dim-0 shard if FSDP sharded it (a DTensor), else all of it."""
    size = param.element_size()
    if not hasattr(param, "to_local"):
        return [param.numel() * size] * world_size
    shape = tuple(param.shape)
    inner = param.numel() // shape[0] if shape and shape[0] else 0
    return (
        [rows * inner * size for rows in shard_rows(shape[0], world_size)] if shape else [size] * world_size
    )


@dataclass(frozen=True)
class RolloutShape:
    """Sizes of one rank's rollout. N = chains x group trajectories.

    Attributes:
        chains, group, turns, num_steps, recorded: B, G, K, T and S (recorded steps per turn).
        tokens, reference_tokens, channels: L, L_ref, C of the packed latents.
        side: image side in pixels.
        text_tokens, text_width, pooled_width: T5 tokens per instruction, its width, CLIP pooled width.
        unique_texts: distinct instructions of the batch (at most chains x turns).
        store_bytes, model_bytes: bytes per element of recorded states and of the model dtype.
    """

    chains: int
    group: int
    turns: int
    num_steps: int
    recorded: int
    tokens: int
    reference_tokens: int
    channels: int
    side: int
    text_tokens: int
    text_width: int
    pooled_width: int
    unique_texts: int
    store_bytes: int
    model_bytes: int


def rollout_tensor_bytes(s: RolloutShape) -> dict[str, int]:
    """Bytes of every tensor a ``Rollout`` holds (``mtflow.rollout.Rollout``'s fields), by field."""
    n, k = s.chains * s.group, s.turns
    latent, reference = s.tokens * s.channels, s.reference_tokens * s.channels
    return {
        "states": n * k * s.recorded * latent * s.store_bytes,
        "next_states": n * k * s.recorded * latent * s.store_bytes,
        "log_probs": n * k * s.recorded * 4,
        "final_latents": n * k * latent * 4,
        "reference_latents": n * k * reference * 4,
        "images": n * k * 3 * s.side * s.side,
        "source_images": s.chains * 3 * s.side * s.side,
        "text_index": n * k * 8,
        "text": s.unique_texts * (s.text_tokens * s.text_width + s.pooled_width) * s.model_bytes
        + s.text_tokens * 3 * s.model_bytes,
        "step_indices": s.recorded * 8,
        "sigmas": (s.num_steps + 1) * 4,
        "model_timesteps": s.num_steps * 4,
    }
