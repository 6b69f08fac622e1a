"""FSDP2 through Lightning's ModelParallelStrategy on 2 CPU processes (gloo): the transformer is really sharded,
both ranks make the same number of sharded forward calls, LoRA-only checkpoints resume, and the result matches a
single-process run on the same chains and seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtflow.testing.fixtures import tiny_fit_config, write_config, write_random_manifest

pytestmark = pytest.mark.slow


def _run(config: dict, path: Path, *extra: str) -> None:
    write_config(config, path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mtflow", "fit", "--config", str(path), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=path.parent,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def _lora(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def test_two_process_fsdp_matches_single_process_and_resumes(tiny_kontext_path, tmp_path):
    manifest = write_random_manifest(tmp_path / "data", num_chains=8, num_turns=2)
    probe = tmp_path / "probe"
    strategy = {
        "class_path": "mtflow.training.distributed.LoRAModelParallelStrategy",
        "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
    }
    ddp = tiny_fit_config(
        tiny_kontext_path,
        manifest,
        tmp_path,
        name="fsdp",
        data={"batch_size": 1},
        model={"max_iterations": 2},
    )
    ddp["trainer"].update(
        {
            "devices": 2,
            "strategy": strategy,
            "callbacks": [
                {"class_path": "mtflow.testing.probes.ShardingProbe", "init_args": {"folder": str(probe)}}
            ],
        }
    )
    _run(ddp, tmp_path / "fsdp.yaml")

    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["forward_calls"] == ranks[1]["forward_calls"] > 0
    for name, info in ranks[0]["params"].items():
        if "blocks" in name and "base_layer.weight" in name:
            assert info["dtensor"] and info["local"] < info["global"], name
            assert info["local"] + ranks[1]["params"][name]["local"] == info["global"], name

    ckpt = tmp_path / "fsdp" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["state_dict"] and all("lora_" in k for k in state["state_dict"])
    assert state["mtflow"]["iteration"] == 2 and state["optimizer_states"]

    resumed = dict(ddp, trainer=dict(ddp["trainer"], callbacks=[]))
    resumed["model"] = dict(ddp["model"], max_iterations=3)
    resumed["trainer"]["logger"] = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(tmp_path), "name": "fsdp_resumed", "version": 0},
    }
    _run(resumed, tmp_path / "fsdp_resumed.yaml", "--ckpt_path", str(ckpt))

    single = tiny_fit_config(
        tiny_kontext_path,
        manifest,
        tmp_path,
        name="single",
        data={"batch_size": 2},
        model={"max_iterations": 3},
    )
    _run(single, tmp_path / "single.yaml")

    distributed = _lora(tmp_path / "fsdp_resumed" / "version_0" / "checkpoints" / "last.ckpt")
    reference = _lora(tmp_path / "single" / "version_0" / "checkpoints" / "last.ckpt")
    assert distributed.keys() == reference.keys()
    changed = max(float(v.abs().max()) for k, v in reference.items() if "lora_B" in k)
    assert changed > 1e-2  # training moved the weights, so agreement below is meaningful
    for key, value in reference.items():
        # same chains, same per-chain noise; only float summation order differs between 1 and 2 processes
        torch.testing.assert_close(distributed[key], value, atol=1e-4, rtol=1e-3)
