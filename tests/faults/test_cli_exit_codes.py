"""Every subcommand's failure exits non-zero with one line naming the problem (and no traceback); ``--version``
works. Run through ``console_main``, the body of the ``mtflow`` console script and of ``python -m mtflow`` (two of
the cases also as real processes)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mtflow import __version__
from mtflow.cli import console_main
from mtflow.sweeps import RunStatus
from mtflow.testing.fixtures import REPO_CONFIGS, write_random_manifest

TINY = str(REPO_CONFIGS / "tiny" / "grpo.yaml")
TOY = str(REPO_CONFIGS / "toy.yaml")


def _exit(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``mtflow <args>`` as the console script ends it."""
    try:
        code = console_main(args)
    except SystemExit as exit_:  # argument parsers exit by themselves (status 2), as in the script
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)  # what the interpreter prints for SystemExit("message")
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exit_codes")
    grpo_only = root / "grpo_only.ckpt"
    torch.save(
        {
            "state_dict": {},
            "mtflow": {"adapters": ["default"], "lora": {"rank": 2, "alpha": 4, "targets": []}},
        },
        grpo_only,
    )
    bad_grid = root / "bad_grid.yaml"
    bad_grid.write_text(yaml.safe_dump({"base_configs": [TOY], "axes": {"model.rollout.group_sise": [2, 4]}}))
    auto_grid = root / "auto_grid.yaml"
    auto_grid.write_text(
        yaml.safe_dump(
            {
                "base_configs": [TOY],
                "overrides": {"trainer.devices": "auto"},
                "axes": {"seed_everything": [0]},
            }
        )
    )
    many_grid = root / "many_grid.yaml"
    many_grid.write_text(
        yaml.safe_dump(
            {"base_configs": [TOY], "overrides": {"trainer.devices": 2}, "axes": {"seed_everything": [0, 1]}}
        )
    )
    cost_grid = root / "cost_grid.yaml"
    cost_grid.write_text(
        yaml.safe_dump(
            {
                "base_configs": [TOY],
                "axes": {"model.rollout.group_size": [4, 8]},
                "cost_match": {"key": "data.init_args.batch_size", "total": 32},
            }
        )
    )
    run = root / "run"
    RunStatus(status="running").write(run)
    manifest = write_random_manifest(root / "data", num_chains=2, num_turns=2)
    return {
        "root": root,
        "grpo_only": grpo_only,
        "bad_grid": bad_grid,
        "auto_grid": auto_grid,
        "many_grid": many_grid,
        "cost_grid": cost_grid,
        "run": run,
        "manifest": manifest,
    }


@pytest.fixture(scope="module")
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


