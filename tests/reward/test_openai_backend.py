"""The OpenAI-compatible backend against a real chat-completions endpoint on loopback serving the tiny Qwen3-VL."""

from __future__ import annotations

import socket

import pytest
import torch

from mtflow.reward.base import ScorerUnavailableError
from mtflow.reward.judge import VLMJudge
from mtflow.reward.openai_backend import OpenAIBackend
from mtflow.reward.openai_compat_server import create_openai_compat_app
from mtflow.reward.prompts import build_prompts
from mtflow.reward.server import BackgroundServer

from .conftest import make_items

SERVED_NAME = "tiny/qwen3-vl"


@pytest.fixture(scope="module")
def vocab_size(tiny_backend) -> int:
    return len(tiny_backend.processor.tokenizer)


@pytest.fixture(scope="module")
def endpoint(tiny_backend, vocab_size):
    # vLLM's --max-logprobs may be raised up to the vocabulary size; the random tiny judge spreads its
    # first-token mass over the whole vocabulary, so the exact comparison asks for all of it.
    app = create_openai_compat_app(tiny_backend, SERVED_NAME, max_logprobs=vocab_size)
    with BackgroundServer(app) as server:
        yield server, app


def make_backend(url: str, **kwargs) -> OpenAIBackend:
    defaults = {"model": SERVED_NAME, "max_concurrency": 4, "timeout_s": 60.0}
    return OpenAIBackend(base_url=f"{url}/v1", **{**defaults, **kwargs})


def test_non_thinking_scores_equal_the_in_process_judge(endpoint, tiny_backend, vocab_size):
    server, app = endpoint
    items = make_items(3, num_turns=2, seed=11)
    backend = make_backend(server.url, top_logprobs=vocab_size)
    try:
        remote = VLMJudge(backend).score(items)
    finally:
        backend.close()
    local = VLMJudge(tiny_backend).score(items)
    assert remote.scored.all()
    assert torch.allclose(remote.instruction_following, local.instruction_following, atol=1e-4)
    assert torch.allclose(remote.content_consistency, local.content_consistency, atol=1e-4)
    assert remote.instruction_following.std() > 1e-2  # the scores really differ between items and turns
    # What went over the wire: 3 items x 2 criteria x 2 turns one-token requests with logprobs,
    # each carrying the trajectory's 3 images as PNG.
    received = list(app.state.received)[-12:]
    assert len(received) == 12
    assert all(r["max_tokens"] == 1 and r["logprobs"] and r["top_logprobs"] == vocab_size for r in received)
    assert all(len(r["images"]) == 3 and {i["format"] for i in r["images"]} == {"PNG"} for r in received)


def test_digits_outside_top_k_count_as_zero(endpoint, tiny_backend):
    """Only the top-k alternatives come back; the expectation renormalises over the digits among them."""
    server, _ = endpoint
    item = make_items(1, num_turns=1, seed=12)[0]
    prompt = build_prompts(
        "if", "multi_turn", "likert", "non_thinking", item.source, item.outputs, item.instructions
    )[0]
    with torch.no_grad():
        logits = tiny_backend.model(**tiny_backend.encode([prompt])).logits[0, -1].double()
    logprobs = torch.log_softmax(logits, dim=0)
    digit_ids = tiny_backend.candidate_token_ids(list("12345"))
    ranking = torch.argsort(logprobs, descending=True).tolist()
    digit_ranks = sorted(ranking.index(i) for i in digit_ids)
    top_k = digit_ranks[2] + 1  # exactly three digits make the cut
    kept = [d for d, i in enumerate(digit_ids, start=1) if ranking.index(i) < top_k]
    assert len(kept) == 3
    weights = torch.stack([logprobs[digit_ids[d - 1]].exp() for d in kept])
    expected = float((weights * torch.tensor(kept, dtype=torch.float64)).sum() / weights.sum())
    backend = make_backend(server.url, top_logprobs=top_k)
    try:
        remote = VLMJudge(backend).score([item])
    finally:
        backend.close()
    assert remote.instruction_following[0, 0].item() == pytest.approx(expected, abs=1e-4)
    probs = remote.diagnostics[0]["if"]["probs"][0]
    assert [p > 0 for p in probs] == [d in kept for d in range(1, 6)]


