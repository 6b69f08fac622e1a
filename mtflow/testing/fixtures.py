"""Helpers that tests and benchmarks share: a manifest of random images and a fit configuration for tiny models."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

INSTRUCTIONS = [
    "make it red",
    "add a circle",
    "remove the square",
    "turn the background blue",
    "move the star left",
]


@contextmanager
def torch_threads(num: int) -> Iterator[None]:
    """Run the block with ``num`` torch threads, then restore the previous count. One thread is what tests want on
    a shared 2-core machine (two OpenMP threads per process spin against other jobs and run many times slower),
    and what recorded numbers need (CPU matmuls may block differently per thread count)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def write_random_manifest(
    folder: str | Path, num_chains: int, num_turns: int, size: int = 32, seed: int = 0
) -> Path:
    """``num_chains`` chains of random RGB images and cycled instructions; returns the manifest path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(num_chains):
        name = f"src_{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name)
        instructions = [INSTRUCTIONS[(i + k) % len(INSTRUCTIONS)] for k in range(num_turns)]
        lines.append(json.dumps({"id": f"chain{i:04d}", "image": name, "instructions": instructions}))
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


REPO_CONFIGS = Path(str(resources.files("mtflow.configs")))  # as mtflow.cli resolves them


def printed_fit_config(capsys, *configs: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """``mtflow fit --config <each of configs> <extra> --print_config``: the config LightningCLI resolved and
    validated, as a dict (configs are names under ``configs/``; ``capsys`` is pytest's fixture)."""
    import pytest

    from mtflow.cli import main

    args = ["fit"]
    for config in configs:
        args += ["--config", str(REPO_CONFIGS / config)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, *extra, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def tiny_fit_config(
    pretrained: str | Path,
    manifest: str | Path,
    run_root: str | Path,
    *,
    num_turns: int = 2,
    model: dict[str, Any] | None = None,
    trainer: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    name: str = "run",
    base: str = "tiny/grpo.yaml",
) -> dict[str, Any]:
    """``configs/<base>`` (the tiny-model config the tests exercise) with paths filled in and overrides applied."""
    config: dict[str, Any] = yaml.safe_load((REPO_CONFIGS / base).read_text())
    config["trainer"].update(
        {
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(run_root),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(run_root), "name": name, "version": 0},
            },
        }
    )
    config["model"]["policy"]["init_args"]["pretrained"] = str(pretrained)
    config["data"]["init_args"].update({"train_manifest": str(manifest), "num_turns": num_turns})
    config["image_logger"] = {"every_n_iterations": 1}
    config["checkpoint"] = {"every_n_iterations": 1}
    for key, extra in (("model", model), ("trainer", trainer)):
        if extra:
            deep_update(config[key], extra)
    if data:
        config["data"]["init_args"].update(data)
    return config


def deep_update(config: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into ``config`` in place, group by group (``{"optim": {"lr": 0.05}}`` keeps the other optim
    keys); a ``class_path`` that changes replaces the whole entry, as LightningCLI does."""
    for key, value in update.items():
        old = config.get(key)
        same_class = not isinstance(value, dict) or value.get("class_path") in (
            None,
            (old or {}).get("class_path"),
        )
        if isinstance(value, dict) and isinstance(old, dict) and same_class:
            deep_update(old, value)
        else:
            config[key] = value
    return config


def algorithm(name: str, **init_args: Any) -> dict[str, Any]:
    """A ``model.algorithm`` entry, e.g. ``algorithm("NFT", train_timesteps=2)``."""
    return {"class_path": f"mtflow.algorithms.{name}", "init_args": init_args}


def write_config(config: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
