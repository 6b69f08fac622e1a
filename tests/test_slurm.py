"""Slurm: the array script ``mtflow sweep slurm`` writes for a multi-node config passes what Lightning's
``SLURMEnvironment`` validates, a resubmission leaves completed runs alone, and the auto-requeue path (SIGUSR1 on
CPU, in a subprocess with Slurm's environment variables) saves at an iteration boundary, after which the requeued job
ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, Trainer

from mtflow.checkpoints import read_checkpoint
from mtflow.sweeps import RunStatus, load_plan
from mtflow.sweeps.cli import main as sweep_main
from mtflow.testing.fixtures import REPO_CONFIGS, tiny_fit_config, write_config, write_random_manifest
from mtflow.training.distributed import LoRAModelParallelStrategy

SLURM_VARIABLES = (
    "SLURM_JOB_ID",
    "SLURM_JOB_NAME",
    "SLURM_NTASKS",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_NNODES",
    "SLURM_NODELIST",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NODEID",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
)


def _grid(tmp_path: Path, **overrides) -> Path:
    grid = {
        "name": "multinode",
        "base_configs": [
            str(REPO_CONFIGS / "flux_kontext.yaml"),
            str(REPO_CONFIGS / "flux_kontext_grpo.yaml"),
        ],
        "overrides": {"trainer.devices": 8, "trainer.num_nodes": 2, **overrides},
        "axes": {"model.rollout.group_size": [8, 16]},
        "run_dir_keys": ["trainer.default_root_dir", "trainer.logger.init_args.save_dir"],
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def _directives(script: Path) -> dict[str, str]:
    found = {}
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH "):
            option, _, value = line[len("#SBATCH ") :].partition("=")
            found[option] = value
    return found


def _slurm_environment(directives: dict[str, str], monkeypatch) -> None:
    """The variables Slurm sets in each task of a job submitted with these directives (what Lightning reads)."""
    for name in SLURM_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    nodes, per_node = int(directives["--nodes"]), int(directives["--ntasks-per-node"])
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("SLURM_JOB_NAME", directives["--job-name"])
    monkeypatch.setenv("SLURM_NNODES", str(nodes))
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", str(per_node))
    monkeypatch.setenv("SLURM_NTASKS", str(nodes * per_node))
    monkeypatch.setenv("SLURM_NODELIST", "node[01-02]")
    for name in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID"):
        monkeypatch.setenv(name, "0")


def test_sweep_slurm_script_for_a_two_node_config_passes_lightnings_slurm_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sweep_main(["slurm", "--grid", str(_grid(tmp_path)), "--out", str(tmp_path / "sweep")]) == 0
    script = tmp_path / "sweep" / "slurm_array.sh"
    directives = _directives(script)
    assert directives["--nodes"] == "2" and directives["--ntasks-per-node"] == "8"  # one task per device
    assert directives["--gpus-per-node"] == "8"
    requeue = SLURMEnvironment(auto_requeue=True).requeue_signal
    assert directives["--signal"] == f"{requeue.name}@90" and "--requeue" in directives
    assert directives["--array"] == "0-1"
    text = script.read_text()
    (launch,) = [line for line in text.splitlines() if line.startswith("srun ")]
    assert launch == 'srun "${CMD[@]}"'
    commands = re.findall(r"CMD=\((.*)\) ;;", text)
    plan = load_plan(tmp_path / "sweep")
    for command, run in zip(commands, plan.runs):
        # a requeued or resubmitted task resumes from the run's newest checkpoint
        assert shlex.split(command)[1:] == [
            "-m",
            "mtflow",
            "fit",
            "--config",
            str(run.config_path),
            "--ckpt_path",
            "last",
        ]
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0

    # what Lightning checks when such a task starts: the srun variables, and devices / num_nodes against them
    _slurm_environment(directives, monkeypatch)
    environment = SLURMEnvironment()
    assert SLURMEnvironment.detect() and environment.world_size() == 16
    config = yaml.safe_load(next((tmp_path / "sweep" / "runs").glob("*/config.yaml")).read_text())
    devices, nodes = int(config["trainer"]["devices"]), int(config["trainer"]["num_nodes"])
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"].endswith("LoRAModelParallelStrategy")
    assert strategy["init_args"]["data_parallel_size"] == "auto"  # derived: 16 ranks here, never a fixed 8

    def launch_checks() -> Trainer:
        """A trainer of the run's shape (CPU for GPU) and the check its strategy runs before joining the job."""
        trainer = Trainer(
            accelerator="cpu",
            devices=devices,
            num_nodes=nodes,
            strategy=LoRAModelParallelStrategy(**strategy["init_args"]),
            logger=False,
        )
        trainer.strategy.validate_layout()
        return trainer

    trainer = launch_checks()
    cluster = trainer._accelerator_connector.cluster_environment
    assert isinstance(cluster, SLURMEnvironment) and cluster.auto_requeue
    assert trainer.world_size == 16 and trainer.strategy.num_processes == 8

    # the directives the script used to write (one task per node) fail the same checks
    _slurm_environment({**directives, "--ntasks-per-node": "1"}, monkeypatch)
    with pytest.raises(ValueError, match="ntasks-per-node=1"):
        launch_checks()


