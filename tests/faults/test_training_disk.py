"""A fit whose disk fills up or whose output folder is read-only: one line naming the file and the problem, exit
status 1, ``status.json`` says why, the previous checkpoint is intact and no temporary checkpoint file is left.

Disk full is simulated two ways: a file-size limit on the process (``RLIMIT_FSIZE``, which makes writes past the limit
fail with EFBIG; any user), and a small tmpfs filled up (ENOSPC; needs root for ``mount``). Read-only output is a
tmpfs remounted read-only (root), or a folder without write permission (other users)."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from mtflow.checkpoints import read_checkpoint
from mtflow.cli import console_main
from mtflow.sweeps import RunStatus
from mtflow.testing.fixtures import tiny_fit_config, write_config, write_random_manifest

IS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_random_manifest(tmp_path_factory.mktemp("data"), num_chains=8, num_turns=2)


def _config(
    tiny_kontext_path, manifest, tmp_path: Path, root: Path, name: str, iterations: int, **checkpoint
) -> Path:
    """A tiny fit writing its run under ``root``; the config file itself goes to ``tmp_path`` (always writable)."""
    config = tiny_fit_config(
        tiny_kontext_path, manifest, root, model={"max_iterations": iterations}, name=name
    )
    config["image_logger"] = {"every_n_iterations": 0}  # keep the run's other files small
    config["checkpoint"] = {"every_n_iterations": 1, **checkpoint}
    return write_config(config, tmp_path / "configs" / f"{name}.yaml")


def _error_line(stderr: str) -> str:
    (line,) = [ln for ln in stderr.splitlines() if ": error: " in ln]
    return line


@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    path.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.slow
def test_file_size_limit_fails_the_save_in_one_line_keeping_the_previous_checkpoint(
    tiny_kontext_path, manifest, tmp_path
):
    root = tmp_path / "runs"
    first = _config(tiny_kontext_path, manifest, tmp_path, root, "run", iterations=1)
    assert console_main(["fit", "--config", str(first)]) == 0
    folder = root / "run" / "version_0" / "checkpoints"
    before = (folder / "last.ckpt").read_bytes()
    assert read_checkpoint(folder / "last.ckpt")["mtflow"]["iteration"] == 1 and len(before) > 32_000

    # resume into the same checkpoint folder with every file limited to 32 kB: the run's small files are written, the
    # checkpoint (about 60 kB) is not
    again = _config(tiny_kontext_path, manifest, tmp_path, root, "limited", iterations=2, dirpath=str(folder))
    limit = 32_000
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtflow",
            "fit",
            "--config",
            str(again),
            "--ckpt_path",
            str(folder / "last.ckpt"),
        ],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    line = _error_line(done.stderr)
    assert line == (
        f"mtflow fit: error: cannot write checkpoint {folder / 'last.ckpt'}: {os.strerror(errno.EFBIG)} "
        "(the previous checkpoint there is intact)"
    ), line
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]  # no last.ckpt.tmp
    assert (folder / "last.ckpt").read_bytes() == before
    status = RunStatus.read(root / "limited" / "version_0")
    assert status.status == "failed" and "cannot write checkpoint" in status.error and status.iteration == 2


@pytest.mark.skipif(not IS_ROOT, reason="mounting a tmpfs needs root")
def test_a_full_disk_fails_the_save_in_one_line_and_frees_what_it_wrote(
    tiny_kontext_path, manifest, tmp_path, capsys
):
    with _tmpfs(tmp_path / "small", "256k") as disk:
        filler = disk / "filler"
        stat = os.statvfs(disk)
        filler.write_bytes(
            b"\0" * (stat.f_bavail * stat.f_frsize - 48 * 1024)
        )  # 48 kB left: logs yes, a checkpoint no
        config = _config(tiny_kontext_path, manifest, tmp_path, disk / "runs", "full", iterations=2)
        assert console_main(["fit", "--config", str(config)]) == 1
        err = capsys.readouterr().err
        last = disk / "runs" / "full" / "version_0" / "checkpoints" / "last.ckpt"
        assert _error_line(err) == (
            f"mtflow fit: error: cannot write checkpoint {last}: {os.strerror(errno.ENOSPC)}"
        )
        assert "Traceback" not in err
        assert list(last.parent.iterdir()) == []  # the partial temporary file was removed
        status = RunStatus.read(disk / "runs" / "full" / "version_0")  # written once the space was freed
        assert status.status == "failed" and "No space left on device" in status.error


def _read_only(path: Path):
    """``path`` as a read-only folder: a tmpfs remounted read-only (root), else a folder without write permission."""
    if IS_ROOT:
        return _read_only_mount(path)
    path.mkdir(parents=True)
    path.chmod(0o555)
    return contextlib.nullcontext(path)


@contextlib.contextmanager
def _read_only_mount(path: Path):
    with _tmpfs(path, "1m"):
        (path / "existing").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path


def test_a_read_only_run_folder_fails_before_training_in_one_line(
    tiny_kontext_path, manifest, tmp_path, capsys
):
    with _read_only(tmp_path / "ro") as folder:
        config = _config(tiny_kontext_path, manifest, tmp_path, folder / "runs", "ro", iterations=1)
        assert console_main(["fit", "--config", str(config)]) == 1
        err = capsys.readouterr().err
        line = _error_line(err)
        reason = os.strerror(errno.EROFS) if IS_ROOT else os.strerror(errno.EACCES)
        assert line.startswith(f"mtflow fit: error: {reason}: {folder / 'runs'}"), line
        assert "Traceback" not in err


def test_a_read_only_checkpoint_folder_fails_the_first_save_in_one_line(
    tiny_kontext_path, manifest, tmp_path, capsys
):
    with _read_only(tmp_path / "ro") as folder:
        target = folder / "existing" if IS_ROOT else folder
        runs = tmp_path / "runs"
        config = _config(
            tiny_kontext_path, manifest, tmp_path, runs, "rockpt", iterations=1, dirpath=str(target)
        )
        assert console_main(["fit", "--config", str(config)]) == 1
        line = _error_line(capsys.readouterr().err)
        reason = os.strerror(errno.EROFS) if IS_ROOT else os.strerror(errno.EACCES)
        assert line == f"mtflow fit: error: cannot write checkpoint {target / 'last.ckpt'}: {reason}", line
        status = RunStatus.read(tmp_path / "runs" / "rockpt" / "version_0")
        assert status.status == "failed" and reason in status.error and status.iteration == 1
