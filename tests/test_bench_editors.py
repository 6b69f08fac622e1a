"""The editors' benchmark support (``tools/benchkit/editors.py``): the call model of one iteration (guidance doubles
every transformer call, Qwen-Image-Edit encodes text per turn with the turn's images) against real iterations of
the tiny editors, and the real-size FLOP count against a hand count."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from benchkit.editors import (
    EditorProfile,
    counted_transformer_flops,
    editor_passes,
    editor_projection,
    load_editor,
    paper_editor_setting,
)
from benchkit.harness import bench_chains, run_iterations
from benchkit.passes import IterationShape, PassCount, expected_calls
from benchkit.projection import Hardware

from mtflow.algorithms import GRPO, NFT
from mtflow.rollout import RolloutConfig
from mtflow.testing.fixtures import torch_threads


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


def test_editor_passes_hand_counted():
    shape = IterationShape(1, 3, 2, 2, "grpo", forward_batch_size=2)  # N = 3 in batches of 2 and 1
    qwen = {(p.name, p.batch_size): p.calls for p in editor_passes(shape, EditorProfile("q", True, True))}
    # text: turn 1 one row per chain, turn 2 one per trajectory; instructions and negatives in separate calls
    assert qwen[("text_encode", 1)] == 2 and qwen[("text_encode", 3)] == 2
    # rollout: K * T = 4 velocities per batch, two transformer calls each; training as many
    assert qwen[("rollout_forward", 2)] == qwen[("rollout_forward", 1)] == 8
    assert qwen[("train_forward_backward", 2)] == 8 and qwen[("vae_decode", 2)] == 2
    flux2 = {(p.name, p.batch_size): p.calls for p in editor_passes(shape, EditorProfile("f", True, False))}
    assert (
        flux2[("text_encode", 1 * 2 + 1)] == 1
    )  # B * K distinct instructions and the empty negative, one call
    kontext = editor_passes(shape, EditorProfile("k", False, False))
    assert PassCount("text_encode", 2, 1) in kontext and PassCount("rollout_forward", 2, 4) in kontext


@pytest.mark.parametrize("editor", ["qwen_image_edit", "flux2_klein"])
@pytest.mark.parametrize("loss", ["grpo", "nft"])
def test_a_real_iteration_of_each_editor_makes_exactly_the_predicted_calls(request, editor, loss):
    path = request.getfixturevalue(f"tiny_{editor}_path")
    policy = load_editor(editor, path, resolution=64)
    algorithm = NFT(train_timesteps=2) if loss == "nft" else GRPO()
    module = {
        "algorithm": algorithm,
        "rollout": RolloutConfig(group_size=3, num_steps=2, forward_batch_size=2),
    }
    run = run_iterations(policy, bench_chains(2, 2, size=64), 1, module, iterations=1, warmup=1, count=True)
    shape = IterationShape.of(algorithm, module["rollout"], 1, 2)
    profile = EditorProfile.of(policy)
    assert profile.guided
    assert run.calls == expected_calls(editor_passes(shape, profile), algorithm.sampling_adapter)


def test_counted_transformer_flops_match_a_hand_count():
    """Qwen-Image's transformer (width 3072, MLP 4x, both streams in every block) at 2 blocks: per block and token
    of either stream 12 h^2 multiply-adds (q, k, v, out, MLP), per sample 2 x 6 h^2 (modulation), attention
    2 S^2 h, LoRA r (h + h) on 4 projections per stream; plus the input and output projections."""
    setting = paper_editor_setting()
    forward, both = counted_transformer_flops("qwen_image_edit", setting, num_layers=2)
    h, r, blocks = 3072, setting.paper.lora_rank, 2
    image, text = 2 * setting.paper.target_tokens, setting.qwen_text_tokens
    tokens = image + text
    macs = blocks * (tokens * 12 * h * h + 2 * 6 * h * h + 2 * tokens * tokens * h + tokens * 4 * r * 2 * h)
    macs += image * 64 * h + text * 3584 * h + image * h * 64
    assert forward == pytest.approx(2 * macs, rel=1e-3)
    # backward: input gradients of the block products (not of the frozen embedders), LoRA weight gradients
    assert 1.8 * forward < both < 3.2 * forward


def test_the_projection_counts_the_guidance_pass():
    setting, hardware = paper_editor_setting(), Hardware()
    flops = (10e12, 25e12)
    vae = (1e12, 2e12)
    for editor in ("qwen_image_edit", "flux2_klein"):
        guided = editor_projection(editor, "grpo", setting, hardware, flops, vae, guided=True)
        plain = editor_projection(editor, "grpo", setting, hardware, flops, vae, guided=False)
        n, k, t = setting.paper.trajectories_per_gpu, setting.paper.num_turns, setting.paper.num_steps
        assert (
            plain.flops["rollout"] == n * k * t * flops[0]
            and guided.flops["rollout"] == 2 * plain.flops["rollout"]
        )
        assert guided.flops["train"] == 2 * plain.flops["train"] == 2 * n * k * t * flops[1]
    qwen = editor_projection("qwen_image_edit", "grpo", setting, hardware, flops, vae, guided=True)
    rows = setting.paper.chains_per_gpu + setting.paper.trajectories_per_gpu * (setting.paper.num_turns - 1)
    assert qwen.flops["text"] == pytest.approx(
        rows * 2 * editor_projection.__globals__["qwen25vl_row_flops"](setting)
    )
