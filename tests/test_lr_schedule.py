"""Learning-rate warm-up and decay (``model.optim``): hand-computed learning rates per optimiser step, the schedule
stepped once per optimiser step by ``mtflow fit``, and a resume across the end of the warm-up that continues
exactly."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from mtflow.cli import main
from mtflow.testing.fixtures import tiny_fit_config, write_config, write_random_manifest
from mtflow.training.optim import OptimConfig


def _lrs(config: OptimConfig, steps: int, max_iterations: int | None = None) -> list[float]:
    """The learning rate each of ``steps`` AdamW steps is taken with."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=config.lr)
    scheduler = config.build_scheduler(optimizer, max_iterations)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_then_cosine_by_hand():
    config = OptimConfig(lr=0.1, warmup_steps=2, schedule="cosine", min_lr_ratio=0.2, total_steps=6)
    # warm-up: 0.1 * 1/2, 0.1 * 2/2; cosine over steps 2..6 (4 steps) from 0.1 down to 0.02, then flat
    c = math.cos(math.pi / 4)
    expected = [0.05, 0.1, 0.1, 0.02 + 0.04 * (1 + c), 0.06, 0.02 + 0.04 * (1 - c), 0.02, 0.02]
    assert _lrs(config, 8) == pytest.approx(expected, abs=1e-15)


def test_warmup_then_constant_and_length_from_max_iterations():
    assert _lrs(OptimConfig(lr=0.3, warmup_steps=3), 5) == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3], abs=1e-15)
    # total_steps None: max_iterations (3) x updates_per_rollout (2) = 6 steps, no warm-up: cos(pi * s / 6)
    config = OptimConfig(lr=1.0, schedule="cosine", updates_per_rollout=2)
    expected = [0.5 * (1 + math.cos(math.pi * s / 6)) for s in range(6)]
    assert _lrs(config, 6, max_iterations=3) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"schedule": "linear"}, "schedule"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
        ({"warmup_steps": 4, "total_steps": 4}, "total_steps"),
    ],
)
def test_bad_schedule_is_one_line_naming_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        OptimConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_cosine_without_a_length_is_refused():
    with pytest.raises(ValueError, match="model.optim.total_steps or model.max_iterations"):
        OptimConfig(schedule="cosine").check_schedule(None)


def _lr_column(run: Path) -> dict[str, float]:
    with open(run / "metrics.csv") as handle:
        return {r["train/iteration"]: float(r["train/lr"]) for r in csv.DictReader(handle)}


@pytest.mark.slow  # three tiny fits (~90 s on 2 shared cores)
def test_fit_steps_the_schedule_and_resumes_exactly_across_the_warmup_end(tiny_kontext_path, tmp_path):
    manifest = write_random_manifest(tmp_path / "data", num_chains=8, num_turns=2)
    # 2 optimiser steps per iteration; warm-up over 5 steps ends inside iteration 3, after the checkpoint of
    # iteration 2; cosine to 0.1 * lr over 8 steps
    optim = {"lr": 0.05, "warmup_steps": 5, "schedule": "cosine", "min_lr_ratio": 0.1, "total_steps": 8}

    def fit(name: str, iterations: int, *extra: str):
        config = tiny_fit_config(
            tiny_kontext_path,
            manifest,
            tmp_path,
            model={"optim": optim, "max_iterations": iterations},
            name=name,
        )
        return main(["fit", "--config", str(write_config(config, tmp_path / f"{name}.yaml")), *extra])

    full = fit("full", 4)
    fit("first", 2)
    ckpt = tmp_path / "first" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["lr_schedulers"][0]["last_epoch"] == 4  # 2 iterations x 2 optimiser steps
    resumed = fit("resumed", 4, "--ckpt_path", str(ckpt))

    config = OptimConfig(**optim)
    by_step = _lrs(config, 8)
    first_of_iteration = {f"{i + 1}.0": by_step[2 * i] for i in range(4)}
    assert by_step[:6] == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05, 0.05], abs=1e-15)
    # metrics.csv holds the logged values in float32
    assert _lr_column(tmp_path / "full" / "version_0") == pytest.approx(first_of_iteration, rel=1e-6)
    resumed_lrs = _lr_column(tmp_path / "resumed" / "version_0")
    assert resumed_lrs == pytest.approx({k: first_of_iteration[k] for k in ("3.0", "4.0")}, rel=1e-6)
    # after the 8 steps both optimisers sit at the cosine's floor, and the adapters agree bit for bit
    full_opt, resumed_opt = full.trainer.optimizers[0], resumed.trainer.optimizers[0]
    assert (
        full_opt.param_groups[0]["lr"] == resumed_opt.param_groups[0]["lr"] == pytest.approx(0.005, abs=1e-15)
    )
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        if "lora_" in name:
            assert torch.equal(a, b), name
