"""Benchmark support (``tools/benchkit``, outside the library): line fits, peak-memory probes, call counting, the
model-pass count (against a real iteration), the anchor-style naive loop (same rollout and same gradients as mtflow's
batched loop) and the FLOP model (against hand counts and torch's FlopCounterMode on the real diffusers classes)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# the benchmark machinery lives with the tools (tools/benchkit), not in the mtflow package
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from benchkit.harness import (
    ModelSpec,
    bench_chains,
    load_policy,
    module_from_json,
    module_to_json,
    run_iterations,
)
from benchkit.naive import NaiveLoop, draw_rollout_noise, naive_log_prob, naive_rollout
from benchkit.passes import IterationShape, PassCount, chunk_sizes, expected_calls, model_passes
from benchkit.projection import (
    FluxArch,
    Hardware,
    PaperSetting,
    Qwen3VLArch,
    T5Arch,
    counted_flux_flops,
    flux_forward_flops,
    flux_train_flops,
    project_iteration,
    qwen3vl_image_tokens,
    qwen3vl_prefill_flops,
    rollout_storage_bytes,
    t5_encoder_flops,
)
from benchkit.timing import PeakProbe, count_calls, fit_line, time_calls

from mtflow.algorithms import GRPO, NFT
from mtflow.losses import GRPOConfig, grpo_loss
from mtflow.rollout import RolloutConfig, recompute_transition, rollout, transition_batches
from mtflow.sampling import SDEConfig
from mtflow.testing.fixtures import torch_threads
from mtflow.training.optim import OptimConfig


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):  # two threads on two shared cores ran ~40x slower here
        yield


# ------------------------------------------------------------------------------------------------ timing


def test_fit_line_recovers_an_exact_line_and_matches_numpy_on_noisy_data():
    exact = fit_line([1, 2, 4], [5, 7, 11])  # y = 2x + 3
    assert exact.slope == pytest.approx(2.0) and exact.intercept == pytest.approx(3.0) and exact.r2 == 1.0
    xs, ys = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 5.0]
    fit = fit_line(xs, ys)
    slope, intercept = np.polyfit(xs, ys, 1)
    assert fit.slope == pytest.approx(slope) and fit.intercept == pytest.approx(intercept)
    # by hand: mean y = 2.75, SS_tot = 8.75; fitted 1.1x + 0 ... residuals give SS_res = 2.7
    assert fit.slope == pytest.approx(1.1) and fit.r2 == pytest.approx(1 - 2.7 / 8.75)
    with pytest.raises(ValueError, match="two distinct x"):
        fit_line([2, 2], [1, 3])


def test_time_calls_runs_warmup_untimed():
    calls = []
    timing = time_calls(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(timing.times) == 3 and timing.median >= 0


def test_peak_probe_sees_a_touched_allocation_and_not_an_untouched_one():
    probe = PeakProbe()
    probe.start()
    block = np.ones(16 * 2**20 // 8)  # 16 MiB, written
    del block
    touched = probe.stop()
    probe.start()
    small = np.ones(1024)
    del small
    quiet = probe.stop()
    assert touched >= 15 * 2**20
    assert quiet < 4 * 2**20


def test_count_calls_logs_batch_sizes_and_restores_the_method():
    class Thing:
        def run(self, x, *, scale=1):
            return x * scale

    thing = Thing()
    with count_calls({"run": (thing, "run")}) as log:
        assert thing.run(torch.ones(3, 2), scale=2).sum() == 12
        thing.run(torch.ones(5))
        thing.run([1, 2])
    assert log.histogram("run") == {2: 1, 3: 1, 5: 1} and log.samples("run") == 10
    assert "run" not in vars(thing)  # the class method is back


# ------------------------------------------------------------------------------------------------ model passes


def test_chunk_sizes():
    assert chunk_sizes(16, 16) == {16: 1}
    assert chunk_sizes(10, 4) == {4: 2, 2: 1}
    assert chunk_sizes(3, 8) == {3: 1}
    assert chunk_sizes(0, 8) == {}


def test_model_passes_hand_counted():
    # GRPO: B=2, G=3 (N=6), K=2, T=3, F=4 -> per (turn, step) batches {4, 2}
    grpo = model_passes(IterationShape(2, 3, 2, 3, "grpo", forward_batch_size=4))
    assert set(grpo) == {
        PassCount("text_encode", 4, 1),  # B*K distinct instructions in one call
        PassCount("vae_encode", 2, 2),  # the B=2 sources in one call + the chained references' remainder of 2
        PassCount("rollout_forward", 4, 6),  # K*T calls of 4 ...
        PassCount("rollout_forward", 2, 6),  # ... and of 2
        PassCount("vae_decode", 4, 2),
        PassCount("vae_decode", 2, 2),
        PassCount("vae_encode", 4, 1),  # the (K-1) chained references: batches {4, 2}
        PassCount("judge", 6, 1),
        PassCount("train_forward_backward", 4, 6),
        PassCount("train_forward_backward", 2, 6),
        PassCount("optimizer_step", 0, 2),
    }
    window = model_passes(IterationShape(2, 3, 2, 3, "grpo", trained_steps=1, forward_batch_size=4))
    assert (
        PassCount("train_forward_backward", 4, 2) in window and PassCount("rollout_forward", 4, 6) in window
    )
    # NFT: M = N*K*D = 6*2*3 = 36 samples; old + reference forwards in batches of 4 (9 each); the update splits draws
    # {0, 2} and {1}: 24 rows (6 batches) and 12 rows (3 batches)
    nft = model_passes(IterationShape(2, 3, 2, 3, "nft", nft_draws=3, forward_batch_size=4))
    totals = {p.name: (p.batch_size, p.calls) for p in nft if p.name in ("old_forward", "reference_forward")}
    assert totals == {"old_forward": (4, 9), "reference_forward": (4, 9)}
    assert [p for p in nft if p.name == "train_forward_backward"] == [
        PassCount("train_forward_backward", 4, 9)
    ]
    assert PassCount("optimizer_step", 0, 2) in nft
    no_ref = model_passes(IterationShape(2, 3, 2, 3, "nft", nft_draws=3, nft_reference=False))
    assert not any(p.name == "reference_forward" for p in no_ref)


@pytest.fixture(scope="module")
def policy(tiny_kontext_path):
    torch.manual_seed(0)
    policy = load_policy(tiny_kontext_path, ModelSpec())
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a non-zero adapter, so that the adapter matters
        for name in ("default", "old"):
            for p in policy.adapter_parameters(name):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return policy


def test_iteration_shape_of_a_module_configuration():
    rollout_config = RolloutConfig(group_size=3, num_steps=4, forward_batch_size=2)
    assert IterationShape.of(GRPO(), rollout_config, 2, 3) == IterationShape(
        2, 3, 3, 4, "grpo", forward_batch_size=2
    )
    window = IterationShape.of(GRPO(stochastic="window", window_size=3, beta_kl=0.1), rollout_config, 2, 3)
    assert window.recorded_steps == 3 and window.grpo_reference
    nft = IterationShape.of(
        NFT(train_timesteps=9, beta_ref=0.0), rollout_config, 2, 3, OptimConfig(updates_per_rollout=3)
    )
    assert (nft.loss, nft.nft_draws, nft.nft_reference, nft.updates_per_rollout) == ("nft", 4, False, 3)


def test_module_arguments_survive_the_trip_to_a_worker_process():
    module = {
        "algorithm": NFT(train_timesteps=2, beta_ref=0.0),
        "rollout": RolloutConfig(group_size=3, store_dtype="bfloat16"),
        "optim": OptimConfig(lr=1e-3, betas=(0.8, 0.9)),
        "overlap_scoring": False,
    }
    back = module_from_json(json.loads(json.dumps(module_to_json(module))))
    assert type(back["algorithm"]) is NFT and back["algorithm"].config() == module["algorithm"].config()
    assert back["rollout"] == module["rollout"] and back["optim"] == module["optim"]
    assert back["overlap_scoring"] is False
    assert module_to_json({"algorithm": GRPO()})["algorithm"]["class_path"] == "mtflow.algorithms.grpo.GRPO"


@pytest.mark.parametrize("loss", ["grpo", "nft"])
def test_a_real_iteration_makes_exactly_the_predicted_calls(policy, loss):
    # odd sizes: N = 3 trajectories in batches of 2 leave a remainder everywhere
    algorithm = NFT(train_timesteps=2) if loss == "nft" else GRPO()
    module = {
        "algorithm": algorithm,
        "rollout": RolloutConfig(group_size=3, num_steps=3, forward_batch_size=2),
    }
    run = run_iterations(policy, bench_chains(2, 2), 1, module, iterations=1, warmup=1, count=True)
    shape = IterationShape(1, 3, 2, 3, loss, nft_draws=2, forward_batch_size=2)
    assert model_passes(IterationShape.of(algorithm, module["rollout"], 1, 2)) == model_passes(shape)
    assert run.calls == expected_calls(model_passes(shape), "old" if loss == "nft" else "default")
    assert len(run.walls) == 1 and run.iteration_s > 0


# ------------------------------------------------------------------------------------------------ naive loop


@pytest.mark.parametrize("mode", ["all", "window", "none"])
@pytest.mark.parametrize("per_chain", [True, False])
def test_naive_rollout_reproduces_the_batched_rollout(policy, mode, per_chain):
    chains = bench_chains(2, 2)
    config = RolloutConfig(group_size=3, num_steps=3, forward_batch_size=4)
    sde = None if mode == "none" else SDEConfig(noise_level=0.9, stochastic=mode, window_size=2)

    def gens():
        if per_chain:
            return [torch.Generator().manual_seed(50 + b) for b in range(2)]
        return torch.Generator().manual_seed(50)

    batched = rollout(policy, chains, config, generator=gens(), sde=sde)
    naive = naive_rollout(policy, chains, config, generator=gens(), sde=sde)
    assert naive.step_indices.tolist() == batched.step_indices.tolist()
    assert torch.equal(naive.source_images, batched.source_images)
    assert (naive.images.int() - batched.images.int()).abs().max() <= 1
    assert (naive.images != batched.images).float().mean() < 1e-3
    torch.testing.assert_close(naive.final_latents, batched.final_latents, atol=1e-4, rtol=0)
    torch.testing.assert_close(naive.log_probs, batched.log_probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(naive.states.float(), batched.states.float(), atol=1e-4, rtol=0)
    if mode == "all":  # recorded transitions are genuinely stochastic, so the agreement is not trivial
        assert naive.log_probs.std() > 0


def test_rollout_noise_is_mtflows_draw_order(policy):
    config = RolloutConfig(group_size=2, num_steps=3)
    noise = draw_rollout_noise(
        policy, 2, 2, config, [0, 1, 2], [torch.Generator().manual_seed(b) for b in range(2)]
    )
    # chain 1's generator alone: turn 0 initial, its 3 step draws, then turn 1 initial
    gen = torch.Generator().manual_seed(1)
    first = policy.initial_noise(2, gen)
    steps = [torch.randn(first.shape, generator=gen) for _ in range(3)]
    second = policy.initial_noise(2, gen)
    assert torch.equal(noise.initial[2:4, 0], first) and torch.equal(noise.initial[2:4, 1], second)
    assert torch.equal(noise.steps[2:4, 0, 2], steps[2])
    assert noise.steps.shape == (4, 2, 3, *first.shape[1:])


def test_naive_per_sample_grpo_update_has_the_batched_gradient(policy):
    chains = bench_chains(1, 2)
    config = RolloutConfig(group_size=3, num_steps=2, forward_batch_size=4)
    result = rollout(policy, chains, config, generator=torch.Generator().manual_seed(3), sde=SDEConfig())
    advantages = torch.tensor([[1.0, 1.0], [-0.5, -0.5], [0.0, 0.0]])
    weights = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])  # trajectory 2 excluded
    params = policy.adapter_parameters("default")
    cfg = GRPOConfig()

    # mtflow's batched micro-batches over every (turn, step), loss rescaled to the weighted mean of the step
    total = float(weights.sum()) * result.step_indices.numel()
    policy.train()
    for batch in transition_batches(result, 4):
        log_prob, *_ = recompute_transition(policy, result, batch)
        weight = weights[batch.trajectories, batch.turn]
        loss, _ = grpo_loss(
            log_prob,
            result.log_probs[batch.trajectories, batch.turn, batch.step],
            advantages[:, batch.turn],
            cfg,
            weight,
        )
        (loss * float(weight.sum()) / total).backward()
    batched = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    grads = []

    class Recording(NaiveLoop):
        def _step(self):
            grads.append([p.grad.clone() for p in self.params])
            self.optimizer.zero_grad(set_to_none=True)

    loop = Recording(policy, None, GRPO(), config, optim=OptimConfig(updates_per_rollout=1))
    loop._grpo_update(result, advantages, weights)
    policy.eval()
    assert len(grads) == 1
    for got, want in zip(grads[0], batched):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
    assert any(float(g.abs().sum()) > 0 for g in batched)
    # and a single recomputed sample reproduces its recorded log-prob (ratio 1)
    with torch.no_grad():
        log_prob, _, _ = naive_log_prob(policy, result, 1, 1, 0)
    torch.testing.assert_close(log_prob, result.log_probs[1:2, 1, 0], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ FLOP model


TOY = FluxArch(
    hidden=16, double_blocks=1, single_blocks=1, mlp_ratio=2.0, in_channels=4, text_dim=6, pooled_dim=5
)


def test_flux_forward_flops_hand_counted_toy():
    # h = 16, m = 32, 3 image tokens + 2 text tokens (S = 5), sinusoidal time width 256
    embed = 2 * 3 * 4 * 16 + 2 * 2 * 6 * 16  # x_embedder + context_embedder = 768
    per_sample = 2 * 2 * (256 * 16 + 16 * 16) + 2 * (5 * 16 + 16 * 16)  # time + guidance + pooled = 18080
    double = 2 * 5 * (4 * 256 + 2 * 16 * 32) + 2 * 2 * 16 * 96  # tokens + two adaLN-Zero (6h) = 20480 + 6144
    single = (
        2 * 5 * (3 * 256 + 16 * 32 + 48 * 16) + 2 * 16 * 48
    )  # q,k,v + mlp in + out (h+m -> h) = 20480 + 1536
    attention = 2 * 4 * 25 * 16  # two blocks of 4 S^2 h = 3200
    output = 2 * 16 * 32 + 2 * 3 * 16 * 4  # norm_out (2h) + proj_out = 1408
    assert embed + per_sample + double + single + attention + output == 72096
    got = flux_forward_flops(TOY, image_tokens=3, text_tokens=2)
    assert got.total == 72096 and got.attention == 3200 and got.lora == 0
    # LoRA r = 2 on 8 (double) + 3 (single) projections h -> h: 2 * S * r * (h + h) each, 4 + 3 over all tokens
    assert flux_forward_flops(TOY, 3, 2, lora_rank=2).lora == 2 * 5 * 2 * 32 * 7 == 4480
    assert flux_forward_flops(TOY, 3, 2, batch=3).total == 3 * 72096


def test_flux_flops_match_flop_counter_on_the_real_class():
    arch = FluxArch(hidden=64, double_blocks=2, single_blocks=4, in_channels=16, text_dim=24, pooled_dim=20)
    forward = flux_forward_flops(arch, 128, 32, lora_rank=4)
    assert forward.total == counted_flux_flops(arch, 4, 128, 32, lora_rank=4)
    # backward: exact up to the first block's input gradients, which autograd skips
    measured = counted_flux_flops(arch, 4, 128, 32, lora_rank=4, backward=True)
    assert flux_train_flops(forward) == pytest.approx(measured, rel=0.02)


def test_t5_qwen_and_iteration_projection():
    assert t5_encoder_flops(T5Arch(layers=1, d_model=2, d_ff=3, inner=4), tokens=5) == (
        5 * 2 * (4 * 2 * 4 + 3 * 2 * 3) + 4 * 25 * 4
    )
    qwen = Qwen3VLArch()
    assert qwen3vl_image_tokens(qwen, 512) == (1024, 256)
    with pytest.raises(ValueError, match="multiple of"):
        qwen3vl_image_tokens(qwen, 500)
    toy = Qwen3VLArch(
        layers=1, hidden=4, intermediate=6, heads=2, kv_heads=1, head_dim=2, vocab=10, vision_depth=1,
        vision_hidden=2, vision_intermediate=3, patch=2, temporal_patch=1, merge=2, deepstack=0,
    )  # fmt: skip
    # one 4x4 image: 4 patches of 3*1*2*2 = 12 values -> 1 merged token; 5 text tokens -> 6 LM tokens
    vision = 2 * 4 * 12 * 2 + (2 * 4 * (4 * 4 + 2 * 2 * 3) + 4 * 16 * 2) + 2 * 1 * (8 * 8 + 8 * 4)
    lm_params = 2 * 4 * 4 + 2 * 4 * 2 + 3 * 4 * 6  # q,o (4 x 4) + k,v (4 x 2) + SwiGLU
    lm = 2 * 6 * lm_params + 4 * 36 * 4 + 2 * 4 * 10
    assert qwen3vl_prefill_flops(toy, images=1, side=4, text_tokens=5) == vision + lm

    hw = Hardware()
    full = project_iteration(PaperSetting(), "grpo", hw)
    window = project_iteration(PaperSetting(), "grpo_window", hw)
    assert full.flops["train"] == pytest.approx(window.flops["train"] * 12 / 2)
    assert full.flops["rollout"] == window.flops["rollout"]
    forward = flux_forward_flops(FluxArch(), 2048, 512, lora_rank=32)
    assert full.flops["rollout"] == pytest.approx(16 * 3 * 12 * forward.total)
    assert full.seconds["rollout"] == pytest.approx(full.flops["rollout"] / (0.4 * 989e12))
    nft = project_iteration(PaperSetting(nft_draws=2), "nft", hw)
    assert nft.flops["nft_old_ref"] == pytest.approx(16 * 3 * 2 * 2 * forward.total)
    double = project_iteration(PaperSetting(chains_per_gpu=2), "grpo", hw)
    assert double.flops["train"] == pytest.approx(2 * full.flops["train"])
    assert math.isfinite(full.total_seconds) and full.total_seconds > window.total_seconds
    with pytest.raises(ValueError, match="unknown loss"):
        project_iteration(PaperSetting(), "ppo", hw)


def test_rollout_storage_at_paper_scale():
    # 16 trajectories x 3 turns; 1024 tokens x 64 channels per latent; 12 recorded steps, states and next states
    full = rollout_storage_bytes(PaperSetting(), "grpo")
    assert full == {
        "states": 2 * 16 * 3 * 12 * 65536 * 4,
        "latents": 2 * 16 * 3 * 65536 * 4,
        "images": 16 * 3 * 3 * 512 * 512,
    }
    assert rollout_storage_bytes(PaperSetting(), "grpo", 2)["states"] == full["states"] // 2
    assert rollout_storage_bytes(PaperSetting(), "grpo_window")["states"] == full["states"] * 2 // 12
    assert rollout_storage_bytes(PaperSetting(), "nft")["states"] == 0