def test_resubmission_leaves_completed_runs_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    grid = str(_grid(tmp_path))
    args = ["slurm", "--grid", grid, "--out", str(tmp_path / "sweep"), "--python", sys.executable]
    assert sweep_main(args) == 0
    script = tmp_path / "sweep" / "slurm_array.sh"
    first = script.read_text()
    plan = load_plan(tmp_path / "sweep")
    RunStatus(status="completed", wall_clock_s=1.0, samples_seen=4, iteration=1).write(plan.runs[0].directory)
    RunStatus(status="failed", error="preempted").write(plan.runs[1].directory)

    # a task of the first array that starts after its run completed (requeue, resubmission) does nothing
    fake_srun = tmp_path / "bin" / "srun"
    fake_srun.parent.mkdir()
    fake_srun.write_text(f"#!/bin/bash\necho ran >> {tmp_path / 'srun.log'}\n")
    fake_srun.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_srun.parent}:{os.environ['PATH']}", "SLURM_JOB_ID": "7"}
    done = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": "0"}, capture_output=True)
    assert done.returncode == 0 and b"completed already" in done.stdout
    assert not (tmp_path / "srun.log").exists()
    done = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": "1"}, capture_output=True)
    assert done.returncode == 0 and (tmp_path / "srun.log").read_text() == "ran\n"

    # resubmitting writes an array of the runs left to do
    assert sweep_main(args) == 0
    assert _directives(script)["--array"] == "1" and "  0) RUN_DIR" not in script.read_text()
    assert "  1) RUN_DIR" in script.read_text() and script.read_text() != first
    RunStatus(status="completed").write(plan.runs[1].directory)
    capsys.readouterr()
    assert sweep_main(args) == 0
    assert "every run of 'multinode' is completed; nothing to submit" in capsys.readouterr().out


def test_runs_of_different_job_shapes_cannot_share_one_array(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    grid = yaml.safe_load(_grid(tmp_path).read_text())
    grid["axes"] = {"trainer.num_nodes": [1, 2]}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    assert sweep_main(["slurm", "--grid", str(tmp_path / "grid.yaml"), "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert "different job shapes" in err and "1 node(s) x 8 device(s)" in err and "2 node(s) x 8" in err


# ---------------------------------------------------------------------------------------------- auto-requeue
FAKE_SCONTROL = """#!/bin/bash
# stands in for Slurm's controller: `scontrol requeue <job>` stops the running job (SIGTERM) and queues it again
echo "$@" >> "$SCONTROL_LOG"
kill -TERM "$PPID"
"""


class RequeueSignalDuringUpdate(Callback):
    """Sends this process Slurm's requeue signal between the two optimiser steps of one RL iteration: the worst
    moment (one step applied, the other not, the iteration not counted), where a save made inside the signal
    handler, as Lightning's own would, holds a state no iteration boundary has."""

    def __init__(self, iteration: int = 2) -> None:
        self.iteration = iteration
        self.steps = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if pl_module.iteration == self.iteration - 1:
            self.steps += 1
            if self.steps == 2:
                os.kill(os.getpid(), signal.SIGUSR1)


def _fit(config_path: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mtflow", "fit", "--config", str(config_path)],
        env=env,
        cwd=config_path.parent,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_requeue_signal_saves_at_an_iteration_end_and_the_requeued_job_matches(tiny_kontext_path, tmp_path):
    manifest = write_random_manifest(tmp_path / "data", num_chains=8, num_turns=2)
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    base.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    tests = str(Path(__file__).parent)
    base["PYTHONPATH"] = os.pathsep.join([tests, *filter(None, [base.get("PYTHONPATH")])])

    def config(name: str, signal_at: int | None = None) -> Path:
        model = {"max_iterations": 4, "optim": {"updates_per_rollout": 2}}
        fit = tiny_fit_config(tiny_kontext_path, manifest, tmp_path / name, model=model, name="run")
        fit["checkpoint"] = {"every_n_iterations": 0}  # only the requeue save and the final one
        if signal_at is not None:
            probe = {
                "class_path": "test_slurm.RequeueSignalDuringUpdate",
                "init_args": {"iteration": signal_at},
            }
            fit["trainer"]["callbacks"] = [probe]
        return write_config(fit, tmp_path / name / "fit.yaml")

    reference = _fit(config("reference"), base)
    assert reference.returncode == 0, reference.stderr[-3000:]

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {
        **base,
        "PATH": f"{bin_dir}:{base['PATH']}",
        "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "mtflow-requeue",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "1",
        "SLURM_NODELIST": "localhost",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    root, run = tmp_path / "requeued", tmp_path / "requeued" / "run" / "version_0"
    job = _fit(config("requeued", signal_at=2), slurm)
    assert job.returncode == 143, job.stderr[-3000:]  # stopped by the SIGTERM of the requeue
    assert "stopped by SIGTERM" in job.stderr.strip().splitlines()[-1]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    (saved,) = root.glob("hpc_ckpt_*.ckpt")
    assert read_checkpoint(saved)["mtflow"]["iteration"] == 2  # the iteration in progress, finished
    status = RunStatus.read(run)
    assert status.status == "failed" and "SIGTERM after iteration 2" in status.error

    requeued = _fit(config("requeued"), {**slurm, "SLURM_RESTART_COUNT": "1"})  # as Slurm restarts the job
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {saved}" in requeued.stdout + requeued.stderr
    ours = read_checkpoint(run / "checkpoints" / "last.ckpt")
    theirs = read_checkpoint(tmp_path / "reference" / "run" / "version_0" / "checkpoints" / "last.ckpt")
    assert ours["mtflow"]["iteration"] == theirs["mtflow"]["iteration"] == 4
    assert ours["mtflow"]["samples_seen"] == theirs["mtflow"]["samples_seen"]
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    for key, value in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][key], value), key
    assert RunStatus.read(run).status == "completed"
