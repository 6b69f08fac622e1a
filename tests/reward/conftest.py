"""Fixtures of the reward tests: the tiny judge loaded once, deterministic trajectories, servers on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mtflow.reward.base import ScoringItem
from mtflow.testing.fixtures import torch_threads

INSTRUCTIONS = [
    "add a red circle to the left",
    "make the sky blue",
    "remove the cat",
    "turn the square into a star",
]


def random_image(rng: np.random.Generator, size: tuple[int, int] = (32, 32)) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def make_items(
    num_items: int, num_turns: int = 2, seed: int = 0, size: tuple[int, int] = (32, 32)
) -> list[ScoringItem]:
    """``num_items`` trajectories of random images; instructions rotate so that items differ in text too."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(num_items):
        instructions = [INSTRUCTIONS[(i + k) % len(INSTRUCTIONS)] for k in range(num_turns)]
        items.append(
            ScoringItem(
                item_id=f"chain{i // 2}/g{i % 2}",
                chain_id=f"chain{i // 2}",
                source=random_image(rng, size),
                outputs=[random_image(rng, size) for _ in range(num_turns)],
                instructions=instructions,
                metadata={"index": i},
            )
        )
    return items


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny judge gains nothing from a second thread (tests ran 10x slower under load with two)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_backend(tiny_qwen3vl_path):
    """A ``TransformersBackend`` over the tiny Qwen3-VL (shared: loading costs about a second)."""
    from mtflow.reward.backends import TransformersBackend

    return TransformersBackend(str(tiny_qwen3vl_path), max_batch_size=16)


@pytest.fixture(scope="session")
def tiny_dinov2_path(tmp_path_factory) -> Path:
    """A tiny random ``Dinov2Model`` + ``BitImageProcessor`` saved with ``save_pretrained``."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    path = tmp_path_factory.mktemp("models") / "tiny-dinov2"
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=8,
        image_size=32,
        initializer_range=0.2,
    )
    Dinov2Model(config).eval().save_pretrained(path)
    BitImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(path)
    return path


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    )
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


@contextmanager
def reward_server_process(
    config: dict, workdir: Path, timeout_s: float = 90.0
) -> Iterator[tuple[subprocess.Popen, str]]:
    """Run ``python -m mtflow.reward.server --config`` on a free loopback port; always killed afterwards.

    Yields the process and its URL (read from the server's ``ready_file``).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    ready = workdir / "ready.json"
    config = {**config, "host": "127.0.0.1", "port": 0, "ready_file": str(ready), "log_level": "warning"}
    config_path = workdir / "reward.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "mtflow.reward.server", "--config", str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=child_env(),
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"reward server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        yield process, json.loads(ready.read_text())["url"]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
