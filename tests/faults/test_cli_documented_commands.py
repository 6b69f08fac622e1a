"""The commands the README documents for a finished run work against a real run folder, as typed (``runs/...`` is
the folder ``mtflow fit`` wrote): ``mtflow test`` and ``mtflow export`` with the run's saved ``config.yaml``, resume
with ``--ckpt_path last``, ``mtflow validate`` with the run's config. And every ``python -m`` entry point named in the
docs or configs runs (a module that fails on start, as ``tiny_kontext`` once did with a NameError, fails here)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mtflow.checkpoints import read_checkpoint
from mtflow.export import checkpoint_adapter
from mtflow.testing.fixtures import write_random_manifest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RUN = (
    "runs/tiny_grpo/version_0"  # where `mtflow fit --config configs/tiny/grpo.yaml` writes in a fresh folder
)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}


def _mtflow() -> list[str]:
    """The installed console script, as the README calls it (``python -m mtflow`` where it is not installed)."""
    script = Path(sys.executable).parent / "mtflow"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mtflow"]


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    words = shlex.split(command)
    assert words[0] == "mtflow", command
    done = subprocess.run(
        [*_mtflow(), *words[1:]], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done


def _readme_command(prefix: str) -> str:
    """The README's first command line starting with ``prefix`` (its trailing comment removed)."""
    readme = (REPO / "README.md").read_text()
    line = next(ln.strip() for ln in readme.splitlines() if ln.strip().startswith(prefix))
    return line.split("  #")[0].strip()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_kontext_path) -> Path:
    """A user's folder after `mtflow fit --config configs/tiny/grpo.yaml` (the config's relative paths present)."""
    root = tmp_path_factory.mktemp("user")
    (root / "configs").symlink_to(REPO / "configs")
    (root / "tiny-kontext").symlink_to(tiny_kontext_path)
    write_random_manifest(root, num_chains=8, num_turns=2)
    # held-out chains, as the paper config has (mtflow test evaluates them)
    _run(
        "mtflow fit --config configs/tiny/grpo.yaml --data.init_args.val_manifest=manifest.jsonl "
        "--trainer.enable_progress_bar=false",
        root,
    )
    assert (root / RUN / "config.yaml").is_file() and (root / RUN / "checkpoints" / "last.ckpt").is_file()
    return root


def test_readme_test_and_export_commands_work_on_a_real_run_folder(workdir):
    test = _readme_command("mtflow test --config runs/").replace("runs/...", RUN)
    export = _readme_command("mtflow export --config runs/").replace("runs/...", RUN)
    assert "runs/..." not in test + export and "config.yaml" in export

    _run(test, workdir)
    report = json.loads((workdir / "runs" / "tiny_grpo" / "version_1" / "eval" / "report.json").read_text())
    assert report["conditions"] and "model" in report["conditions"]

    shutil.rmtree(workdir / "lora", ignore_errors=True)
    _run(export, workdir)
    written = load_file(workdir / "lora" / "pytorch_lora_weights.safetensors")
    expected, _ = checkpoint_adapter(workdir / RUN / "checkpoints" / "last.ckpt")
    assert written.keys() == expected.keys() and written
    assert all(torch.equal(written[k], expected[k]) for k in expected)


def test_readme_resume_command_continues_the_run(workdir):
    resume = _readme_command(
        "mtflow fit --config configs/flux_kontext.yaml --config configs/flux_kontext_grpo.yaml --ckpt_path"
    )
    assert resume.endswith("--ckpt_path last")
    # the same command on the config this machine can train (the paper's needs GPUs and the hub)
    command = resume.replace(
        "--config configs/flux_kontext.yaml --config configs/flux_kontext_grpo.yaml",
        "--config configs/tiny/grpo.yaml",
    )
    before = read_checkpoint(workdir / RUN / "checkpoints" / "last.ckpt")["mtflow"]["iteration"]
    done = _run(f"{command} --model.max_iterations={before + 1} --trainer.enable_progress_bar=false", workdir)
    resumed = sorted((workdir / "runs" / "tiny_grpo").glob("version_*/checkpoints/last.ckpt"))[-1]
    assert read_checkpoint(resumed)["mtflow"]["iteration"] == before + 1
    restored = re.findall(r"Restoring states from the checkpoint path at (\S+)", done.stdout + done.stderr)
    assert [Path(workdir, p).resolve() for p in restored] == [
        (workdir / RUN / "checkpoints" / "last.ckpt").resolve()
    ]


