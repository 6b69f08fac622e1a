"""Aspect buckets under FSDP2 on 2 CPU processes (gloo): a manifest of landscape, portrait and square sources is
trained through ``mtflow fit``; every batch holds one bucket, every chain keeps its bucket through all turns, a
chain's group never spans ranks, and a run resumed mid-epoch replays exactly the uninterrupted one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtflow.testing.fixtures import INSTRUCTIONS, tiny_fit_config, write_config

pytestmark = pytest.mark.slow

GROUP = 2
SIZES = [(48, 32)] * 4 + [(32, 48)] * 4 + [(32, 32)] * 2  # buckets 36x24, 24x36 and 32x32 at resolution 32


def _manifest(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, (width, height) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        instructions = [INSTRUCTIONS[(i + k) % len(INSTRUCTIONS)] for k in range(2)]
        lines.append(json.dumps({"id": f"chain{i}", "image": f"{i}.png", "instructions": instructions}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "manifest.jsonl"


def _fit(config: dict, path: Path, *extra: str) -> None:
    write_config(config, path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mtflow", "fit", "--config", str(path), *extra],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=path.parent,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def _config(tiny_kontext_path, manifest, root: Path, name: str, iterations: int) -> dict:
    config = tiny_fit_config(
        tiny_kontext_path,
        manifest,
        root,
        name=name,
        data={"batch_size": 2},
        model={"max_iterations": iterations, "rollout": {"group_size": GROUP}},
    )
    config["trainer"].update(
        {
            "devices": 2,
            "strategy": {
                "class_path": "mtflow.training.distributed.LoRAModelParallelStrategy",
                "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
            },
            "callbacks": [
                {
                    "class_path": "mtflow.testing.bucket_probe.BucketProbe",
                    "init_args": {"folder": str(root / name)},
                }
            ],
        }
    )
    return config


def _records(folder: Path) -> list[dict]:
    records = [
        json.loads(line)
        for rank in (0, 1)
        for line in (folder / f"rank{rank}.jsonl").read_text().splitlines()
    ]
    return sorted(records, key=lambda r: (r["iteration"], r["rank"]))


def test_buckets_under_fsdp_on_two_processes_with_an_exact_resume(tiny_kontext_path, tmp_path):
    manifest = _manifest(tmp_path / "data")
    _fit(_config(tiny_kontext_path, manifest, tmp_path, "straight", 4), tmp_path / "straight.yaml")
    resumed = _config(tiny_kontext_path, manifest, tmp_path, "resumed", 3)
    _fit(resumed, tmp_path / "resumed.yaml")
    ckpt = tmp_path / "resumed" / "version_0" / "checkpoints" / "last.ckpt"
    resumed["model"]["max_iterations"] = 4
    _fit(resumed, tmp_path / "resumed_more.yaml", "--ckpt_path", str(ckpt))

    straight = _records(tmp_path / "straight")
    assert [(r["iteration"], r["rank"]) for r in straight] == [
        (i, rank) for i in range(1, 5) for rank in (0, 1)
    ]
    for record in straight:
        bucket = record["edit_sizes"][0]
        assert all(size == bucket for size in record["edit_sizes"])  # one bucket per batch
        assert bucket in ([36, 24], [24, 36], [32, 32])
        assert record["num_trajectories"] == 2 * GROUP
        assert all(size == bucket for size in record["source_sizes"])
        assert all(size == bucket for row in record["turn_sizes"] for size in row)  # every turn keeps it
        expected = sorted(f"{chain}/g{g}" for chain in record["chains"] for g in range(GROUP))
        assert sorted(record["item_ids"]) == expected  # a chain's whole group was rolled out on this rank
    for first, second in zip(straight[::2], straight[1::2]):
        assert not set(first["chains"]) & set(second["chains"])  # no chain on both ranks in one iteration
    seen_buckets = {tuple(r["edit_sizes"][0]) for r in straight}
    assert len(seen_buckets) >= 2  # mixed aspect ratios really went through the run
    # the resumed run (3 iterations, then 1 more from its checkpoint) saw exactly the same batches ...
    replay = _records(tmp_path / "resumed")
    assert [(r["iteration"], r["rank"], r["chains"]) for r in replay] == [
        (r["iteration"], r["rank"], r["chains"]) for r in straight
    ]
    # ... and trained exactly the same LoRA
    final = [
        torch.load(
            tmp_path / name / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
        )
        for name in ("straight", "resumed")
    ]
    assert final[0]["mtflow"]["iteration"] == final[1]["mtflow"]["iteration"] == 4
    moved = max(float(v.abs().max()) for k, v in final[0]["state_dict"].items() if "lora_B" in k)
    assert moved > 1e-3
    for key, value in final[0]["state_dict"].items():
        assert torch.equal(final[1]["state_dict"][key], value), key
