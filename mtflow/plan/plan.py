"""The per-GPU memory plan and the per-iteration time plan of a configured run (``mtflow check``)."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from mtflow.plan.architectures import parameter_bytes
from mtflow.plan.editors import planner_for
from mtflow.plan.flops import Hardware, PaperSetting, Qwen3VLArch, project_iteration, qwen3vl_image_tokens
from mtflow.plan.memory import (
    DTYPE_BYTES,
    RolloutShape,
    extrapolate_depth,
    fake_peak,
    fake_process_group,
    local_bytes,
    rollout_tensor_bytes,
)

GiB = 2**30


@dataclass
class MemoryItem:
    """One line of the memory plan: ``bytes`` on the busiest rank, in the phases it is resident."""

    name: str
    bytes: int
    phases: tuple[str, ...]
    note: str = ""


@dataclass
class MemoryPlan:
    """Per-GPU bytes of one rank (the one holding the most), by item and by phase.

    Attributes:
        world_size: ranks the base is sharded over.
        items: every resident or transient item.
        peaks: peak bytes per phase (``rollout``, ``update``, and ``encode`` when the text encoders are offloaded).
        unsharded_rollout: whether the rollout keeps the base unsharded (the option, or "auto" resolved).
        per_rank_base: sharded base + adapter bytes of every rank (FSDP2's shards are uneven at the tail).
        activations: the activation estimates by case (train with / without gradient checkpointing, no-grad
            rollout forward, VAE).
    """

    world_size: int
    items: list[MemoryItem]
    peaks: dict[str, int]
    unsharded_rollout: bool
    per_rank_base: list[int]
    activations: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return max(self.peaks.values())

    @property
    def peak_phase(self) -> str:
        return max(self.peaks, key=self.peaks.get)

    def largest_items(self, phase: str | None = None) -> list[MemoryItem]:
        phase = phase or self.peak_phase
        return sorted((i for i in self.items if phase in i.phases), key=lambda i: -i.bytes)


def _unit_bytes(policy, compute_bytes: int | None) -> list[tuple[str, int]]:
    """(unit name, bytes of its own parameters when unsharded, in the compute dtype) per FSDP2 unit."""
    units = policy.fsdp_units()
    nested: set[int] = set()
    out = []
    for unit in units:  # innermost first: each unit's own parameters exclude the units already listed
        own = [p for p in unit.parameters() if id(p) not in nested]
        nested.update(id(p) for p in own)
        size = sum(p.numel() * (compute_bytes or p.element_size()) for p in own)
        out.append((type(unit).__name__, size))
    return out


def sharded_parameter_bytes(policy, world_size: int) -> dict:
    """Shard ``policy`` with mtflow's FSDP2 plan over the current (fake) process group and return each rank's bytes:
    ``base`` and ``lora`` parameters, the ``trained`` adapter's, the number of trained tensors and the (replicated)
    ``buffers``. Rank 0's shard sizes are checked against the DTensors FSDP2 created."""
    from torch.distributed.device_mesh import init_device_mesh

    from mtflow.models.base import TRAINED_ADAPTER
    from mtflow.training.distributed import shard_policy

    shard_policy(policy, init_device_mesh("cpu", (world_size,)))
    out = {
        "base": [0] * world_size,
        "lora": [0] * world_size,
        "trained": [0] * world_size,
        "trained_tensors": 0,
    }
    rank = torch.distributed.get_rank()
    for name, param in policy.transformer.named_parameters():
        shares = local_bytes(param, world_size)
        if hasattr(param, "to_local") and param.to_local().numel() * param.element_size() != shares[rank]:
            raise AssertionError(f"{name}: FSDP2's shard differs from torch.chunk's")
        kind = "lora" if "lora_" in name else "base"
        out[kind] = [a + b for a, b in zip(out[kind], shares)]
        if "lora_" in name and f".{TRAINED_ADAPTER}." in name:
            out["trained_tensors"] += 1
            out["trained"] = [a + b for a, b in zip(out["trained"], shares)]
    out["buffers"] = sum(b.numel() * b.element_size() for b in policy.transformer.buffers())
    return out


def plan_memory(
    module,
    chains_per_rank: int,
    num_turns: int,
    world_size: int,
    budget_bytes: int | None = None,
    unsharded_rollout: Literal["auto", "on", "off"] = "auto",
    text_encoders: Literal["resident", "offload"] = "resident",
) -> MemoryPlan:
    """The memory plan of ``module`` (a constructed, unloaded ``FlowRLModule``) on ``world_size`` ranks."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    policy, rollout = module.policy, module.rollout_config
    planner = planner_for(policy)
    adapters = module.adapters
    model_bytes = DTYPE_BYTES[policy.dtype_name]
    compute_bytes = model_bytes if policy.model_dtype != torch.float32 else None

    full = planner.meta_policy(adapters)
    units = _unit_bytes(full, compute_bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fake_process_group(world_size):
            shares = sharded_parameter_bytes(full, world_size)
    base, lora, trained, trained_tensors, buffers = (
        shares["base"],
        shares["lora"],
        shares["trained"],
        shares["trained_tensors"],
        shares["buffers"],
    )
    per_rank = [base[r] + lora[r] + buffers for r in range(world_size)]
    rank = max(range(world_size), key=lambda r: per_rank[r])

    vae = planner.component("vae")
    encoders = planner.component("text_encoder"), planner.component("text_encoder_2")
    vae_bytes = parameter_bytes(vae)
    encoder_bytes = sum(parameter_bytes(m) for m in encoders)

    # --------------------------------------------------------------- activations on fake tensors
    fbs = rollout.forward_batch_size

    cases = {  # name: (train, gradient checkpointing)
        "train, gradient checkpointing": (True, True),
        "train, no gradient checkpointing": (True, False),
        "rollout forward (no grad)": (False, False),
    }

    def measure(double: int, single: int) -> dict[str, int]:
        small = planner.meta_policy(adapters, double, single)
        peaks = {}
        with FakeTensorMode(allow_non_fake_inputs=True):
            small.transformer.to_empty(device="cpu")
            for name, (train, checkpointing) in cases.items():
                if checkpointing:
                    small.transformer.enable_gradient_checkpointing()
                else:
                    small.transformer.disable_gradient_checkpointing()
                peaks[name] = fake_peak(planner.velocity_pass(small, fbs, train), [small.transformer])
                for param in small.transformer.parameters():
                    param.grad = None
        return peaks

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        depths = {d: measure(*d) for d in ((1, 1), (2, 1), (1, 2))}
        activations = {
            name: extrapolate_depth(
                lambda d, s, n=name: depths[(d, s)][n], planner.double_blocks, planner.single_blocks
            )
            for name in cases
        }
        with FakeTensorMode(allow_non_fake_inputs=True):
            vae.to_empty(device="cpu")
            activations["VAE decode"] = fake_peak(planner.vae_pass(vae, fbs, decode=True), [vae])
            activations["VAE encode"] = fake_peak(planner.vae_pass(vae, fbs, decode=False), [vae])
    train_key = (
        "train, gradient checkpointing"
        if policy.gradient_checkpointing
        else "train, no gradient checkpointing"
    )

    # --------------------------------------------------------------- rollout storage and prepared samples
    sde = module.algorithm.sde()
    recorded = 0 if sde is None else (rollout.num_steps if sde.stochastic == "all" else sde.window_size)
    shape = RolloutShape(
        chains=chains_per_rank,
        group=rollout.group_size,
        turns=num_turns,
        num_steps=rollout.num_steps,
        recorded=recorded,
        tokens=planner.tokens,
        reference_tokens=planner.tokens,
        channels=planner.channels,
        side=policy.resolution,
        text_tokens=policy.max_sequence_length,
        text_width=planner.text_width,
        pooled_width=planner.pooled_width,
        unique_texts=chains_per_rank * num_turns,
        store_bytes=DTYPE_BYTES[rollout.store_dtype],
        model_bytes=model_bytes,
    )
    storage = sum(rollout_tensor_bytes(shape).values())
    trajectories = chains_per_rank * rollout.group_size
    latent = planner.tokens * planner.channels * 4
    algorithm = module.algorithm
    prepared, prepared_note = 0, "none"
    draws = getattr(algorithm, "train_timesteps", None)
    if draws is not None:  # NFT: x_t, x0, v_old (+ v_ref) per noised copy, and its indices
        samples = trajectories * num_turns * min(int(draws), rollout.num_steps)
        copies = 4 if getattr(algorithm, "beta_ref", 0) > 0 else 3
        prepared, prepared_note = samples * (copies * latent + 8 + 8 + 4), f"{samples} NFT samples"
    elif getattr(algorithm, "beta_kl", 0) > 0:  # GRPO's reference means for the KL term
        prepared = trajectories * num_turns * recorded * latent
        prepared_note = "GRPO reference means"

    # --------------------------------------------------------------- units gathered during forward passes
    blocks = [size for name, size in units[:-1]]
    root = units[-1][1]
    gathered = root + 2 * max(blocks, default=0)  # the root stays unsharded; the next block is prefetched
    whole = sum(size for _, size in units)
    adam = 2 * trained[rank] + 4 * trained_tensors  # exp_avg, exp_avg_sq (fp32 shards) and a step scalar each

    def assemble(unsharded: bool) -> tuple[list[MemoryItem], dict[str, int]]:
        text_phases = ("rollout", "update", "encode") if text_encoders == "resident" else ("encode",)
        items = [
            MemoryItem(
                "base (sharded)",
                base[rank] + buffers,
                ("rollout", "update", "encode"),
                f"{policy.dtype_name}, 1/{world_size} of {sum(base) / GiB:.2f} GiB",
            ),
            MemoryItem(
                "LoRA adapters (sharded)",
                lora[rank],
                ("rollout", "update", "encode"),
                f"float32, {len(adapters)} adapter(s): {', '.join(adapters)}",
            ),
            MemoryItem(
                "AdamW state (sharded)", adam, ("rollout", "update", "encode"), "exp_avg + exp_avg_sq"
            ),
            MemoryItem("gradients (sharded)", trained[rank], ("update",), "trained adapter, float32"),
            MemoryItem("VAE", vae_bytes, ("rollout", "update", "encode"), "replicated"),
            MemoryItem(
                "text encoders (CLIP-L + T5-XXL)",
                encoder_bytes,
                text_phases,
                "resident" if text_encoders == "resident" else "offloaded: on the GPU only while encoding",
            ),
            MemoryItem(
                "unsharded base during rollout",
                whole if unsharded else gathered,
                ("rollout",),
                "whole base, gathered once" if unsharded else "root + 2 largest blocks (prefetch)",
            ),
            MemoryItem(
                "unsharded units during update", gathered, ("update",), "root + 2 largest blocks (prefetch)"
            ),
            MemoryItem(
                "stored rollout",
                storage,
                ("rollout", "update"),
                f"{trajectories} trajectories x {num_turns} turns, {recorded} recorded steps at {rollout.store_dtype}",
            ),
            MemoryItem("prepared update samples", prepared, ("update",), prepared_note),
            MemoryItem(
                f"activations ({train_key})", activations[train_key], ("update",), f"forward_batch_size {fbs}"
            ),
            MemoryItem(
                "activations (rollout: transformer / VAE)",
                max(
                    activations["rollout forward (no grad)"],
                    activations["VAE decode"],
                    activations["VAE encode"],
                ),
                ("rollout",),
                f"forward_batch_size {fbs}, no grad",
            ),
        ]
        phases = ("rollout", "update") + (("encode",) if text_encoders == "offload" else ())
        peaks = {ph: sum(i.bytes for i in items if ph in i.phases) for ph in phases}
        return items, peaks

    if unsharded_rollout == "auto":
        _, peaks_on = assemble(True)
        unsharded = world_size > 1 and (budget_bytes is None or max(peaks_on.values()) <= budget_bytes)
    else:
        unsharded = unsharded_rollout == "on"
    items, peaks = assemble(unsharded)
    return MemoryPlan(world_size, items, peaks, unsharded, per_rank, activations)


@dataclass
class TimePlan:
    """FLOPs and seconds of one iteration per GPU, and the judge's load per iteration (all ranks)."""

    flops: dict[str, float]
    seconds: dict[str, float]
    judge_requests: int
    judge_prefill_tokens: int
    judge_output_tokens: int
    hardware: dict[str, Any]

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


def plan_time(
    module,
    chains_per_rank: int,
    num_turns: int,
    world_size: int,
    peak_tflops: float = 989.0,
    utilization: float = 0.4,
    judge_text_tokens: int = 600,
    judge_output_tokens: int = 256,
) -> TimePlan:
    """Per-iteration FLOPs of every pass (``mtflow.plan.flops``) at ``utilization`` of ``peak_tflops``."""
    from torch.utils.flop_counter import FlopCounterMode

    policy, rollout, algorithm = module.policy, module.rollout_config, module.algorithm
    planner = planner_for(policy)
    side = policy.resolution
    vae = planner.component("vae")
    with warnings.catch_warnings(), torch.device("meta"), torch.no_grad():
        warnings.simplefilter("ignore")
        counter = FlopCounterMode(display=False)
        with counter:
            latents = vae.encode(torch.empty(1, 3, side, side, dtype=vae.dtype)).latent_dist.mode()
        encode = counter.get_total_flops()
        counter = FlopCounterMode(display=False)
        with counter:
            vae.decode(latents)
        decode = counter.get_total_flops()
    sde = algorithm.sde()
    draws = getattr(algorithm, "train_timesteps", None)
    if draws is not None:
        loss = "nft"
    else:
        loss = "grpo_window" if sde is not None and sde.stochastic == "window" else "grpo"
    setting = PaperSetting(
        chains_per_gpu=chains_per_rank,
        group_size=rollout.group_size,
        num_turns=num_turns,
        num_steps=rollout.num_steps,
        window=sde.window_size if sde is not None else 0,
        nft_draws=int(draws or 1),
        nft_reference=getattr(algorithm, "beta_ref", 0) > 0,
        target_tokens=planner.tokens,
        reference_tokens=planner.tokens,
        text_tokens=policy.max_sequence_length,
        lora_rank=policy.lora_rank,
        gradient_checkpointing=policy.gradient_checkpointing,
        vae_encode_flops=float(encode),
        vae_decode_flops=float(decode),
        image_side=side,
        judge_text_tokens=judge_text_tokens,
        judge_output_tokens=judge_output_tokens,
    )
    hardware = Hardware(
        name=f"{world_size} GPUs", gpus=world_size, peak_flops=peak_tflops * 1e12, utilization=utilization
    )
    judge = Qwen3VLArch()
    projection = project_iteration(
        setting, loss, hardware, flux=planner.flux_arch(), judge=judge, t5=planner.t5_arch()
    )
    _, per_image = qwen3vl_image_tokens(judge, side - side % 32)
    requests = world_size * chains_per_rank * rollout.group_size
    return TimePlan(
        flops=projection.flops,
        seconds=projection.seconds,
        judge_requests=requests,
        judge_prefill_tokens=requests * ((num_turns + 1) * per_image + judge_text_tokens),
        judge_output_tokens=requests * judge_output_tokens,
        hardware=asdict(hardware),
    )
