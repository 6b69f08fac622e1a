"""Bad checkpoints on every path that takes one (``fit / validate / test / export --ckpt_path``): missing, a folder,
empty, truncated, random bytes, a foreign Lightning checkpoint, a non-dict, and a pickle that would run code. Each
is refused in one line naming the file and what is wrong, with exit status 1, no traceback, before any model is
built or Lightning reads the file; the malicious pickle never runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtflow.cli import console_main
from mtflow.testing.fixtures import REPO_CONFIGS

V01 = Path(__file__).parents[1] / "data" / "v0_1" / "toy_grpo_ema.ckpt"
COMMANDS = ("fit", "validate", "test", "export")


class _RunsCode:
    """Unpickling this runs ``touch <marker>`` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _make(kind: str, folder: Path) -> tuple[Path, str]:
    """A bad checkpoint of ``kind`` and the words that must name its problem."""
    path = folder / f"{kind}.ckpt"
    if kind == "missing":
        return path, "checkpoint not found"
    if kind == "folder":
        path.mkdir()
        return path, "is a folder, not a checkpoint file"
    if kind == "empty":
        path.write_bytes(b"")
        return path, "is empty"
    if kind == "truncated":  # a real mtflow checkpoint cut in half, as a full disk or a kill would leave it
        path.write_bytes(V01.read_bytes()[: V01.stat().st_size // 2])
        return path, "not a readable mtflow checkpoint"
    if kind == "garbage":
        path.write_bytes(os.urandom(4096))
        return path, "not a readable mtflow checkpoint"
    if kind == "foreign":  # a plain Lightning checkpoint of some other model
        torch.save({"state_dict": {"layer.weight": torch.zeros(2, 2)}, "epoch": 3, "global_step": 10}, path)
        return path, "was not written by mtflow fit"
    if kind == "list":
        torch.save([1, 2, 3], path)
        return path, "holds a list, not an mtflow fit checkpoint"
    if kind == "pickle":
        torch.save({"mtflow": {}, "payload": _RunsCode(folder / "pwned")}, path)
        return path, "not a readable mtflow checkpoint"
    raise AssertionError(kind)


KINDS = ("missing", "folder", "empty", "truncated", "garbage", "foreign", "list", "pickle")


def _args(command: str, ckpt: Path, out: Path) -> list[str]:
    args = [command, "--config", str(REPO_CONFIGS / "toy.yaml"), "--ckpt_path", str(ckpt)]
    if command == "export":
        return [*args, "--output_dir", str(out / "lora")]
    return [
        *args,
        f"--trainer.logger.init_args.save_dir={out / 'runs'}",
        "--trainer.enable_progress_bar=false",
    ]


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if ": error: " in line]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", COMMANDS)
def test_a_bad_checkpoint_is_one_line_naming_it(command, kind, tmp_path, capsys):
    path, problem = _make(kind, tmp_path)
    assert console_main(_args(command, path, tmp_path)) == 1
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert line.startswith(f"mtflow {command}: error: ") and str(path) in line and problem in line, line
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "lora").exists()  # nothing was built or run
    assert not (tmp_path / "pwned").exists()  # the pickle's code never ran


def test_a_corrupt_last_checkpoint_behind_ckpt_path_last_is_named(tmp_path, capsys):
    """``--ckpt_path last`` finds the run's newest last.ckpt; a truncated one is named, not fed to Lightning."""
    last = tmp_path / "runs" / "toy" / "version_0" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(V01.read_bytes()[:1000])
    args = ["test", "--config", str(REPO_CONFIGS / "toy.yaml"), "--ckpt_path", "last"]
    args += [
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--trainer.enable_progress_bar=false",
    ]
    assert console_main(args) == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert str(last) in line and "not a readable mtflow checkpoint" in line


def test_as_a_process_the_same_is_one_line_and_exit_status_1(tmp_path):
    """The real ``python -m mtflow`` process (the console script's code path), for two of the cases above."""
    for command, kind in (("fit", "truncated"), ("export", "pickle")):
        path, problem = _make(kind, tmp_path / command)
        done = subprocess.run(
            [sys.executable, "-m", "mtflow", *_args(command, path, tmp_path / command)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert done.returncode == 1, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        (line,) = _error_lines(done.stderr)
        assert str(path) in line and problem in line
    assert not (tmp_path / "export" / "pwned").exists()


@pytest.fixture(autouse=True)
def _folders(tmp_path):
    for command in COMMANDS:
        (tmp_path / command).mkdir()
