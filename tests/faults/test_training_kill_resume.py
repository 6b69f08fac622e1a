"""``kill -9`` of a toy-world fit (the embedded prior and exact judge, a real ``mtflow fit`` process) as soon as it
reports iteration 4 of 5: somewhere between writing ``status.json`` and finishing the checkpoint of that iteration, or
in the next one. The checkpoint on disk is whole (writes are atomic), no temporary file is left, and ``mtflow fit
--ckpt_path last`` continues to the adapters and metrics of an uninterrupted run, bit for bit."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mtflow.checkpoints import read_checkpoint
from mtflow.sweeps import RunStatus
from mtflow.testing.fixtures import REPO_CONFIGS

pytestmark = pytest.mark.slow

ITERATIONS, KILL_AT = 5, 4
SMALL_TOY = [  # the toy job, small enough for a test: 1 chain x G = 2 x 2 steps per iteration, no held-out table
    "--data.init_args.batch_size=1",
    "--data.init_args.num_train_chains=64",
    "--model.rollout.group_size=2",
    "--model.rollout.num_steps=2",
    "--heldout.enabled=false",
    "--image_logger.every_n_iterations=0",
    "--checkpoint.every_n_iterations=1",
    "--trainer.enable_progress_bar=false",
]


def _command(root: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mtflow",
        "fit",
        "--config",
        str(REPO_CONFIGS / "toy.yaml"),
        *SMALL_TOY,
        f"--model.max_iterations={ITERATIONS}",
        f"--trainer.logger.init_args.save_dir={root}",
        f"--trainer.default_root_dir={root}",
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _rows(run: Path) -> dict[str, dict[str, str]]:
    with open(run / "metrics.csv") as handle:
        return {r["train/iteration"]: r for r in csv.DictReader(handle) if r.get("train/iteration")}


def _iteration(run: Path) -> int:
    try:
        status = RunStatus.read(run)
    except Exception:  # noqa: BLE001 - being written
        return 0
    return int(status.iteration or 0) if status is not None else 0


def test_kill_9_then_ckpt_path_last_matches_an_uninterrupted_toy_fit(tmp_path):
    full = subprocess.run(
        _command(tmp_path / "full"), env=_env(), capture_output=True, text=True, timeout=1200
    )
    assert full.returncode == 0, full.stderr[-3000:]

    root = tmp_path / "killed"
    run = root / "toy" / "version_0"
    process = subprocess.Popen(_command(root), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 1200
    while _iteration(run) < KILL_AT:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert RunStatus.read(run).status == "running"  # nobody recorded the end: the process just vanished

    checkpoints = run / "checkpoints"
    names = {p.name for p in checkpoints.iterdir()}
    # a kill in the middle of a save can leave its temporary file (nothing runs after SIGKILL), never a torn last.ckpt
    assert "last.ckpt" in names and names <= {"last.ckpt", "last.ckpt.tmp"}, names
    stopped = read_checkpoint(checkpoints / "last.ckpt")["mtflow"]["iteration"]  # whole, whichever it is
    assert stopped in (KILL_AT - 1, KILL_AT)

    resumed = subprocess.run(
        _command(root, "--ckpt_path", "last"), env=_env(), capture_output=True, text=True, timeout=1200
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = root / "toy" / "version_1"
    ours = read_checkpoint(after / "checkpoints" / "last.ckpt")
    theirs = read_checkpoint(tmp_path / "full" / "toy" / "version_0" / "checkpoints" / "last.ckpt")
    assert ours["mtflow"]["iteration"] == theirs["mtflow"]["iteration"] == ITERATIONS
    assert ours["mtflow"]["samples_seen"] == theirs["mtflow"]["samples_seen"] == ITERATIONS * 1 * 2
    assert ours["state_dict"].keys() == theirs["state_dict"].keys() and ours["state_dict"]
    for key, value in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][key], value), key
    expected, got = _rows(tmp_path / "full" / "toy" / "version_0"), _rows(after)
    assert sorted(got) == [f"{float(i)}" for i in range(stopped + 1, ITERATIONS + 1)]
    for iteration, row in got.items():
        for key in ("reward/mean", "loss/policy", "adv/std", "policy/approx_kl"):
            assert row[key] == expected[iteration][key], (iteration, key)
    assert RunStatus.read(after).status == "completed"
