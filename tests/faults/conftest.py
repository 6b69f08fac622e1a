"""Fixtures of the fault-injection suite: PNG payloads (honest, hostile and foreign), loopback servers in process
and in real subprocesses, and the resident memory of a process.

The reward-service faults live in ``test_reward_*.py``; the training / CLI faults keep their fixtures in their own
files.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from mtflow.reward.base import ScoringItem

INSTRUCTIONS = ["add a red circle", "make the sky blue", "remove the cat", "turn the square into a star"]
JUDGE_MODEL = "Qwen/Qwen3-VL-8B-Instruct"


def encode(image: Image.Image, fmt: str = "PNG", **save: Any) -> str:
    """Base64 of ``image`` saved as ``fmt``."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@functools.lru_cache(maxsize=32)
def blank_png(width: int, height: int | None = None, mode: str = "RGB") -> str:
    """A flat PNG: a few KiB on the wire, ``width x height x 4`` bytes decoded (a pixel bomb when large)."""
    return encode(Image.new(mode, (width, height or width)))


@functools.lru_cache(maxsize=256)
def noise_png(side: int, seed: int) -> str:
    """A random-noise PNG (incompressible, so the body is as large as the pixels)."""
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)))


def item_json(item_id: str, images: list[str], chain_id: str = "c", **extra: Any) -> dict[str, Any]:
    """One wire item: ``images[0]`` is the source, the rest the outputs (one instruction each)."""
    turns = len(images) - 1
    return {
        "item_id": item_id,
        "chain_id": chain_id,
        "source": images[0],
        "outputs": images[1:],
        "instructions": [INSTRUCTIONS[k % len(INSTRUCTIONS)] for k in range(turns)],
        "metadata": {},
        **extra,
    }


def make_items(num_items: int, num_turns: int = 2, seed: int = 0, side: int = 32) -> list[ScoringItem]:
    """``num_items`` trajectories of random images with distinct ids."""
    rng = np.random.default_rng(seed)

    def image() -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))

    return [
        ScoringItem(
            item_id=f"s{seed}/t{i}",
            chain_id=f"s{seed}/c{i // 4}",
            source=image(),
            outputs=[image() for _ in range(num_turns)],
            instructions=[INSTRUCTIONS[(i + k) % len(INSTRUCTIONS)] for k in range(num_turns)],
        )
        for i in range(num_items)
    ]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JUDGE_API_KEY", "OPENAI_API_KEY")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


@contextmanager
def service_process(
    command: list[str],
    workdir: Path,
    ready_file: Path,
    env: dict[str, str] | None = None,
    timeout_s: float = 90.0,
) -> Iterator[tuple[subprocess.Popen, str]]:
    """Run ``command`` (a server that writes ``{"url": ...}`` to ``ready_file`` once serving) in its own process
    group; yields the process and the URL; always killed afterwards."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{ready_file.stem}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=env or child_env(), start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout_s
        while not ready_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[:4]} did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        yield process, json.loads(ready_file.read_text())["url"]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextmanager
def reward_server_process(config: dict[str, Any], workdir: Path, **kwargs: Any):
    """``python -m mtflow.reward.server --config`` with ``config`` on a free loopback port."""
    workdir.mkdir(parents=True, exist_ok=True)
    ready = workdir / "reward-ready.json"
    config = {"host": "127.0.0.1", "port": 0, "ready_file": str(ready), "log_level": "warning", **config}
    (workdir / "reward.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "mtflow.reward.server", "--config", str(workdir / "reward.yaml")]
    with service_process(command, workdir, ready, **kwargs) as running:
        yield running


@contextmanager
def scripted_judge_process(workdir: Path, name: str, latency_ms: float = 50.0, *extra: str):
    """The scripted OpenAI-compatible judge (``openai_compat_server --scripted``) in a subprocess; yields
    (process, base URL ending in /v1)."""
    ready = workdir / f"{name}-ready.json"
    command = [
        sys.executable,
        "-m",
        "mtflow.reward.openai_compat_server",
        "--scripted",
        "--latency-ms",
        str(latency_ms),
        "--port",
        "0",
        "--ready-file",
        str(ready),
        *extra,
    ]
    with service_process(command, workdir, ready) as running:
        yield running


def openai_judge_config(base_url: str | list[str], **backend: Any) -> dict[str, Any]:
    """A ``VLMJudge`` over ``OpenAIBackend`` (non-thinking, no key) as the ``scorer`` of a server YAML."""
    return {
        "class_path": "mtflow.reward.judge.VLMJudge",
        "init_args": {
            "backend": {
                "class_path": "mtflow.reward.openai_backend.OpenAIBackend",
                "init_args": {"base_url": base_url, "model": JUDGE_MODEL, "max_retries": 1, **backend},
            },
            "mode": "non_thinking",
        },
    }


def memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak resident set) of process ``pid`` in KiB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def reset_peak_rss(pid: int) -> bool:
    """Reset the kernel's peak-RSS counter of ``pid`` (``VmHWM``); False where the kernel does not allow it."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def scripted_judge():
    """An in-process scripted judge (20 ms per answer, no key required), shared by the suite."""
    from mtflow.reward.openai_compat_server import create_scripted_openai_app
    from mtflow.reward.server import BackgroundServer

    app = create_scripted_openai_app(JUDGE_MODEL, latency_s=0.02)
    with BackgroundServer(app) as server:
        yield server, app
