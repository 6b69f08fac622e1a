"""A token typed on the command line (``--model.scorer.init_args.token``) is used, but never written to disk: not in
the run's ``config.yaml``, ``hparams.yaml``, checkpoints or any other file of the run. The saved config is re-used
with ``token_env``. Nested secrets (an OpenAI backend's ``api_key`` inside a judge) go back to their defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from jsonargparse import Namespace

from mtflow.cli import console_main, redact_secrets
from mtflow.reward.server import BackgroundServer, create_app
from mtflow.testing.fixtures import tiny_fit_config, write_config, write_random_manifest
from mtflow.testing.scorers import BrightnessScorer

SECRET = "s3cret-token-7f3a9c"


@pytest.fixture(scope="module")
def judge():
    with BackgroundServer(create_app(BrightnessScorer(), token=SECRET)) as server:
        yield server.url


def _files_holding(folder: Path, needle: bytes) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_a_command_line_token_is_used_but_never_written(
    tiny_kontext_path, tmp_path, judge, capsys, monkeypatch
):
    manifest = write_random_manifest(tmp_path / "data", num_chains=4, num_turns=2)
    config = tiny_fit_config(
        tiny_kontext_path, manifest, tmp_path / "runs", model={"max_iterations": 1}, name="t"
    )
    path = write_config(config, tmp_path / "fit.yaml")
    scorer = [
        "--model.scorer=mtflow.reward.client.RemoteScorer",
        f"--model.scorer.init_args.url={judge}",
        f"--model.scorer.init_args.token={SECRET}",
    ]
    with pytest.warns(
        UserWarning, match=r"not written to the run's config.yaml: model.scorer.init_args.token"
    ):
        assert (
            console_main(["fit", "--config", str(path), *scorer]) == 0
        )  # scored: the server accepted the token
    run = tmp_path / "runs" / "t" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert _files_holding(tmp_path / "runs", SECRET.encode()) == []
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["scorer"]["init_args"]["token"] is None
    assert saved["model"]["scorer"]["init_args"]["url"] == judge

    # the saved config works again with the token from the environment
    monkeypatch.setenv("JUDGE_TOKEN", SECRET)
    again = [
        "fit",
        "--config",
        str(run / "config.yaml"),
        "--model.scorer.init_args.token_env=JUDGE_TOKEN",
        "--trainer.logger.init_args.version=1",
    ]
    assert console_main(again) == 0
    rerun = tmp_path / "runs" / "t" / "version_1"
    assert yaml.safe_load((rerun / "config.yaml").read_text())["model"]["scorer"]["init_args"][
        "token_env"
    ] == ("JUDGE_TOKEN")
    assert _files_holding(tmp_path / "runs", SECRET.encode()) == []

    # without it the judge refuses, and the run says so in one line
    monkeypatch.delenv("JUDGE_TOKEN")
    capsys.readouterr()
    no_token = ["fit", "--config", str(run / "config.yaml"), "--trainer.logger.init_args.version=2"]
    assert console_main(no_token) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "mtflow fit: error:" in err.strip().splitlines()[-1]


def test_nested_secrets_go_back_to_their_defaults():
    config = Namespace(
        model=Namespace(
            scorer=Namespace(
                class_path="mtflow.reward.judge.VLMJudge",
                init_args=Namespace(
                    backend=Namespace(
                        class_path="mtflow.reward.openai_backend.OpenAIBackend",
                        init_args=Namespace(
                            base_url="http://x/v1", model="m", api_key="sk-live", api_key_env=None
                        ),
                    ),
                    mode="thinking",
                ),
            )
        ),
        trainer=Namespace(
            callbacks=[
                Namespace(
                    class_path="mtflow.reward.client.RemoteScorer", init_args=Namespace(token="t", url="u")
                )
            ]
        ),
    )
    removed = redact_secrets(config)
    assert sorted(removed) == [
        "model.scorer.init_args.backend.init_args.api_key",
        "trainer.callbacks[0].init_args.token",
    ]
    assert config.model.scorer.init_args.backend.init_args.api_key is None  # OpenAIBackend's default
    assert config.trainer.callbacks[0].init_args.token is None
    assert config.model.scorer.init_args.backend.init_args.base_url == "http://x/v1"  # the rest stays
    assert redact_secrets(config) == []  # defaults are not secrets
