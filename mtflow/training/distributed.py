"""FSDP2 for the policy transformer, and a Lightning strategy whose checkpoints hold only the LoRA adapters.

Lightning's ``FSDPStrategy`` (FSDP1) refuses CPUs; ``ModelParallelStrategy`` (FSDP2, ``fully_shard``) runs on CPU
with gloo and on GPUs with NCCL, so the same code path is tested here and used on clusters.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy

from mtflow.models.base import EditPolicy


def shard_policy(policy: EditPolicy, device_mesh) -> None:
    """``fully_shard`` each of the policy's ``fsdp_units()`` in order (innermost first: blocks, then their root),
    FSDP2 over the data-parallel mesh.

    A frozen bf16 base and fp32 LoRA share each unit; the unit's mixed-precision policy computes in the base dtype
    and reduces gradients in float32. What the policy does not list (text encoders, VAE) stays replicated.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = (
        device_mesh["data_parallel"] if "data_parallel" in (device_mesh.mesh_dim_names or ()) else device_mesh
    )
    kwargs: dict[str, Any] = {"mesh": mesh}
    if policy.model_dtype != torch.float32:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=policy.model_dtype, reduce_dtype=torch.float32)
    for unit in policy.fsdp_units():
        fully_shard(unit, **kwargs)


class LoRAModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` that saves and restores only the LoRA adapters (trained, old, EMA) and the
    optimiser state, gathered into one small file on rank 0; the frozen base (12 B parameters for Kontext-dev) is
    never gathered or written."""

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: Literal["auto"] | int = 1,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        """
        Args:
            data_parallel_size: ranks that shard the transformer (FSDP2); "auto": all devices.
            tensor_parallel_size: tensor-parallel ranks (1: pure FSDP; the policy does not use TP).
            process_group_backend: "nccl" on GPUs, "gloo" on CPUs (None: Lightning picks).
            timeout: collective timeout.
        """
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=False,  # one small file: adapters + optimiser state, no base
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def lightning_module_state_dict(self) -> dict[str, Any]:
        module = self.lightning_module
        assert module is not None
        state = {}
        for name, param in module.named_parameters():
            if "lora_" in name:
                # full_tensor() is a collective: every rank takes part, rank 0 keeps the result
                full = param.full_tensor() if hasattr(param, "full_tensor") else param.detach()
                state[name] = full.detach().cpu()
        return state if self.global_rank == 0 else {}
