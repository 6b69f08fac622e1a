"""FSDP2 for the policy transformer, and a Lightning strategy whose checkpoints hold only the LoRA adapters.

Lightning's ``FSDPStrategy`` (FSDP1) refuses CPUs; ``ModelParallelStrategy`` (FSDP2, ``fully_shard``) runs on CPU
with gloo and on GPUs with NCCL, so the same code path is tested here and used on clusters.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy

from mtflow.checkpoints import CheckpointError, read_checkpoint
from mtflow.models.base import EditPolicy

REPLICATE, SHARD = "replicate", "shard"


def shard_policy(policy: EditPolicy, device_mesh) -> None:
    """``fully_shard`` each of the policy's ``fsdp_units()`` in order (innermost first: blocks, then their root),
    FSDP2 over the data-parallel mesh: 1-D (every rank holds a shard), or 2-D (``replicate`` x ``shard``: HSDP, each
    replica group holds one sharded copy and gradients are all-reduced across replicas).

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
    never gathered or written. Optionally HSDP: a 2-D mesh that shards within a group of ranks (a node) and
    replicates across groups, so a rollout's forward gathers weights over the fast intra-node links only."""

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: Literal["auto"] | int = 1,
        replicate_size: Literal["num_nodes"] | int | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        """
        Args:
            data_parallel_size: ranks that shard the transformer (FSDP2); "auto": every rank (world size divided by
                the tensor-parallel size), derived from ``trainer.devices`` x ``trainer.num_nodes``.
            tensor_parallel_size: tensor-parallel ranks (1: pure FSDP; the policy does not use TP).
            replicate_size: HSDP: the data-parallel ranks form a (replicate_size x shard) mesh; "num_nodes": one
                replica per node (shard within a node, replicate across nodes). None: a 1-D mesh (plain FSDP).
            process_group_backend: "nccl" on GPUs, "gloo" on CPUs (None: Lightning picks).
            timeout: collective timeout.
        """
        if replicate_size is not None and replicate_size != "num_nodes":
            if not isinstance(replicate_size, int) or replicate_size < 1:
                raise ValueError(f"replicate_size must be >= 1, 'num_nodes' or None, got {replicate_size!r}")
        if replicate_size is not None and tensor_parallel_size not in (1, "auto"):
            raise ValueError(
                "replicate_size (HSDP) needs tensor_parallel_size=1: the policy has no tensor parallelism"
            )
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=False,  # one small file: adapters + optimiser state, no base
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.replicate_size = replicate_size

    def validate_layout(self) -> None:
        """Check ``trainer.devices`` / ``num_nodes`` against the processes Slurm or torchrun started (their own
        ``validate_settings``). Lightning runs this check only in the launcher it starts processes with, and
        ``ModelParallelStrategy`` has none when they are started outside (srun, torchrun): a job with the wrong
        ``--ntasks-per-node`` would hang in the rendezvous instead of saying so."""
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)

    def setup_environment(self) -> None:
        self.validate_layout()
        # Lightning's "auto" means one data-parallel rank per node (and tensor parallelism inside it); this policy
        # has no tensor parallelism, so "auto" is every rank: the layout follows trainer.devices x num_nodes.
        if self._tensor_parallel_size == "auto":
            self._tensor_parallel_size = 1
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_processes * self.num_nodes // self._tensor_parallel_size
        super().setup_environment()
        if self.replicate_size is not None:
            assert self.lightning_module is not None
            self.lightning_module._device_mesh = self._hsdp_mesh()

    def _hsdp_mesh(self):
        from torch.distributed.device_mesh import init_device_mesh

        replicas = self.num_nodes if self.replicate_size == "num_nodes" else int(self.replicate_size)
        world = self.world_size
        if world % replicas:
            raise ValueError(
                f"replicate_size {self.replicate_size!r} = {replicas} replicas does not divide the {world} ranks "
                f"({self.num_nodes} node(s) x {self.num_processes} device(s))"
            )
        return init_device_mesh(
            self.root_device.type, (replicas, world // replicas), mesh_dim_names=(REPLICATE, SHARD)
        )

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = self.broadcast(checkpoint_path)
        if weights_only is False:
            raise CheckpointError(
                f"{path}: weights_only=False is refused: mtflow reads checkpoints as data only (nothing unpickled)"
            )
        if not Path(path).is_dir():  # a distributed (folder) checkpoint is not mtflow's; Lightning reports it
            read_checkpoint(path)  # one clear line for a missing, truncated, corrupt or foreign file
        return super().load_checkpoint(path, weights_only=True)

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
