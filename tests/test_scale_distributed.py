"""Two gloo processes under FSDP2 against one process: the held-out evaluation inside ``fit`` splits its chains
across ranks (half the rollouts and judge calls per rank, the same metrics), and the unsharded rollout makes fewer
all-gathers with bit-identical results."""

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

STRATEGY = {
    "class_path": "mtflow.training.distributed.LoRAModelParallelStrategy",
    "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
}


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


@pytest.fixture(scope="module")
def runs(tiny_kontext_path, tmp_path_factory):
    """One process; two processes with the unsharded rollout off and on (rank 0 reads the checkpoint), and with
    every rank reading it; held-out evaluation on 8 chains."""
    root = tmp_path_factory.mktemp("scale")
    manifest = write_random_manifest(root / "data", num_chains=8, num_turns=2)
    out = {}
    runs = (
        ("single", 1, "off", True),
        ("off", 2, "off", True),
        ("on", 2, "on", True),
        ("every_rank", 2, "off", False),
    )
    for name, devices, unsharded, load_once in runs:
        config = tiny_fit_config(
            tiny_kontext_path,
            manifest,
            root,
            name=name,
            data={"batch_size": 2 // devices, "val_manifest": str(manifest)},
            model={
                "max_iterations": 2,
                "rollout": {"unsharded": unsharded},
                "policy": {"init_args": {"load_once": load_once}},
            },
        )
        config["heldout"] = {"num_chains": 8, "batch_size": 2}
        config["trainer"]["limit_val_batches"] = 0
        config["trainer"]["callbacks"] = [
            {
                "class_path": "mtflow.testing.probes.WorkProbe",
                "init_args": {"folder": str(root / f"probe_{name}")},
            }
        ]
        if devices == 2:
            config["trainer"].update({"devices": 2, "strategy": STRATEGY})
        _run(config, root / f"{name}.yaml")
        ranks = [json.loads((root / f"probe_{name}" / f"rank{r}.json").read_text()) for r in range(devices)]
        run = root / name / "version_0"
        out[name] = {
            "ranks": ranks,
            "heldout": json.loads((run / "eval" / "before_after.json").read_text()),
            "lora": torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
                "state_dict"
            ],
            "images": sorted((run / "images").glob("*.png")),  # the captioned grids
        }
    return out


def _metrics(report: dict) -> dict:
    """The report without its bootstrap intervals' seeds-independent fields left out: everything numeric."""
    return report["conditions"]["model"]


def test_heldout_evaluation_splits_chains_across_ranks(runs):
    single = runs["single"]["ranks"][0]
    ranks = runs["off"]["ranks"]
    # before and after RL, 8 chains: 8 + 8 judge items on one process, 4 + 4 on each of two
    assert single["eval_items"] == 16
    assert [r["eval_items"] for r in ranks] == [8, 8]
    assert [r["eval_forwards"] for r in ranks] == [single["eval_forwards"] // 2] * 2
    for when in ("before", "after"):
        assert _metrics(runs["off"]["heldout"][when]) == _metrics(runs["single"]["heldout"][when])


def test_unsharded_rollout_gathers_less_with_identical_results(runs):
    off, on = runs["off"], runs["on"]
    assert off["lora"].keys() == on["lora"].keys()
    for key, value in off["lora"].items():
        assert torch.equal(value, on["lora"][key]), key
    for a, b in zip(off["images"], on["images"], strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    gathers_off = [r["gathers"] for r in off["ranks"]]
    gathers_on = [r["gathers"] for r in on["ranks"]]
    assert gathers_on[0] == gathers_on[1] and gathers_off[0] == gathers_off[1]
    assert 0 < gathers_on[0] < gathers_off[0]
    print(
        f"all-gathers per rank over {off['ranks'][0]['iterations']} iterations: off {gathers_off[0]}, on {gathers_on[0]}"
    )


def test_rank0_load_gives_identical_results_and_keeps_text_encoders_off_the_training_device(runs):
    once, every = runs["off"], runs["every_rank"]
    for key, value in every["lora"].items():
        assert torch.equal(value, once["lora"][key]), key
    for a, b in zip(every["images"], once["images"], strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    for rank in once["ranks"] + every["ranks"]:
        # offloaded encoders are not the module's parameters: Lightning and FSDP never move them to the GPU
        assert rank["text_encoder_params_on_training_device"] == 0
        assert rank["text_encoder_devices"] == ["cpu"]