def test_validate_takes_the_run_config_too(workdir):
    done = _run(
        f"mtflow validate --config {RUN}/config.yaml --ckpt_path {RUN}/checkpoints/last.ckpt", workdir
    )
    assert "val/" in done.stdout + done.stderr  # the per-turn validation metrics were computed and printed


# ---------------------------------------------------------------------------------------------- python -m
DOCUMENTS = ("README.md", "CONTRIBUTING.md", "BENCHMARKS.md", "docs/*.md", "configs/**/*.yaml")
STDLIB = {"venv"}


def _documented_modules() -> set[str]:
    found = set()
    for pattern in DOCUMENTS:
        for path in REPO.glob(pattern):
            found |= set(re.findall(r"python -m ([A-Za-z_][\w.]*)", path.read_text()))
    return found - STDLIB


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serves(command: list[str], url: str, cwd: Path, timeout_s: float = 300) -> int:
    """Start a server command, wait until ``url`` answers, stop it; returns the HTTP status it answered."""
    process = subprocess.Popen(command, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[0].decode()[-3000:]
            try:
                return httpx.get(url, timeout=2).status_code
            except httpx.TransportError:
                time.sleep(0.2)
        raise AssertionError(f"{command} did not answer {url} within {timeout_s} s")
    finally:
        process.terminate()
        process.wait(timeout=30)


def _check_module(module: str, tmp_path: Path, tiny_qwen3vl_path: Path) -> None:
    python = [sys.executable, "-m", module]
    if module == "mtflow":
        done = subprocess.run([*python, "--version"], capture_output=True, text=True, env=_env(), timeout=300)
        assert done.returncode == 0 and done.stdout.startswith("mtflow "), done.stderr[-2000:]
    elif module in (
        "mtflow.testing.tiny_kontext",
        "mtflow.testing.tiny_qwen3vl",
        "mtflow.testing.tiny_qwen_image_edit",
        "mtflow.testing.tiny_flux2_klein",
    ):
        out = tmp_path / module.rsplit(".", 1)[-1]
        done = subprocess.run([*python, str(out)], capture_output=True, text=True, env=_env(), timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        marker = "config.json" if module.endswith("tiny_qwen3vl") else "model_index.json"
        assert done.stdout.strip().splitlines()[-1] == str(out) and (out / marker).is_file()
    elif module == "mtflow.environment":
        done = subprocess.run(python, capture_output=True, text=True, env=_env(), timeout=300)
        assert done.returncode == 0 and "torch" in done.stdout and "lightning" in done.stdout
    elif module == "mtflow.sweeps":
        run = tmp_path / "run"
        run.mkdir()
        (run / "status.json").write_text(
            json.dumps({"status": "completed", "wall_clock_s": 1, "samples_seen": 4})
        )
        done = subprocess.run([*python, "is-completed", str(run)], env=_env(), timeout=120)
        assert done.returncode == 0
    elif module == "mtflow.reward.server":
        port = _free_port()
        config = tmp_path / "reward.yaml"
        config.write_text(
            yaml.safe_dump(
                {"scorer": {"class_path": "mtflow.testing.scorers.BrightnessScorer"}, "port": port}
            )
        )
        assert _serves([*python, "--config", str(config)], f"http://127.0.0.1:{port}/health", tmp_path) == 200
    elif module == "mtflow.reward.openai_compat_server":
        port = _free_port()
        command = [*python, "--model", str(tiny_qwen3vl_path), "--port", str(port)]
        assert _serves(command, f"http://127.0.0.1:{port}/v1/models", tmp_path) == 200
    else:
        raise AssertionError(f"docs name `python -m {module}`: add how to run it to this test")


def test_every_documented_python_m_entry_point_runs(tmp_path, tiny_qwen3vl_path):
    modules = _documented_modules()
    assert {"mtflow", "mtflow.testing.tiny_kontext", "mtflow.reward.server"} <= modules
    for module in sorted(
        modules | {"mtflow.sweeps", "mtflow.environment"}
    ):  # named by the Slurm script, CONTRIBUTING
        _check_module(module, tmp_path, tiny_qwen3vl_path)