CASES = [
    # (id, args (with {placeholders}), exit status, text the last stderr line must hold)
    ("unknown-command", ["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    (
        "fit-missing-manifest",
        [
            "fit",
            "--config",
            TINY,
            "--data.init_args.train_manifest={root}/nope.jsonl",
            "--trainer.default_root_dir={root}/fit",
            "--trainer.logger=false",
        ],
        1,
        "mtflow fit: error: manifest not found: {root}/nope.jsonl",
    ),
    (
        "fit-invalid-knob",
        [
            "fit",
            "--config",
            TINY,
            "--model.rollout.group_size=1",
            "--data.init_args.train_manifest={manifest}",
        ],
        1,
        "mtflow fit: error: rollout.group_size must be >= 2",
    ),
    ("fit-unknown-option", ["fit", "--config", TINY, "--model.rollout.group_sise=4"], 2, "group_sise"),
    (
        "validate-missing-checkpoint",
        ["validate", "--config", TOY, "--ckpt_path", "{root}/nope.ckpt"],
        1,
        "mtflow validate: error: checkpoint not found: {root}/nope.ckpt",
    ),
    (
        "test-no-last-checkpoint",
        [
            "test",
            "--config",
            TOY,
            "--ckpt_path",
            "last",
            "--trainer.logger.init_args.save_dir={root}/empty_runs",
            "--trainer.enable_progress_bar=false",
        ],
        1,
        "mtflow test: error: --ckpt_path last: no last.ckpt of this config's run found",
    ),
    (
        "export-missing-adapter",
        [
            "export",
            "--config",
            TOY,
            "--ckpt_path",
            "{grpo_only}",
            "--adapter",
            "ema",
            "--output_dir",
            "{root}/lora",
        ],
        1,
        "mtflow export: error: {grpo_only} has adapters ['default'], not 'ema'",
    ),
    (
        "export-unpickling-refused",
        [
            "export",
            "--config",
            TOY,
            "--ckpt_path",
            "{grpo_only}",
            "--weights_only=false",
            "--output_dir",
            "{root}/lora",
        ],
        1,
        "weights_only=false is refused",
    ),
    (
        "serve-reward-port-in-use",
        ["serve-reward", "--scorer", "mtflow.testing.scorers.BrightnessScorer", "--port", "{port}"],
        1,
        "mtflow serve-reward: error: Address already in use",
    ),
    ("serve-reward-bad-option", ["serve-reward", "--no-such-option", "1"], 2, "no-such-option"),
    ("data-unknown-command", ["data", "convert-everything"], 2, "unknown data command 'convert-everything'"),
    (
        "convert-edival-missing-csv",
        [
            "data",
            "convert-edival",
            "--csv",
            "{root}/nope.csv",
            "--images",
            "{root}",
            "--out",
            "{root}/m.jsonl",
        ],
        1,
        "convert-edival: error: [Errno 2]",
    ),
    (
        "sweep-expand-missing-grid",
        ["sweep", "expand", "--grid", "{root}/nope.yaml", "--out", "{root}/s1"],
        1,
        "sweep: error: file not found: {root}/nope.yaml",
    ),
    ("sweep-run-bad-key", ["sweep", "run", "--grid", "{bad_grid}", "--out", "{root}/s2"], 1, "group_sise"),
    (
        "sweep-run-parallel-multi-device",
        ["sweep", "run", "--grid", "{many_grid}", "--out", "{root}/s3", "--parallel", "2"],
        1,
        "side-by-side runs must each use one device",
    ),
    (
        "sweep-slurm-devices-auto",
        ["sweep", "slurm", "--grid", "{auto_grid}", "--out", "{root}/s4"],
        1,
        "a Slurm script needs numbers",
    ),
    (
        "sweep-wandb-axes-cost-match",
        ["sweep", "wandb", "--grid", "{cost_grid}", "--out", "{root}/s5", "--mode", "axes"],
        1,
        "cannot express cost_match",
    ),
    (
        "sweep-collect-missing",
        ["sweep", "collect", "{root}/nowhere"],
        1,
        "sweep: error: {root}/nowhere is not an expanded sweep",
    ),
    ("sweep-mark-failed-no-code", ["sweep", "mark-failed", "{run}"], 2, "--code"),
    ("sweep-is-completed-no", ["sweep", "is-completed", "{run}"], 1, ""),
]


@pytest.mark.parametrize(("args", "status", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_failure_exits_non_zero_naming_the_problem(args, status, needle, files, busy_port, capsys):
    values = {**{k: str(v) for k, v in files.items()}, "port": str(busy_port)}
    code, out, err = _exit([a.format(**values) for a in args], capsys)
    assert code == status, (code, err[-2000:])
    assert "Traceback" not in err
    assert needle.format(**values) in _last_line(err), err[-2000:]


def test_version(capsys):
    code, out, _ = _exit(["--version"], capsys)
    assert code == 0 and out.strip() == f"mtflow {__version__}"


def test_the_processes_exit_with_the_same_status(files):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    version = subprocess.run(
        [sys.executable, "-m", "mtflow", "--version"], capture_output=True, text=True, env=env
    )
    assert version.returncode == 0 and version.stdout.strip() == f"mtflow {__version__}"
    args = [
        "data",
        "convert-edival",
        "--csv",
        str(files["root"] / "nope.csv"),
        "--images",
        "x",
        "--out",
        "y.jsonl",
    ]
    convert = subprocess.run([sys.executable, "-m", "mtflow", *args], capture_output=True, text=True, env=env)
    assert convert.returncode == 1 and "convert-edival: error:" in convert.stderr
