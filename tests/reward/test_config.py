"""Everything a user configures is built by jsonargparse from YAML (the CLI's only config system)."""

from __future__ import annotations

import yaml
from jsonargparse import ArgumentParser

from mtflow.reward.client import RemoteScorer
from mtflow.reward.feature_cc import FeatureSimilarityCC
from mtflow.reward.judge import VLMJudge
from mtflow.reward.openai_backend import OpenAIBackend
from mtflow.reward.server import RewardServer, build_parser


def test_server_yaml_with_openai_judge_and_feature_cc(tmp_path, tiny_dinov2_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "k-1")
    monkeypatch.setenv("REWARD_TOKEN", "t-1")
    config = {
        "scorer": {
            "class_path": "mtflow.reward.judge.VLMJudge",
            "init_args": {
                "backend": {
                    "class_path": "mtflow.reward.openai_backend.OpenAIBackend",
                    "init_args": {
                        "base_url": "http://judge-host:8000/v1",
                        "model": "Qwen/Qwen3-VL-8B-Instruct",
                        "api_key_env": "JUDGE_KEY",
                        "max_concurrency": 64,
                        "image_max_side": 768,
                    },
                },
                "mode": "thinking",
                "scale": "binary",
                "cc_scorer": {
                    "class_path": "mtflow.reward.feature_cc.FeatureSimilarityCC",
                    "init_args": {"model": str(tiny_dinov2_path), "reference": "previous"},
                },
            },
        },
        "port": 0,
        "token_env": "REWARD_TOKEN",
        "max_batch_size": 64,
        "max_wait_ms": 50,
    }
    path = tmp_path / "reward.yaml"
    path.write_text(yaml.safe_dump(config))
    parser = build_parser()
    init = parser.instantiate(parser.parse_args(["--config", str(path), "--max_wait_ms", "75"]))
    server = RewardServer(**{k: v for k, v in vars(init).items() if k != "config" and not k.startswith("__")})
    judge = server.scorer
    assert isinstance(judge, VLMJudge) and judge.mode == "thinking" and judge.scale == "binary"
    assert isinstance(judge.backend, OpenAIBackend)
    assert judge.backend.base_url == "http://judge-host:8000/v1" and judge.backend._api_key == "k-1"
    assert judge.backend.max_concurrency == 64 and judge.backend.image_max_side == 768
    assert isinstance(judge.cc_scorer, FeatureSimilarityCC) and judge.cc_scorer.reference == "previous"
    assert server.token == "t-1" and server.app_kwargs["max_wait_ms"] == 75.0
    assert server.app_kwargs["max_batch_size"] == 64


def test_remote_scorer_from_yaml(monkeypatch):
    monkeypatch.setenv("REWARD_TOKEN", "t-2")
    parser = ArgumentParser()
    parser.add_argument("--scorer", type=RemoteScorer)
    text = yaml.safe_dump(
        {
            "scorer": {
                "class_path": "mtflow.reward.client.RemoteScorer",
                "init_args": {"url": "http://reward:8000/", "token_env": "REWARD_TOKEN", "deadline_s": 30},
            }
        }
    )
    scorer = parser.instantiate(parser.parse_string(text)).scorer
    assert isinstance(scorer, RemoteScorer)
    assert (
        scorer.endpoint == "http://reward:8000/v1/score"
        and scorer.token == "t-2"
        and scorer.deadline_s == 30.0
    )


def test_binding_beyond_loopback_without_a_token_is_warned_about(caplog):
    from mtflow.reward.server import is_loopback
    from mtflow.toy.judge import ToyJudge

    assert [is_loopback(h) for h in ("127.0.0.1", "127.3.2.1", "::1", "localhost")] == [True] * 4
    assert [is_loopback(h) for h in ("0.0.0.0", "10.0.0.5", "::", "judge-host")] == [False] * 4
    for host, token, warned in (
        ("127.0.0.1", None, False),
        ("0.0.0.0", "secret", False),
        ("0.0.0.0", None, True),
    ):
        caplog.clear()
        with caplog.at_level("WARNING", logger="mtflow.reward.server"):
            RewardServer(ToyJudge(), host=host, token=token)
        assert ("without a bearer token" in caplog.text) is warned, (host, token)
