"""HSDP: ``LoRAModelParallelStrategy(replicate_size=...)`` shards within a replica group and replicates across groups.
On 2 CPU processes (gloo) a 2 x 1 mesh (2 replicas of an unsharded model) and a 1 x 2 mesh (1 replica sharded over
both ranks) train to the adapters of the 1-D FSDP run, to float tolerance. The 1 x 2 run is started by ``torchrun``,
as docs/cluster.md's multi-node template does (one process per device, started outside Lightning)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtflow.checkpoints import read_checkpoint
from mtflow.testing.fixtures import tiny_fit_config, write_config, write_random_manifest

pytestmark = pytest.mark.slow

MESHES = {"fsdp": None, "hsdp_2x1": 2, "hsdp_1x2": 1}  # name -> replicate_size


def _run(config: dict, path: Path, torchrun: bool) -> None:
    write_config(config, path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command = [*(launcher if torchrun else [sys.executable]), "-m", "mtflow", "fit", "--config", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=path.parent, env=env)
    assert done.returncode == 0, done.stderr[-4000:]


def test_hsdp_meshes_match_the_one_dimensional_run(tiny_kontext_path, tmp_path):
    manifest = write_random_manifest(tmp_path / "data", num_chains=8, num_turns=2)
    results = {}
    for name, replicate in MESHES.items():
        config = tiny_fit_config(
            tiny_kontext_path,
            manifest,
            tmp_path,
            name=name,
            data={"batch_size": 1},
            model={"max_iterations": 2},
        )
        strategy = {"data_parallel_size": "auto", "process_group_backend": "gloo"}
        if replicate is not None:
            strategy["replicate_size"] = replicate
        probe = {
            "class_path": "mtflow.testing.probes.ShardingProbe",
            "init_args": {"folder": str(tmp_path / name)},
        }
        config["trainer"].update(
            {
                "devices": 2,
                "strategy": {
                    "class_path": "mtflow.training.distributed.LoRAModelParallelStrategy",
                    "init_args": strategy,
                },
                "callbacks": [probe],
            }
        )
        _run(config, tmp_path / f"{name}.yaml", torchrun=name == "hsdp_1x2")
        ranks = [json.loads((tmp_path / name / f"rank{r}.json").read_text()) for r in (0, 1)]
        results[name] = (ranks, read_checkpoint(tmp_path / name / "version_0" / "checkpoints" / "last.ckpt"))

    # the meshes are what was asked for: block weights sharded over 2 ranks (1-D, 1 x 2) or whole on each (2 x 1)
    for name, expected_mesh, sharded in (
        ("fsdp", [2], True),
        ("hsdp_2x1", [2, 1], False),
        ("hsdp_1x2", [1, 2], True),
    ):
        ranks, _ = results[name]
        assert [r["world_size"] for r in ranks] == [2, 2]
        blocks = {n: p for n, p in ranks[0]["params"].items() if "blocks" in n and "base_layer.weight" in n}
        assert blocks
        for param_name, info in blocks.items():
            assert info["dtensor"] and info["mesh"] == expected_mesh, (name, param_name, info)
            assert (info["local"] < info["global"]) == sharded, (name, param_name, info)
            if sharded:
                assert info["local"] + ranks[1]["params"][param_name]["local"] == info["global"]

    reference = results["fsdp"][1]
    assert reference["mtflow"]["iteration"] == 2
    moved = max(float(v.abs().max()) for k, v in reference["state_dict"].items() if "lora_B" in k)
    assert moved > 1e-3  # training moved the adapters, so agreement is meaningful
    for name in ("hsdp_2x1", "hsdp_1x2"):
        state = results[name][1]
        assert state["state_dict"].keys() == reference["state_dict"].keys()
        for key, value in reference["state_dict"].items():
            # same chains and noise on the same ranks; only the order of the float32 gradient reduction differs
            torch.testing.assert_close(
                state["state_dict"][key], value, atol=1e-6, rtol=1e-5, msg=f"{name} {key}"
            )
