"""Checkpoints through Lightning's ``ModelCheckpoint`` (``IterationCheckpoint``): ``--ckpt_path last`` resumes a run
bit for bit (from an earlier auto-numbered version folder, at a stop point other resume tests do not use), the
counters in the checkpoint and in ``status.json`` agree after a resume, top-k by a reward metric keeps exactly the
best iterations, loggers hear about every save (what ``log_model`` builds on), and writes are atomic."""

from __future__ import annotations

import csv
import errno
import json
import os
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import Logger

from mtflow.checkpoints import CheckpointWriteError, read_checkpoint, write_atomically
from mtflow.cli import main
from mtflow.testing.fixtures import tiny_fit_config, write_config, write_random_manifest
from mtflow.training.callbacks.checkpoint import newest_checkpoint, resume_candidates


class SaveRecorder(Logger):
    """A logger that records what Lightning tells loggers after each checkpoint save (``log_model`` of W&B, MLflow,
    Neptune reads exactly these paths off the callback)."""

    saves: list[dict] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        SaveRecorder.saves.append(
            {
                "last": checkpoint_callback.last_model_path,
                "best": checkpoint_callback.best_model_path,
                "top": sorted(checkpoint_callback.best_k_models),
                "exists": os.path.isfile(checkpoint_callback._last_checkpoint_saved),
            }
        )


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_random_manifest(tmp_path_factory.mktemp("data"), num_chains=8, num_turns=2)


def _rows(run: Path) -> dict[str, dict[str, str]]:
    with open(run / "metrics.csv") as handle:
        return {r["train/iteration"]: r for r in csv.DictReader(handle) if r.get("train/iteration")}


def _lora(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_kontext_path, manifest, tmp_path_factory):
    """Four iterations in one go, keeping the 2 best checkpoints by reward/mean and telling a recording logger."""
    root = tmp_path_factory.mktemp("full")
    config = tiny_fit_config(tiny_kontext_path, manifest, root, model={"max_iterations": 4}, name="full")
    config["checkpoint"] = {"every_n_iterations": 1, "save_top_k": 2, "monitor": "reward/mean", "mode": "max"}
    config["trainer"]["logger"] = [
        config["trainer"]["logger"],
        {"class_path": f"{__name__}.SaveRecorder"},
    ]
    SaveRecorder.saves = []
    main(["fit", "--config", str(write_config(config, root / "full.yaml"))])
    return root / "full" / "version_0", list(SaveRecorder.saves)


def test_ckpt_path_last_resumes_from_the_previous_version_bit_for_bit(
    tiny_kontext_path, manifest, tmp_path, uninterrupted
):
    """Stop after 3 of 4 iterations; ``mtflow fit <same config> --ckpt_path last`` (auto-numbered versions: the
    resumed run writes version_1 and finds version_0's last.ckpt) ends with the uninterrupted run's adapters and
    metrics; the checkpoint and status.json count the same iterations and samples."""
    full, _ = uninterrupted
    config = tiny_fit_config(tiny_kontext_path, manifest, tmp_path, model={"max_iterations": 3}, name="cut")
    del config["trainer"]["logger"]["init_args"]["version"]  # auto-numbered, as by default
    path = write_config(config, tmp_path / "cut.yaml")
    main(["fit", "--config", str(path)])
    first = tmp_path / "cut" / "version_0"
    assert read_checkpoint(first / "checkpoints" / "last.ckpt")["mtflow"]["iteration"] == 3

    cli = main(["fit", "--config", str(path), "--model.max_iterations=4", "--ckpt_path", "last"])
    resumed = tmp_path / "cut" / "version_1"
    assert cli.trainer.ckpt_path == str(first / "checkpoints" / "last.ckpt")
    ours, theirs = _lora(resumed / "checkpoints" / "last.ckpt"), _lora(full / "checkpoints" / "last.ckpt")
    assert ours.keys() == theirs.keys() and ours
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    assert set(_rows(resumed)) == {"4.0"}
    for key in ("reward/mean", "loss/policy", "adv/std", "policy/approx_kl"):
        assert _rows(resumed)["4.0"][key] == _rows(full)["4.0"][key], key

    per_iteration = 2 * 2  # batch_size 2 chains x group_size 2 on one rank
    status = json.loads((resumed / "status.json").read_text())
    state = read_checkpoint(resumed / "checkpoints" / "last.ckpt")["mtflow"]
    assert status["status"] == "completed"
    assert (status["iteration"], status["samples_seen"]) == (4, 4 * per_iteration)
    assert (state["iteration"], state["samples_seen"]) == (4, 4 * per_iteration)
    # every periodic checkpoint holds the counters of its own iteration (they used to lag one iteration behind)
    cut_status = json.loads((first / "status.json").read_text())
    assert cut_status["samples_seen"] == 3 * per_iteration == _state(first)["samples_seen"]


