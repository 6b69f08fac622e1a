"""The ``mtflow`` command line: help, printed configs carrying the paper values, stacked configs, extra
subcommands, and bad manifests failing before any rollout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml

from mtflow.cli import main
from mtflow.testing.fixtures import (
    REPO_CONFIGS,
    printed_fit_config,
    tiny_fit_config,
    write_config,
    write_random_manifest,
)


@pytest.mark.parametrize(
    "overlay,algorithm", [("flux_kontext_grpo.yaml", "GRPO"), ("flux_kontext_nft.yaml", "NFT")]
)
def test_paper_configs_print_the_paper_values(capsys, overlay, algorithm):
    printed = printed_fit_config(capsys, "flux_kontext.yaml", overlay)
    model = printed["model"]
    policy = model["policy"]["init_args"]
    rollout, advantage, optim = model["rollout"], model["advantage"], model["optim"]
    assert model["algorithm"]["class_path"] == f"mtflow.algorithms.{algorithm}"
    assert (rollout["group_size"], rollout["num_steps"], advantage["lambda_cc"]) == (16, 12, 0.3)
    assert (advantage["fusion"], advantage["broadcast"], advantage["aggregation"]) == (
        "advantage",
        "trajectory",
        "mean",
    )
    assert advantage["a_max"] == 5.0 and optim["lr"] == 3e-4
    assert policy["pretrained"] == "black-forest-labs/FLUX.1-Kontext-dev"
    assert (policy["resolution"], policy["guidance_scale"], policy["lora_rank"], policy["lora_alpha"]) == (
        512,
        2.5,
        32,
        32,
    )
    assert printed["data"]["init_args"]["num_turns"] == 3
    assert model["scorer"]["class_path"] == "mtflow.reward.client.RemoteScorer"
    assert model["scorer"]["init_args"]["url"].startswith("http://")
    args = model["algorithm"]["init_args"]
    if algorithm == "GRPO":
        assert (args["noise_level"], args["clip_eps"], args["beta_kl"]) == (0.9, 1e-4, 0.0)
        assert model["ema_decay"] is None
    else:
        assert (args["beta"], args["rollout_noise_level"], model["ema_decay"]) == (1.0, 0.0, 0.9)
        assert "clip_eps" not in args  # an NFT run carries no GRPO knob


def test_the_paper_base_alone_is_grpo_with_the_paper_knobs(capsys):
    base = printed_fit_config(capsys, "flux_kontext.yaml")
    overlay = printed_fit_config(capsys, "flux_kontext.yaml", "flux_kontext_grpo.yaml")
    assert base["model"]["algorithm"] == overlay["model"]["algorithm"]


def test_stacked_configs_and_command_line_overrides(capsys):
    paper = ("flux_kontext.yaml", "flux_kontext_grpo.yaml")
    printed = printed_fit_config(capsys, *paper, "ablations/G8.yaml", extra=("--model.rollout.num_steps=6",))
    assert printed["model"]["rollout"]["group_size"] == 8 and printed["model"]["rollout"]["num_steps"] == 6
    printed = printed_fit_config(capsys, *paper, "ablations/window.yaml")
    args = printed["model"]["algorithm"]["init_args"]
    assert args["stochastic"] == "window" and args["clip_eps"] == 1e-5 and args["noise_level"] == 0.9
    # the short form switches algorithm; the GRPO knobs of the config do not follow it
    printed = printed_fit_config(capsys, *paper, extra=("--model.algorithm", "NFT"))
    assert printed["model"]["algorithm"]["class_path"] == "mtflow.algorithms.NFT"
    assert "clip_eps" not in printed["model"]["algorithm"]["init_args"]


@pytest.mark.parametrize(
    ("configs", "extra", "option"),
    [
        (("toy.yaml", "toy_nft.yaml"), ("--model.algorithm.clip_eps=0.1",), "clip_eps"),  # GRPO knob on NFT
        (("toy.yaml", "toy_nft.yaml"), ("--model.algorithm.beta_kl=0.1",), "beta_kl"),
        (("toy.yaml",), ("--model.algorithm.train_timesteps=2",), "train_timesteps"),  # NFT knob on GRPO
        (("toy.yaml",), ("--model.algorithm.beta=0.5",), "beta"),
        (("toy.yaml",), ("--model.clip_eps=0.1",), "clip_eps"),  # v0.1's flat name
        (("toy.yaml",), ("--model.nft_beta=0.5",), "nft_beta"),
    ],
)
def test_an_option_of_the_other_algorithm_is_refused_naming_it(capsys, configs, extra, option):
    args = ["fit"]
    for config in configs:
        args += ["--config", str(REPO_CONFIGS / config)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, *extra, "--print_config"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert option in err and ("not accepted" in err or "unrecognized arguments" in err), err[-500:]


def test_an_algorithm_option_in_a_yaml_file_is_refused_when_the_config_is_read(capsys, tmp_path):
    overlay = write_config(
        {"model": {"algorithm": {"class_path": "mtflow.algorithms.NFT", "init_args": {"clip_eps": 1e-3}}}},
        tmp_path / "wrong.yaml",
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO_CONFIGS / "toy.yaml"), "--config", str(overlay), "--print_config"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Option 'clip_eps' is not accepted" in err and "mtflow.algorithms.NFT" in err


def test_reward_server_config_builds(capsys):
    from mtflow.reward.server import main as serve_main

    with pytest.raises(SystemExit) as exit_info:
        serve_main(["--config", str(REPO_CONFIGS / "reward_server.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["host"] == "127.0.0.1"
    assert printed["scorer"]["init_args"]["mode"] == "thinking"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--help"], "fit"),
        (["fit", "--help"], "--model.rollout.group_size"),
        (["export", "--help"], "--ckpt_path"),
        (["serve-reward", "--help"], "--port"),
        (["data", "convert-edival", "--help"], "csv"),
        (["sweep", "--help"], "collect"),
    ],
)
def test_help(capsys, args, needle):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)
    assert needle in capsys.readouterr().out


def test_top_level_help_names_every_command_and_predict_is_refused(capsys):
    # LightningCLI's parser only knows its own subcommands; the ones main() dispatches first must still be listed.
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for command in ("mtflow serve-reward", "mtflow data convert-edival", "mtflow sweep", "export"):
        assert command in shown
    assert "predict" not in shown
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--config", str(REPO_CONFIGS / "toy.yaml")])
    assert exit_info.value.code == 2  # refused by the parser, before any model is loaded
    assert "invalid choice: 'predict'" in capsys.readouterr().err


def test_bad_manifest_fails_before_training_with_line_numbers(tiny_kontext_path, tmp_path):
    manifest = write_random_manifest(tmp_path / "data", num_chains=3, num_turns=3)
    lines = manifest.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["instructions"] = bad["instructions"][:2]  # 2 instructions where K = 3
    worse = json.loads(lines[2])
    worse["image"] = "missing.png"
    lines[1], lines[2] = json.dumps(bad), json.dumps(worse)
    lines.append(json.dumps({"id": "x", "image": "src_0000.png", "instructions": ["a", "", "c"]}))
    manifest.write_text("\n".join(lines) + "\n")
    config = tiny_fit_config(tiny_kontext_path, manifest, tmp_path, num_turns=3, name="bad")
    with pytest.raises(ValueError) as error:
        main(["fit", "--config", str(write_config(config, tmp_path / "bad.yaml"))])
    message = str(error.value)
    assert "manifest.jsonl:2" in message and "manifest.jsonl:3" in message and "manifest.jsonl:4" in message
    assert not (tmp_path / "bad" / "version_0" / "metrics.csv").exists()  # nothing was rolled out


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("--model.rollout.group_size=1", "every advantage is 0"),
        ("--model.algorithm.noise_level=0", "GRPO needs stochastic"),
        ("--model.algorithm.noise_level=-1", "GRPO needs stochastic"),
        ("--model.rollout.forward_batch_size=0", "forward_batch_size must be >= 1"),
        ("--model.evaluation.num_steps=0", "num_steps must be >= 1"),
        ("--model.optim.updates_per_rollout=0", "updates_per_rollout must be >= 1"),
    ],
)
def test_knobs_that_cannot_train_fail_when_the_module_is_built(tiny_kontext_path, tmp_path, override, needle):
    """Refused at instantiation, with the reason, not after a model load and a rollout (or, for G = 1, never:
    it used to run and learn nothing)."""
    manifest = write_random_manifest(tmp_path / "data", num_chains=2, num_turns=2)
    config = tiny_fit_config(tiny_kontext_path, manifest, tmp_path, num_turns=2, name="knob")
    with pytest.raises(ValueError, match=needle):
        main(["fit", "--config", str(write_config(config, tmp_path / "knob.yaml")), override])
    assert not (tmp_path / "knob").exists()  # no run folder: nothing was loaded or rolled out


def test_console_script_exits_zero_and_counts_progress_in_iterations(tiny_kontext_path, tmp_path):
    """The installed ``mtflow`` script (a subprocess, as a user runs it): a successful fit exits 0 without printing
    the CLI object, and the progress bar ends at max_iterations, not at the end of the epoch."""

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "mtflow"]
    assert script.value == "mtflow.cli:console_main"
    manifest = write_random_manifest(tmp_path / "data", num_chains=8, num_turns=2)
    config = tiny_fit_config(
        tiny_kontext_path,
        manifest,
        tmp_path,
        model={"max_iterations": 2},
        trainer={"enable_progress_bar": True},
        data={"batch_size": 1},
        name="console",
    )
    path = write_config(config, tmp_path / "console.yaml")
    code = "import sys; from mtflow.cli import console_main; sys.exit(console_main())"
    done = subprocess.run(
        [sys.executable, "-c", code, "fit", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MtflowCLI object" not in done.stdout + done.stderr
    assert "args parameter is intended" not in done.stderr  # Lightning's warning about our own argument list
    assert "Tip:" not in done.stdout + done.stderr  # nor its advertisement for a cloud logger
    assert "RL iterations" in done.stdout and "2/2" in done.stdout, done.stdout[-2000:]
    assert "8/8" not in done.stdout  # the epoch's length is not the bar's length


REPO = Path(__file__).resolve().parents[1]
# build artefacts and local run folders of a checkout (as in .gitignore) that a wheel must not be built from
BUILD_LEFTOVERS = {
    ".git",
    "build",
    "dist",
    "mtflow.egg-info",
    ".venv",
    "venv",
    "runs",
    "outputs",
    "lightning_logs",
    "tmp",
}


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    """The file names inside a wheel built (``pip wheel . --no-deps``) from a copy of the checkout without its build
    leftovers: pip builds in the source tree and setuptools packs whatever an earlier build left in ``build/lib``,
    so a module deleted since (e.g. the former ``mtflow/bench/``) would ship again from a developer's checkout."""
    import shutil
    import zipfile

    root = tmp_path_factory.mktemp("wheel")

    def leftovers(folder: str, names: list[str]) -> set[str]:
        skipped = {n for n in names if n in ("__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis")}
        return skipped | (BUILD_LEFTOVERS & set(names) if Path(folder) == REPO else set())

    source = Path(shutil.copytree(REPO, root / "source", ignore=leftovers))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(root / "dist")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (root / "dist").glob("mtflow-*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


def test_wheel_ships_the_default_config_kernels_and_toy_assets(wheel_names):
    """A non-editable install has no checkout around it: the wheel itself must hold configs (``mtflow fit``'s
    default), the remapped kernels package and the toy prior the default config names."""
    names = wheel_names
    for name in (
        "mtflow/configs/toy.yaml",
        "mtflow/configs/toy_nft.yaml",
        "mtflow/configs/tiny/grpo.yaml",
        "mtflow/configs/ablations/G8.yaml",
        "mtflow/kernels/sde.py",
        "mtflow/toy/assets/prior/transformer/diffusion_pytorch_model.safetensors",
        "mtflow/toy/assets/vae/diffusion_pytorch_model.safetensors",
    ):
        assert name in names, name
    assert not any(n.startswith(("tests/", "configs/", "kernels/")) for n in names)


def test_wheel_ships_the_library_only(wheel_names):
    """The wheel holds the ``mtflow`` package and its metadata, nothing else: no benchmark machinery (it lives in
    ``tools/benchkit``, next to ``tools/bench.py``), no ``tools/`` script or module; every Python module in it comes
    from the library's sources (``mtflow/``, ``kernels/`` as ``mtflow.kernels``, ``configs/`` as ``mtflow.configs``).
    The algorithms, the kernels and the configs are all there."""
    names = wheel_names
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not (t.startswith("mtflow-") and t.endswith(".dist-info"))} == {"mtflow"}, top
    assert (REPO / "tools" / "benchkit" / "harness.py").is_file()  # what must stay out is really there
    assert not any(n.startswith(("mtflow/bench/", "tools/")) or "benchkit" in n for n in names)
    sources = {"mtflow/kernels/": REPO / "kernels", "mtflow/configs/": REPO / "configs"}
    for name in (n for n in names if n.endswith(".py")):
        prefix = next((p for p in sources if name.startswith(p)), None)
        origin = sources[prefix] / name[len(prefix) :] if prefix else REPO / name
        if prefix == "mtflow/kernels/" and not origin.is_file():
            origin = REPO / name  # mtflow/kernels/__init__.py, the package itself
        assert origin.is_file(), f"{name} in the wheel is not a library source"
    expected = {f"mtflow/algorithms/{p.name}" for p in (REPO / "mtflow" / "algorithms").glob("*.py")}
    expected |= {f"mtflow/kernels/{p.name}" for p in (REPO / "kernels").glob("*.py")}
    expected |= {
        f"mtflow/configs/{p.relative_to(REPO / 'configs').as_posix()}"
        for p in (REPO / "configs").rglob("*.yaml")
    }
    assert {"mtflow/algorithms/nft.py", "mtflow/kernels/sde.py", "mtflow/configs/toy.yaml"} <= expected
    assert not sorted(expected - names), sorted(expected - names)