def test_thinking_answers_equal_the_in_process_generation(endpoint, tiny_backend):
    server, _ = endpoint
    items = make_items(2, num_turns=2, seed=13)
    backend = make_backend(server.url)
    try:
        remote = VLMJudge(backend, mode="thinking", max_new_tokens=10).score(items)
    finally:
        backend.close()
    local = VLMJudge(tiny_backend, mode="thinking", max_new_tokens=10).score(items)
    for over_http, in_process in zip(remote.diagnostics, local.diagnostics):
        assert over_http["if"]["raw"] == in_process["if"]["raw"]
        assert over_http["cc"]["raw"] == in_process["cc"]["raw"]
        assert over_http["if"]["raw"][0]  # a non-empty answer came back


def test_images_are_resized_on_the_client(endpoint):
    server, app = endpoint
    items = make_items(1, num_turns=1, seed=14, size=(64, 48))
    backend = make_backend(server.url, image_max_side=32)
    try:
        VLMJudge(backend).score(items)
    finally:
        backend.close()
    for request in list(app.state.received)[-2:]:
        assert [i["size"] for i in request["images"]] == [[32, 24], [32, 24]]


def test_server_errors_are_retried(tiny_backend, vocab_size):
    app = create_openai_compat_app(tiny_backend, SERVED_NAME, max_logprobs=vocab_size, fail_first=2)
    items = make_items(1, num_turns=1, seed=15)
    with BackgroundServer(app) as server:
        backend = make_backend(server.url, max_concurrency=1, max_retries=3, top_logprobs=vocab_size)
        try:
            batch = VLMJudge(backend).score(items)
        finally:
            backend.close()
    assert batch.scored.all()
    assert len(app.state.received) == 2  # two 500s (not recorded), then both prompts served


def test_retries_exhausted_flags_the_prompt(tiny_backend, vocab_size):
    app = create_openai_compat_app(tiny_backend, SERVED_NAME, max_logprobs=vocab_size, fail_first=1)
    items = make_items(1, num_turns=1, seed=16)
    with BackgroundServer(app) as server:
        backend = make_backend(server.url, max_concurrency=1, max_retries=0, top_logprobs=vocab_size)
        try:
            # one of the two prompts (IF, CC) hits the injected 500: only its criterion is unscored
            batch = VLMJudge(backend).score(items)
        finally:
            backend.close()
    assert not batch.scored.any() and batch.instruction_following.isnan().all()
    if_errors = batch.diagnostics[0]["if"].get("errors", [])
    assert len(if_errors) == 1 and "InternalServerError" in if_errors[0] and server.url in if_errors[0]
    # the CC prompt went through: its probabilities are there, but the turn is unscored as a whole
    assert "errors" not in batch.diagnostics[0]["cc"] and batch.diagnostics[0]["cc"]["digit_mass"][0] > 0


def test_unknown_model_name_is_reported(endpoint):
    server, _ = endpoint
    backend = make_backend(server.url, model="not/served")
    try:
        with pytest.raises(ScorerUnavailableError, match="NotFoundError"):
            VLMJudge(backend).score(make_items(1, num_turns=1))
    finally:
        backend.close()


def test_unreachable_endpoint_raises_naming_the_url():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = make_backend(f"http://127.0.0.1:{port}", max_retries=1, timeout_s=2.0)
    try:
        with pytest.raises(ScorerUnavailableError, match=f"127.0.0.1:{port}"):
            VLMJudge(backend).score(make_items(1, num_turns=1))
    finally:
        backend.close()


def test_prompts_spread_over_endpoints_and_skip_a_dead_one():
    """Three endpoints (one nobody listens on): every prompt answered, by the live two, as one endpoint would."""
    from mtflow.reward.openai_compat_server import create_scripted_openai_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    first, second = (create_scripted_openai_app("m", latency_s=0.02) for _ in range(2))
    items = make_items(6, num_turns=2, seed=17)
    with BackgroundServer(first) as a, BackgroundServer(second) as b:
        spread = OpenAIBackend([dead, f"{a.url}/v1", f"{b.url}/v1"], "m", max_retries=0, max_concurrency=8)
        single = OpenAIBackend(f"{a.url}/v1", "m")
        try:
            both = VLMJudge(spread).score(items)
            one = VLMJudge(single).score(items)
            routes = spread.pool.describe()
        finally:
            spread.close()
            single.close()
    assert both.scored.all()
    assert torch.equal(both.instruction_following, one.instruction_following)
    assert torch.equal(both.content_consistency, one.content_consistency)
    assert len(second.state.received) > 0 and len(first.state.received) > len(items) * 2 * 2  # both served
    assert routes[0]["consecutive_failures"] >= 1 and not routes[0]["up"]
