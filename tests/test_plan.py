"""``mtflow check``'s plan is right where it can be measured: at tiny size its parameter, gradient, optimiser-state
and rollout-storage bytes equal the real tensors' bytes, its activation estimate is within 25 % of the measured
peak (a CPU memory probe in a fresh process), the depth extrapolation equals a full-depth count; at real size the
per-rank base bytes equal the fake process group's shards; the judge check and the command end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from mtflow.algorithms import GRPO, NFT
from mtflow.data.records import EditChain
from mtflow.models.kontext import KontextPolicy
from mtflow.plan.architectures import build_on_meta, find_config
from mtflow.plan.editors import planner_for
from mtflow.plan.memory import extrapolate_depth, fake_peak, fake_process_group, local_bytes, shard_rows
from mtflow.plan.plan import plan_memory, sharded_parameter_bytes
from mtflow.rollout import RolloutConfig, rollout
from mtflow.training.module import FlowRLModule

pytestmark = pytest.mark.filterwarnings("ignore")


def test_shipped_configs_give_the_published_parameter_counts():
    # FLUX.1-Kontext-dev's transformer has 11.9 B parameters, the T5-XXL encoder 4.76 B (their model cards)
    counts = {}
    for kind in ("transformer", "text_encoder_2"):
        found = find_config("black-forest-labs/FLUX.1-Kontext-dev", kind)
        assert found.source in ("mtflow copy", "hub cache")
        counts[kind] = sum(p.numel() for p in build_on_meta(kind, found.values, torch.bfloat16).parameters())
    assert round(counts["transformer"] / 1e9, 1) == 11.9
    assert round(counts["text_encoder_2"] / 1e9, 2) == 4.76


def _module(policy, algorithm, ema: bool = False, **rollout) -> FlowRLModule:
    config = RolloutConfig(**{"group_size": 2, "num_steps": 2, "forward_batch_size": 4, **rollout})
    return FlowRLModule(
        policy, scorer=None, algorithm=algorithm, rollout=config, ema_decay=0.5 if ema else None
    )


def _chains(num_chains: int, num_turns: int, side: int = 32) -> list[EditChain]:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    chains = []
    for b in range(num_chains):
        pixels = torch.randint(0, 256, (side, side, 3), generator=g, dtype=torch.uint8).numpy()
        # distinct instructions: the plan counts B x K of them
        chains.append(
            EditChain(f"c{b}", Image.fromarray(pixels), [f"make it red {b} {k}" for k in range(num_turns)])
        )
    return chains


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("name", ["grpo", "nft"])
def test_plan_bytes_equal_the_measured_tensor_bytes_at_tiny_size(tiny_kontext_path, name):
    algorithm, ema = (GRPO(), False) if name == "grpo" else (NFT(train_timesteps=2), True)
    kwargs = {"dtype": "float32", "resolution": 32, "max_sequence_length": 32, "lora_rank": 4}
    plan = plan_memory(
        _module(KontextPolicy(str(tiny_kontext_path), **kwargs), algorithm, ema, store_dtype="bfloat16"),
        2,
        2,
        1,
    )
    items = {i.name: i.bytes for i in plan.items}

    module = _module(KontextPolicy(str(tiny_kontext_path), **kwargs), algorithm, ema, store_dtype="bfloat16")
    module.configure_model()
    policy = module.policy
    named = list(policy.transformer.named_parameters())
    assert items["base (sharded)"] == _bytes(p for n, p in named if "lora_" not in n) + _bytes(
        policy.transformer.buffers()
    )
    assert items["LoRA adapters (sharded)"] == _bytes(p for n, p in named if "lora_" in n)
    assert items["VAE"] == _bytes([*policy.vae.parameters(), *policy.vae.buffers()])
    encoders = [policy.text_encoder, policy.text_encoder_2]
    assert items["text encoders (CLIP-L + T5-XXL)"] == sum(
        _bytes([*m.parameters(), *m.buffers()]) for m in encoders
    )

    result = rollout(
        policy,
        _chains(2, 2),
        module.rollout_config,
        generator=torch.Generator().manual_seed(0),
        sde=algorithm.sde(),
    )
    stored = [v for v in vars(result).values() if isinstance(v, torch.Tensor)]
    stored += [result.text.prompt_embeds, result.text.pooled_embeds, result.text.text_ids]
    assert items["stored rollout"] == _bytes(stored)

    trained = policy.adapter_parameters("default")
    optimizer = torch.optim.AdamW(trained, lr=1e-3)
    policy.velocity(
        result.final_latents[:, 0],
        torch.tensor(0.5),
        result.reference_latents[:, 0],
        result.text,
        result.text_index[:, 0],
    ).square().mean().backward()
    assert items["gradients (sharded)"] == _bytes(p.grad for p in trained)
    optimizer.step()
    assert items["AdamW state (sharded)"] == _bytes(t for s in optimizer.state.values() for t in s.values())
    if name == "nft":
        module.iteration = 0
        samples = algorithm.prepare(module, result)
        tensors = [
            samples.trajectory,
            samples.turn,
            samples.sigma,
            samples.x_t,
            samples.x0,
            samples.v_old,
            samples.v_ref,
        ]
        assert items["prepared update samples"] == _bytes(tensors)


def test_depth_extrapolation_equals_a_full_depth_count(tiny_kontext_path):
    from torch._subclasses.fake_tensor import FakeTensorMode

    policy = KontextPolicy(
        str(tiny_kontext_path),
        dtype="float32",
        resolution=32,
        max_sequence_length=32,
        lora_rank=4,
        gradient_checkpointing=True,
    )
    planner = planner_for(policy)

    def measure(double: int, single: int) -> int:
        small = planner.meta_policy(["default"], double, single)
        with FakeTensorMode(allow_non_fake_inputs=True):
            small.transformer.to_empty(device="cpu")
            return fake_peak(planner.velocity_pass(small, 4, train=True), [small.transformer])

    assert extrapolate_depth(measure, 3, 4) == measure(3, 4)
    assert measure(3, 4) > measure(1, 1)  # deeper models hold more: the comparison above is not vacuous


MEASURE = textwrap.dedent(
    """
    import ctypes, gc, json, sys, torch, warnings
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    from mtflow.models.base import TextEmbeddings
    from mtflow.models.kontext import KontextPolicy
    path, checkpointing = sys.argv[1], sys.argv[2] == "1"
    policy = KontextPolicy(path, dtype="float32", resolution=64, max_sequence_length=32, lora_rank=8,
                           gradient_checkpointing=checkpointing).load()
    g = torch.Generator().manual_seed(0)
    L, C = policy.image_seq_len, policy.transformer.config.in_channels
    x, ref = torch.randn(8, L, C, generator=g), torch.randn(8, L, C, generator=g)
    width = policy.transformer.config.joint_attention_dim
    text = TextEmbeddings(["a"], torch.randn(1, 32, width), torch.randn(1, policy.transformer.config.pooled_projection_dim),
                          torch.zeros(32, 3))
    index = torch.zeros(8, dtype=torch.long)
    policy.transformer.train()
    def step():
        policy.velocity(x, torch.tensor(0.5), ref, text, index).sum().backward()
    step()  # first call allocates lazily created state (rope tables, thread pools)
    for p in policy.transformer.parameters():
        p.grad = None
    gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
    def status(field):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS
    before = status("VmRSS")
    step()
    print(json.dumps({"peak": status("VmHWM") - before}))
    """
)


@pytest.fixture(scope="module")
def small_kontext_path(tmp_path_factory):
    """A Kontext pipeline large enough that activations (hundreds of MiB) dwarf allocator noise."""
    from mtflow.testing.tiny_kontext import TinyKontextSpec, build_tiny_kontext

    spec = TinyKontextSpec(
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=64,
        num_attention_heads=4,
        axes_dims_rope=(8, 28, 28),
        text_width=64,
    )
    return build_tiny_kontext(tmp_path_factory.mktemp("models") / "small-kontext", spec, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_within_25_percent_of_the_measured_peak(small_kontext_path, checkpointing):
    # glibc serves allocations >= 64 KiB with mmap and returns them on free, so the resident-set high-water mark
    # follows the live tensors (the default dynamic threshold keeps freed blocks resident)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(small_kontext_path), "1" if checkpointing else "0"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["peak"]
    policy = KontextPolicy(
        str(small_kontext_path),
        dtype="float32",
        resolution=64,
        max_sequence_length=32,
        lora_rank=8,
        gradient_checkpointing=checkpointing,
    )
    module = _module(policy, GRPO(), forward_batch_size=8)
    plan = plan_memory(module, 1, 2, 1)
    key = "train, gradient checkpointing" if checkpointing else "train, no gradient checkpointing"
    estimate = plan.activations[key]
    assert measured > 50 * 2**20  # well above allocator noise
    assert abs(estimate - measured) <= 0.25 * measured, (estimate, measured)


@pytest.mark.slow
def test_real_size_per_rank_base_bytes_equal_the_fake_process_group_shards():
    policy = KontextPolicy("black-forest-labs/FLUX.1-Kontext-dev", lora_rank=32)
    planner = planner_for(policy)
    with fake_process_group(8, rank=0):
        planned = sharded_parameter_bytes(planner.meta_policy(["default", "old"]), 8)
    for rank in (0, 7):  # the first and the last shard (FSDP2 pads the tail)
        with fake_process_group(8, rank=rank):
            sharded = planner.meta_policy(["default", "old"])
            from torch.distributed.device_mesh import init_device_mesh

            from mtflow.training.distributed import shard_policy

            shard_policy(sharded, init_device_mesh("cpu", (8,)))
            local = sum(
                p.to_local().numel() * p.element_size()
                for n, p in sharded.transformer.named_parameters()
                if "lora_" not in n
            )
        assert planned["base"][rank] == local
    assert sum(planned["base"]) == sum(
        p.numel() * p.element_size() for n, p in planner.meta_policy([]).transformer.named_parameters()
    )
    # torch.chunk's split: uneven at the tail, empty shards for the last ranks
    assert shard_rows(5, 2) == [3, 2] and shard_rows(2, 4) == [1, 1, 0, 0]
    assert local_bytes(torch.empty(3, 2, device="meta"), 2) == [24, 24]  # not sharded: every rank holds it


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_judge_check_reports_unreachable_in_one_line_and_scores_a_probe_when_up():
    from mtflow.plan.check import check_judge
    from mtflow.reward.client import RemoteScorer
    from mtflow.reward.server import BackgroundServer, create_app
    from mtflow.testing.scorers import BrightnessScorer

    down = check_judge(RemoteScorer(f"http://127.0.0.1:{_closed_port()}", deadline_s=2, max_retries=0), 2)
    assert [c.status for c in down] == ["FAIL"]
    assert "unreachable (model.scorer.init_args.url)" in down[0].detail and "\n" not in down[0].detail
    with BackgroundServer(create_app(BrightnessScorer(), token="t")) as server:
        up = check_judge(RemoteScorer(server.url, token="t"), 2)
    assert [c.status for c in up] == ["ok", "ok"]  # /health, probe (this backend is no vLLM: no model list)
    assert up[1].name == "judge probe item" and up[1].detail.startswith("IF [")


def test_dry_run_prints_the_toy_plan_and_a_bad_key_is_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtflow",
            "fit",
            "--config",
            "configs/toy.yaml",
            "--dry_run",
            "--gpu_memory_gb",
            str(10 / 1024),  # 10 MiB
            "--headroom_gb",
            "0",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    # every check passes (the toy judge scores the probe chain); 10 MiB cannot hold the plan: exit 2
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    plan = json.loads(out.read_text())
    assert plan["world_size"] == 1 and all(c["status"] in ("ok", "note") for c in plan["checks"])
    assert "| **peak** |" in proc.stdout
    peaks = plan["memory"]["peaks"]
    peak_phase = max(peaks, key=peaks.get)
    largest = max((i for i in plan["memory"]["items"] if peak_phase in i["phases"]), key=lambda i: i["bytes"])
    assert (
        plan["memory"]["peak"]
        == peaks[peak_phase]
        == sum(i["bytes"] for i in plan["memory"]["items"] if peak_phase in i["phases"])
    )
    assert f"largest item: {largest['name']}" in proc.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtflow",
            "check",
            "--config",
            "configs/toy.yaml",
            "--model.rollout.group_sise=4",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stdout + bad.stderr
    assert "group_sise" in bad.stdout and len(bad.stdout.strip().splitlines()) == 1
