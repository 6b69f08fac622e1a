"""The top-level ``kernels/`` folder (the project's layout) must never shadow an installed ``kernels`` distribution.

transformers (5.25 and later) depends on Hugging Face's ``kernels`` and, when its metadata is present, runs
``from kernels import ...`` while diffusers imports the Flux pipelines. With the repository root on ``sys.path``
(``python -m`` / ``python -c`` from the checkout, subprocesses started there, as the reward-server tests do) a
``kernels/__init__.py`` made ``import kernels`` find the project's folder instead, and the import failed."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
REPO = sys.argv[1]
import diffusers.pipelines.flux.pipeline_flux_kontext
import kernels
import mtflow.kernels
from mtflow.kernels import grpo_loss, nft_loss, sde_step, transition_log_prob
from mtflow.kernels import _triton_common
print(json.dumps({"kernels": kernels.__file__, "repo_on_path": sys.path[0] in ("", REPO),
                  "mtflow_kernels": mtflow.kernels.sde_step.__module__}))
"""


def test_installed_kernels_distribution_wins_from_the_repository_root():
    # the Hugging Face distribution is in the dev extras, so this always checks the case that broke CI
    dist = metadata.distribution("kernels")
    installed = Path(str(dist.locate_file("kernels/__init__.py"))).resolve()
    for args in (
        ["-c", PROBE, str(REPO)],
        ["-m", "mtflow.environment"],
    ):  # both put the repo root first on sys.path
        done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        if args[0] == "-c":
            found = json.loads(done.stdout.strip().splitlines()[-1])
            assert found["repo_on_path"]  # the probe really ran with the checkout first on sys.path
            assert Path(found["kernels"]).resolve() == installed
            assert found["mtflow_kernels"] == "mtflow.kernels.sde"
        else:
            assert "kernels" in done.stdout and "transformers" in done.stdout


def test_the_kernels_folder_is_not_a_regular_package():
    """A ``kernels/__init__.py`` is exactly what shadows the distribution; the modules live there without one."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert (REPO / "kernels" / "sde.py").is_file()
