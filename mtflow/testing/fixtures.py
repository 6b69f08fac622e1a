"""Helpers that tests and benchmarks share: a manifest of random images and a fit configuration for tiny models."""

from __future__ import annotations

import json
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
) -> dict[str, Any]:
    """A complete ``mtflow fit`` config dict for the tiny Kontext model (GRPO, B=2, G=2, T=2)."""
    config: dict[str, Any] = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 100,  # max_iterations (model) ends the run
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(run_root),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(run_root), "name": name, "version": 0},
            },
        },
        "model": {
            "policy": {
                "class_path": "mtflow.models.kontext.KontextPolicy",
                "init_args": {
                    "pretrained": str(pretrained),
                    "dtype": "float32",
                    "resolution": 32,
                    "max_sequence_length": 32,
                    "lora_rank": 4,
                    "lora_alpha": 8,
                },
            },
            "scorer": {"class_path": "mtflow.testing.scorers.BrightnessScorer"},
            "group_size": 2,
            "num_steps": 2,
            "forward_batch_size": 4,
            "lr": 0.01,
            "max_iterations": 2,
        },
        "data": {
            "class_path": "mtflow.data.module.ManifestDataModule",
            "init_args": {"train_manifest": str(manifest), "num_turns": num_turns, "batch_size": 2},
        },
        "image_logger": {"every_n_iterations": 1},
        "checkpoint": {"every_n_iterations": 1},
    }
    for key, extra in (("model", model), ("trainer", trainer)):
        if extra:
            config[key].update(extra)
    if data:
        config["data"]["init_args"].update(data)
    return config


def write_config(config: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
