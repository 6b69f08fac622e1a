"""A guided editor under FSDP2 on 2 CPU processes (gloo): FLUX.2-klein runs the transformer twice per velocity
(classifier-free guidance) in the rollout and in GRPO's recomputed log-probs; sharded, its blocks are gathered for
both calls, and two processes train the LoRA a single process trains on the same chains."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtflow.testing.fixtures import tiny_fit_config, write_config, write_random_manifest

pytestmark = pytest.mark.slow


def _run(config: dict, path: Path) -> None:
    write_config(config, path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mtflow", "fit", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=path.parent,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_a_guided_editor_under_fsdp_matches_a_single_process(tiny_flux2_klein_path, tmp_path):
    manifest = write_random_manifest(tmp_path / "data", num_chains=4, num_turns=2, size=64)
    base = "tiny/flux2_klein_grpo.yaml"
    sharded = tiny_fit_config(
        tiny_flux2_klein_path,
        manifest,
        tmp_path,
        name="fsdp",
        base=base,
        data={"batch_size": 1},
        model={"optim": {"lr": 0.05}},
    )
    sharded["trainer"].update(
        {
            "devices": 2,
            "strategy": {
                "class_path": "mtflow.training.distributed.LoRAModelParallelStrategy",
                "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
            },
            "callbacks": [
                {
                    "class_path": "mtflow.testing.probes.ShardingProbe",
                    "init_args": {"folder": str(tmp_path / "probe")},
                }
            ],
        }
    )
    _run(sharded, tmp_path / "fsdp.yaml")
    single = tiny_fit_config(
        tiny_flux2_klein_path,
        manifest,
        tmp_path,
        name="single",
        base=base,
        data={"batch_size": 2},
        model={"optim": {"lr": 0.05}},
    )
    _run(single, tmp_path / "single.yaml")

    import json

    ranks = [json.loads((tmp_path / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["forward_calls"] == ranks[1]["forward_calls"] > 0
    sharded_blocks = [
        name for name, info in ranks[0]["params"].items() if "blocks" in name and "base_layer.weight" in name
    ]
    assert sharded_blocks and all(
        ranks[0]["params"][n]["local"] < ranks[0]["params"][n]["global"] for n in sharded_blocks
    )

    def lora(name):
        ckpt = tmp_path / name / "version_0" / "checkpoints" / "last.ckpt"
        return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]

    distributed, reference = lora("fsdp"), lora("single")
    assert distributed.keys() == reference.keys()
    assert max(float(v.abs().max()) for k, v in reference.items() if "lora_B" in k) > 1e-3
    for key, value in reference.items():
        torch.testing.assert_close(distributed[key], value, atol=1e-4, rtol=1e-3)
