"""README step 2 as a user runs it: ``mtflow serve-reward --config configs/reward_server.yaml`` with no
``JUDGE_API_KEY`` set, a real subprocess, scoring through a loopback OpenAI-protocol judge that requires no key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from mtflow.reward.base import ScorerUnavailableError
from mtflow.reward.client import RemoteScorer
from mtflow.reward.judge import VLMJudge
from mtflow.reward.openai_backend import OpenAIBackend
from mtflow.reward.openai_compat_server import create_scripted_openai_app
from mtflow.reward.server import BackgroundServer

from .conftest import child_env, make_items

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "reward_server.yaml"
MODEL = "Qwen/Qwen3-VL-8B-Instruct"  # what the shipped config asks the judge for
TOKEN = "secret"


@contextmanager
def serve_reward(judge_url: str, workdir: Path):
    """``mtflow serve-reward --config configs/reward_server.yaml`` pointed at ``judge_url``, on a free port."""
    ready = workdir / "ready.json"
    mtflow = Path(sys.executable).parent / "mtflow"
    command = [
        str(mtflow),
        "serve-reward",
        "--config",
        str(CONFIG),
        f"--scorer.init_args.backend.init_args.base_url={judge_url}/v1",
        "--port=0",
        f"--ready_file={ready}",
    ]
    env = {k: v for k, v in child_env().items() if k not in ("JUDGE_API_KEY", "OPENAI_API_KEY")}
    env["MTFLOW_REWARD_TOKEN"] = TOKEN
    log = workdir / "serve-reward.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 90
        while not ready.exists():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        yield json.loads(ready.read_text())["url"]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The scripted judge (like `vllm serve` without --api-key) and serve-reward in front of it."""
    judge_app = create_scripted_openai_app(MODEL, latency_s=0.01)
    with (
        BackgroundServer(judge_app) as judge,
        serve_reward(judge.url, tmp_path_factory.mktemp("serve")) as url,
    ):
        yield judge, judge_app, url


def test_serve_reward_with_the_shipped_config_and_no_judge_key(served, monkeypatch):
    monkeypatch.delenv("JUDGE_API_KEY", raising=False)
    judge, judge_app, url = served
    items = make_items(3, num_turns=3, seed=50)
    remote = RemoteScorer(url, token=TOKEN, deadline_s=60).score(items)
    # the same judge in this process, as the shipped config builds it (thinking mode, 512 px images)
    backend = OpenAIBackend(f"{judge.url}/v1", MODEL, api_key_env="JUDGE_API_KEY", image_max_side=512)
    local = VLMJudge(backend, mode="thinking").score(items)
    backend.close()
    assert remote.scored.all() and local.scored.all()
    assert torch.equal(remote.instruction_following, local.instruction_following)
    assert torch.equal(remote.content_consistency, local.content_consistency)
    assert remote.instruction_following.std() > 0  # scripted answers differ between items and turns
    assert {r["authorization"] for r in judge_app.state.received} == {None}  # no key was sent, not even empty


def test_a_judge_that_wants_a_key_says_so(served):
    _, judge_app, url = served
    judge_app.state.api_key = "vllm-key"  # as if vLLM had been restarted with --api-key
    try:
        with pytest.raises(ScorerUnavailableError) as error:
            RemoteScorer(url, token=TOKEN, max_retries=0, deadline_s=60).score(make_items(1))
    finally:
        judge_app.state.api_key = None
    message = str(error.value)
    assert (
        "HTTP 503" in message
        and "the judge requires an API key and none was sent; set JUDGE_API_KEY" in message
    )


@pytest.mark.parametrize("key", ["vllm-key", "wrong"])
def test_the_key_from_the_environment_is_sent(monkeypatch, key):
    monkeypatch.setenv("JUDGE_API_KEY", key)
    judge_app = create_scripted_openai_app(MODEL, latency_s=0.0, api_key="vllm-key")
    with BackgroundServer(judge_app) as judge:
        backend = OpenAIBackend(f"{judge.url}/v1", MODEL, api_key_env="JUDGE_API_KEY", max_retries=0)
        try:
            if key == "vllm-key":
                assert VLMJudge(backend).score(make_items(1)).scored.all()
            else:
                with pytest.raises(ScorerUnavailableError, match=r"refused the API key from \$JUDGE_API_KEY"):
                    VLMJudge(backend).score(make_items(1))
        finally:
            backend.close()
    assert {r["authorization"] for r in judge_app.state.received} <= {f"Bearer {key}"}