def _state(run: Path) -> dict:
    return read_checkpoint(run / "checkpoints" / "last.ckpt")["mtflow"]


def test_top_k_by_reward_keeps_exactly_the_best_iterations_and_loggers_hear_every_save(uninterrupted):
    full, saves = uninterrupted
    rewards = {int(float(it)): float(row["reward/mean"]) for it, row in _rows(full).items()}
    assert len(rewards) == 4 and len(set(rewards.values())) == 4  # distinct, so the ranking is unambiguous
    best_two = sorted(rewards, key=rewards.get, reverse=True)[:2]
    kept = sorted(p.name for p in (full / "checkpoints").glob("iter_*.ckpt"))
    assert kept == sorted(f"iter_{i:06d}.ckpt" for i in best_two)
    for name in kept:  # each file is the state of its own iteration
        assert _lora(full / "checkpoints" / name)
        assert read_checkpoint(full / "checkpoints" / name)["mtflow"]["iteration"] == int(name[5:11])
    assert (full / "checkpoints" / "last.ckpt").is_file()
    # a logger is told after every save (top-k saves and last.ckpt), with paths that exist
    assert len(saves) >= 4 + 2 and all(s["exists"] for s in saves)
    final = saves[-1]
    assert final["last"] == str(full / "checkpoints" / "last.ckpt")
    assert Path(final["best"]).name == f"iter_{best_two[0]:06d}.ckpt"
    assert [Path(p).name for p in final["top"]] == kept


def test_checkpointing_can_be_switched_off(tiny_kontext_path, manifest, tmp_path):
    config = tiny_fit_config(tiny_kontext_path, manifest, tmp_path, model={"max_iterations": 1}, name="off")
    config["trainer"]["enable_checkpointing"] = False
    cli = main(["fit", "--config", str(write_config(config, tmp_path / "off.yaml"))])
    assert cli.model.iteration == 1 and cli.trainer.checkpoint_callbacks == []
    assert not (tmp_path / "off" / "version_0" / "checkpoints").exists()


def test_resume_candidates_are_the_last_checkpoints_of_every_version_and_slurm_saves(tmp_path):
    now = time.time()

    def touch(path: Path, age_s: float) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (now - age_s, now - age_s))
        return path

    old = touch(tmp_path / "runs" / "toy" / "version_0" / "checkpoints" / "last.ckpt", 300)
    newer = touch(tmp_path / "runs" / "toy" / "version_1" / "checkpoints" / "last.ckpt", 200)
    touch(tmp_path / "runs" / "toy" / "version_1" / "checkpoints" / "iter_000010.ckpt", 10)  # not a "last"
    touch(tmp_path / "runs" / "other" / "version_0" / "checkpoints" / "last.ckpt", 1)  # another run
    hpc = touch(tmp_path / "root" / "hpc_ckpt_2.ckpt", 100)
    touch(tmp_path / "root" / "notes.ckpt", 5)
    found = resume_candidates(None, tmp_path / "runs" / "toy", tmp_path / "root")
    assert found == sorted([old, newer, hpc])
    assert newest_checkpoint(found) == hpc
    assert newest_checkpoint(resume_candidates(None, tmp_path / "runs" / "toy")) == newer
    assert resume_candidates(tmp_path / "missing") == [] and newest_checkpoint([]) is None


def test_an_interrupted_write_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path):
    target = tmp_path / "last.ckpt"
    write_atomically(target, lambda f: f.write(b"first"))
    assert target.read_bytes() == b"first" and not (tmp_path / "last.ckpt.tmp").exists()

    def disk_full(handle):
        handle.write(b"half of the new checkp")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(CheckpointWriteError) as error:
        write_atomically(target, disk_full)
    assert str(error.value).startswith(
        f"[Errno {errno.ENOSPC}] cannot write checkpoint {target}: No space left"
    )
    assert "previous checkpoint there is intact" in str(error.value) and error.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    with pytest.raises(KeyboardInterrupt):  # any interruption, not only OSError, removes the temporary file
        write_atomically(target, lambda f: (f.write(b"x"), (_ for _ in ()).throw(KeyboardInterrupt))[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
