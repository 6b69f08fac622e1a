"""Every YAML in ``configs/`` builds: its classes are instantiated (not only printed with ``--print_config``), with the
network endpoints pointed at loopback servers this test starts, and the built objects carry the YAML's values.
The judge endpoints are really called: the paper configs' ``RemoteScorer`` scores through a loopback reward server
that checks the bearer token, ``reward_server.yaml``'s OpenAI backend through a loopback OpenAI-protocol server
over the tiny Qwen3-VL. Commands that never call the judge (``export``, ``sweep expand``) do not build it."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mtflow.cli import MtflowCLI, _cli_setup, main, resolve_fit_config
from mtflow.reward.base import ScoringItem
from mtflow.reward.server import BackgroundServer, create_app
from mtflow.testing.fixtures import REPO_CONFIGS, write_random_manifest
from mtflow.testing.scorers import BrightnessScorer

TOKEN_ENV = "MTFLOW_REWARD_TOKEN"
PAPER = ("flux_kontext.yaml", "flux_kontext_grpo.yaml")
# Overlays and the stack each is meant for (their header comments say so); any other overlay (ablations, layouts,
# ...) is stacked on the paper base with its default algorithm overlay.
STACKS: dict[str, tuple[str, ...]] = {
    "toy.yaml": (),
    "toy_nft.yaml": ("toy.yaml",),
    "toy_long.yaml": ("toy.yaml",),
    "toy_drift.yaml": ("toy.yaml",),
    "tiny/grpo.yaml": (),
    "tiny/nft.yaml": (),
    "tiny/qwen_image_edit_grpo.yaml": (),
    "tiny/qwen_image_edit_nft.yaml": (),
    "tiny/flux2_klein_grpo.yaml": (),
    "tiny/flux2_klein_nft.yaml": (),
    "flux_kontext.yaml": (),
    "flux_kontext_grpo.yaml": ("flux_kontext.yaml",),
    "flux_kontext_nft.yaml": ("flux_kontext.yaml",),
}


def _all_yamls() -> list[str]:
    return sorted(p.relative_to(REPO_CONFIGS).as_posix() for p in REPO_CONFIGS.rglob("*.yaml"))


def _kind(name: str) -> str:
    data = yaml.safe_load((REPO_CONFIGS / name).read_text()) or {}
    if "base_configs" in data:
        return "grid"
    if "scorer" in data and "model" not in data:
        return "reward_server"
    return "fit"


def _fit_stacks() -> list[tuple[str, ...]]:
    stacks = []
    for name in _all_yamls():
        if _kind(name) != "fit":
            continue
        stacks.append((*STACKS.get(name, PAPER), name))
    return stacks


def _grid_stacks(tmp_path: Path) -> list[tuple[str, list[str]]]:
    """The first and the last run of every shipped grid (its axes' extremes) as ``mtflow fit`` arguments: the grid's
    base config stack, overrides, axis and cost-matched values."""
    from mtflow.sweeps.grid import load_grid, resolve_run_config

    runs = []
    for name in _all_yamls():
        if _kind(name) == "grid":
            grid = load_grid(REPO_CONFIGS / name)
            assignments = grid.assignments()
            for index in sorted({0, len(assignments) - 1}):
                folder = tmp_path / Path(name).stem / f"r{index}"
                _, derived = resolve_run_config(grid, assignments[index], folder, run_name=folder.name)
                runs.append(
                    (f"{Path(name).stem}:r{index}", grid.fit_arguments(assignments[index], folder, derived))
                )
    return runs


def test_every_yaml_is_covered():
    """A new config file is built by this module without anyone editing it (or it fails here, by kind)."""
    covered = {n for stack in _fit_stacks() for n in stack}
    covered |= {n for n in _all_yamls() if _kind(n) in ("grid", "reward_server")}
    assert covered == set(_all_yamls())
    assert {_kind(n) for n in _all_yamls()} == {"fit", "grid", "reward_server"}


# ---------------------------------------------------------------------------------------------- loopback services
@pytest.fixture(scope="module")
def reward_service():
    """Two reward services (a BrightnessScorer behind mtflow's server app) on loopback, bearer token required: a
    config listing several endpoints gets distinct ones (a URL listed twice is refused)."""
    first = create_app(BrightnessScorer(), token="loopback-secret")
    second = create_app(BrightnessScorer(), token="loopback-secret")
    with BackgroundServer(first) as one, BackgroundServer(second) as two:
        yield one.url, two.url


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_kontext_path, tiny_qwen_image_edit_path, tiny_flux2_klein_path) -> Path:
    """The relative paths the shipped configs name (data/train.jsonl, data/edival.jsonl, manifest.jsonl,
    tiny-kontext and the other tiny editors), as in a user's working folder."""
    root = tmp_path_factory.mktemp("workdir")
    manifest = write_random_manifest(root / "data", num_chains=4, num_turns=3)
    for name in ("train.jsonl", "edival.jsonl"):
        shutil.copy(manifest, root / "data" / name)
    write_random_manifest(root, num_chains=4, num_turns=2)  # ./manifest.jsonl of configs/tiny
    (root / "tiny-kontext").symlink_to(tiny_kontext_path)
    (root / "tiny-qwen-image-edit").symlink_to(tiny_qwen_image_edit_path)
    (root / "tiny-flux2-klein").symlink_to(tiny_flux2_klein_path)
    return root


def _endpoints(value: Any, url: str | tuple[str, ...], path: str = "") -> tuple[Any, list[str]]:
    """``value`` with every http(s) URL replaced by ``url`` (keeping an OpenAI ``/v1`` suffix); the keys replaced.
    Several ``url``: the i-th URL of a list gets the i-th of them (round robin), a single URL the first."""
    urls = (url,) if isinstance(url, str) else tuple(url)
    if isinstance(value, dict):
        out, found = {}, []
        for key, item in value.items():
            out[key], inner = _endpoints(item, urls, f"{path}.{key}")
            found += inner
        return out, found
    if isinstance(value, list):
        pairs = [
            _endpoints(item, urls[i % len(urls) :] + urls[: i % len(urls)], f"{path}[{i}]")
            for i, item in enumerate(value)
        ]
        return [p[0] for p in pairs], [k for p in pairs for k in p[1]]
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        return urls[0] + ("/v1" if value.rstrip("/").endswith("/v1") else ""), [path]
    return value, []


def _matching_attributes(obj: Any, init_args: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The scalar init arguments ``obj`` keeps under the same name: name -> (built value, YAML value)."""
    return {
        key: (getattr(obj, key), value)
        for key, value in init_args.items()
        if isinstance(value, (int, float, str, bool)) and hasattr(obj, key)
    }


def _items(num: int = 3, turns: int = 2) -> list[ScoringItem]:
    rng = np.random.default_rng(0)
    image = lambda: Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))  # noqa: E731
    return [
        ScoringItem(f"c{i}/g0", f"c{i}", image(), [image() for _ in range(turns)], ["make it red"] * turns)
        for i in range(num)
    ]


# ---------------------------------------------------------------------------------------------- fit configs
def _build(
    args: list[str], workdir: Path, reward_url: tuple[str, ...], tmp_path: Path, monkeypatch
) -> tuple[MtflowCLI, dict]:
    monkeypatch.chdir(workdir)
    monkeypatch.setenv(TOKEN_ENV, "loopback-secret")
    resolved = resolve_fit_config(args)
    scorer, replaced = _endpoints(resolved["model"]["scorer"], reward_url)
    resolved["model"]["scorer"] = scorer  # what the built scorer must hold
    overlay = tmp_path / "loopback.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"scorer": scorer}}))
    extra = ["--config", str(overlay), f"--trainer.default_root_dir={tmp_path}"]
    if str(resolved["trainer"].get("accelerator")) in ("gpu", "cuda"):
        extra.append("--trainer.accelerator=cpu")  # the one substitution besides endpoints: no GPU here
    logger = resolved["trainer"].get("logger")
    if isinstance(logger, dict) and "save_dir" in (logger.get("init_args") or {}):
        extra.append(f"--trainer.logger.init_args.save_dir={tmp_path}")
    cli = _BuildOnly(**_cli_setup(), args=["fit", *args, *extra])
    return cli, {"resolved": resolved, "endpoints": replaced}


class _BuildOnly(MtflowCLI):
    """``mtflow fit <args>`` up to the built trainer, model and data module: everything but running the fit."""

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def _check_built(cli: MtflowCLI, resolved: dict, endpoints: list[str]) -> None:
    model = resolved["model"]
    for key in ("policy", "scorer", "algorithm"):
        built, entry = getattr(cli.model, key), model[key]
        assert f"{type(built).__module__}.{type(built).__name__}" == entry["class_path"] or entry[
            "class_path"
        ].endswith(f".{type(built).__name__}"), (key, entry["class_path"], type(built))
        for name, (got, want) in _matching_attributes(built, entry.get("init_args") or {}).items():
            assert got == want, (key, name, got, want)
    rollout = cli.model.rollout_config
    assert (rollout.group_size, rollout.num_steps) == (
        model["rollout"]["group_size"],
        model["rollout"]["num_steps"],
    )
    assert cli.model.max_iterations == model["max_iterations"]
    data = resolved["data"]
    assert type(cli.datamodule).__name__ == data["class_path"].rsplit(".", 1)[-1]
    assert cli.datamodule.batch_size == data["init_args"]["batch_size"]
    cli.datamodule.setup("fit")  # manifests validated, toy world built
    assert cli.datamodule.sources.get("train") is not None
    trainer = resolved["trainer"]
    devices = trainer["devices"]
    if isinstance(devices, int):
        assert cli.trainer.num_devices == devices and cli.trainer.num_nodes == trainer["num_nodes"]
    strategy = trainer.get("strategy")
    if isinstance(strategy, dict):
        assert type(cli.trainer.strategy).__name__ == strategy["class_path"].rsplit(".", 1)[-1]
    (checkpoint,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "IterationCheckpoint"]
    assert checkpoint.every_n_iterations == resolved["checkpoint"]["every_n_iterations"]
    if endpoints:  # the judge is reached through the loopback endpoint, with the config's token variable
        items = _items(turns=data["init_args"]["num_turns"])
        remote, local = cli.model.scorer.score(items), BrightnessScorer().score(items)
        assert bool(remote.scored.all())
        torch.testing.assert_close(remote.instruction_following, local.instruction_following)
        torch.testing.assert_close(remote.content_consistency, local.content_consistency)


@pytest.mark.parametrize("stack", _fit_stacks(), ids=lambda s: "+".join(s))
def test_fit_config_stack_builds(stack, workdir, reward_service, tmp_path, monkeypatch):
    args = [a for name in stack for a in ("--config", str(REPO_CONFIGS / name))]
    cli, info = _build(args, workdir, reward_service, tmp_path, monkeypatch)
    _check_built(cli, info["resolved"], info["endpoints"])
    if info["resolved"]["model"]["scorer"]["class_path"].endswith("RemoteScorer"):
        assert info["endpoints"], "a remote judge with no endpoint to point at the loopback server"


def test_every_sweep_run_config_builds(workdir, reward_service, tmp_path, monkeypatch):
    monkeypatch.chdir(workdir)
    runs = _grid_stacks(tmp_path)
    assert len(runs) == 2 * sum(_kind(n) == "grid" for n in _all_yamls())
    for name, args in runs:
        folder = tmp_path / name.replace(":", "_")
        folder.mkdir()
        cli, info = _build(args, workdir, reward_service, folder, monkeypatch)
        _check_built(cli, info["resolved"], info["endpoints"])


# ---------------------------------------------------------------------------------------------- reward server
def test_reward_server_config_builds_and_reaches_its_openai_endpoint(tiny_qwen3vl_path, monkeypatch):
    from mtflow.reward.backends import TransformersBackend
    from mtflow.reward.openai_compat_server import create_openai_compat_app
    from mtflow.reward.prompts import JudgePrompt
    from mtflow.reward.server import build_parser

    shipped = yaml.safe_load((REPO_CONFIGS / "reward_server.yaml").read_text())
    served = shipped["scorer"]["init_args"]["backend"]["init_args"]["model"]  # what `vllm serve` would serve
    backend = TransformersBackend(str(tiny_qwen3vl_path), max_batch_size=4)
    app = create_openai_compat_app(backend, served, max_logprobs=32)
    monkeypatch.setenv(TOKEN_ENV, "loopback-secret")
    monkeypatch.setenv(
        "JUDGE_API_KEY", "unused-by-the-loopback-server"
    )  # the key's optionality: reward-service work
    with BackgroundServer(app) as judge:
        scorer, replaced = _endpoints(shipped["scorer"], judge.url)
        assert replaced == [".init_args.backend.init_args.base_url"]
        parser = build_parser()
        config = parser.parse_args(
            ["--config", str(REPO_CONFIGS / "reward_server.yaml"), "--scorer", yaml.safe_dump(scorer)]
        )
        built = parser.instantiate(config)
        for key in ("host", "port", "max_batch_size", "max_wait_ms"):
            assert built[key] == shipped[key], key
        judge_scorer = built["scorer"]
        assert type(judge_scorer).__name__ == "VLMJudge"
        for name, (got, want) in _matching_attributes(judge_scorer, shipped["scorer"]["init_args"]).items():
            assert got == want, name
        # one short request through the built backend: it reaches the loopback endpoint under the served name
        # (the test server answers 404 for any other model name)
        prompt = JudgePrompt(
            system="You are a judge.", content=["Rate this image.", _items(1)[0].source], criterion="if"
        )
        (generation,) = judge_scorer.backend.generate([prompt], max_new_tokens=2)
    assert generation.error is None and isinstance(generation.text, str), generation
    (received,) = list(app.state.received)
    assert received["max_tokens"] == 2 and len(received["images"]) == 1


# ---------------------------------------------------------------------------------------------- no judge needed
def test_export_of_the_paper_config_needs_no_judge_token_and_no_gpu(tmp_path, monkeypatch):
    """``mtflow export --config <paper config>`` on a machine without the judge's token (or a GPU) writes the LoRA;
    neither the judge nor the policy is built."""
    from safetensors.torch import load_file

    from mtflow.models.kontext import KontextPolicy
    from mtflow.reward.client import RemoteScorer

    built = []
    for cls in (RemoteScorer, KontextPolicy):
        monkeypatch.setattr(cls, "__init__", _recording(cls.__init__, built))
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    fixture = Path(__file__).parent / "data" / "v0_1"
    args = ["export", *(a for name in PAPER for a in ("--config", str(REPO_CONFIGS / name)))]
    main([*args, "--ckpt_path", str(fixture / "toy_grpo_ema.ckpt"), "--output_dir", str(tmp_path)])
    assert built == []
    ours, theirs = (
        load_file(tmp_path / "pytorch_lora_weights.safetensors"),
        load_file(fixture / "export_default.safetensors"),
    )
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def _recording(init, calls: list):
    """``init`` that also records its class (``functools.wraps`` keeps the signature the config parser reads)."""

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        calls.append(type(self))
        return init(self, *args, **kwargs)

    return wrapper


def test_sweep_expand_of_a_paper_grid_needs_no_judge_token(tmp_path, monkeypatch):
    from mtflow.sweeps.cli import main as sweep_main

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert (
        sweep_main(["expand", "--grid", str(REPO_CONFIGS / "sweeps/G_T.yaml"), "--out", str(tmp_path)]) == 0
    )
    config = yaml.safe_load(next((tmp_path / "runs").glob("*/config.yaml")).read_text())
    assert config["model"]["scorer"]["init_args"]["token_env"] == TOKEN_ENV
