"""The judge layouts of docs/reward-service.md: every overlay in configs/layouts/ resolves on the paper config as
its header says, the world size is derived, and the service overlay builds a backend over several endpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtflow.cli import resolve_fit_config
from mtflow.reward.server import build_parser

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BASE = ["--config", str(CONFIGS / "flux_kontext.yaml"), "--config", str(CONFIGS / "flux_kontext_grpo.yaml")]


@pytest.mark.parametrize(
    ("layout", "devices", "urls"),
    [
        ("one_node_7_1", 7, "http://127.0.0.1:8000"),
        ("one_node_6_2", 6, "http://127.0.0.1:8000"),
        ("judge_on_other_node", 8, "http://judge-node:8000"),
        ("several_judges", 8, ["http://judge-node-1:8000", "http://judge-node-2:8000"]),
    ],
)
def test_training_layouts_resolve_with_a_derived_world_size(layout, devices, urls, monkeypatch):
    monkeypatch.setenv("MTFLOW_REWARD_TOKEN", "secret")
    config = resolve_fit_config([*BASE, "--config", str(CONFIGS / "layouts" / f"{layout}.yaml")])
    assert config["trainer"]["devices"] == devices
    assert config["trainer"]["strategy"]["init_args"]["data_parallel_size"] == "auto"
    scorer = config["model"]["scorer"]
    assert scorer["class_path"] == "mtflow.reward.client.RemoteScorer"
    assert scorer["init_args"]["url"] == urls and scorer["init_args"]["token_env"] == "MTFLOW_REWARD_TOKEN"


def test_the_replicas_overlay_gives_the_shipped_service_several_judges(monkeypatch):
    monkeypatch.setenv("MTFLOW_REWARD_TOKEN", "secret")
    monkeypatch.delenv("JUDGE_API_KEY", raising=False)
    parser = build_parser()
    overlay = CONFIGS / "layouts" / "reward_server_replicas.yaml"
    config = parser.instantiate(
        parser.parse_args(["--config", str(CONFIGS / "reward_server.yaml"), "--config", str(overlay)])
    )
    judge = config.scorer
    assert judge.mode == "thinking"  # the service config's settings survive the overlay
    backend = judge.backend
    assert backend.base_urls == ["http://127.0.0.1:8001/v1", "http://127.0.0.1:8002/v1"]
    assert backend.max_concurrency == 128 and backend.image_max_side == 512 and backend._api_key is None
    assert config.max_batches_in_flight == 4
