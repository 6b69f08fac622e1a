"""Batch poisoning: a few requests whose items make the scorer fail, sent at the same moment as many innocent ones
that the server merges into the same batches. Every innocent request must get exactly the scores the scorer gives
it on its own; every poisoned item is unscored with the reason, and nothing is a 5xx."""

from __future__ import annotations

import copy
import threading

import httpx
import pytest
import torch

from mtflow.reward.base import ScoringItem
from mtflow.reward.server import BackgroundServer, create_app
from mtflow.reward.wire import item_to_json
from mtflow.testing.scorers import BrightnessScorer
from mtflow.toy.judge import ToyJudge
from mtflow.toy.world import ToyWorld

from .conftest import make_items

INNOCENT = 60
POISONED = 4


def fire_together(url: str, bodies: list[dict]) -> list[httpx.Response]:
    """POST every body from its own thread, released at once; the responses in order."""
    responses: list = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def send(index: int) -> None:
        with httpx.Client(timeout=120) as client:
            barrier.wait()
            try:
                responses[index] = client.post(f"{url}/v1/score", json=bodies[index])
            except httpx.HTTPError as exc:  # reported as a failure below
                responses[index] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    return responses


def check(responses, expected, poisoned_at: set[int], reason: str) -> None:
    failures = [
        i for i, r in enumerate(responses) if not isinstance(r, httpx.Response) or r.status_code != 200
    ]
    assert failures == [], [getattr(responses[i], "text", responses[i]) for i in failures[:3]]
    for index, (response, want) in enumerate(zip(responses, expected)):
        payload = response.json()
        if index in poisoned_at:
            assert payload["scored"] == [[False] * len(payload["scored"][0])]
            assert reason in payload["diagnostics"][0]["error"], payload["diagnostics"][0]
            continue
        got = torch.tensor(payload["instruction_following"], dtype=torch.float32)
        assert payload["scored"] == want.scored.tolist()
        assert torch.allclose(got, want.instruction_following, atol=1e-6, equal_nan=True)
        got = torch.tensor(payload["content_consistency"], dtype=torch.float32)
        assert torch.allclose(got, want.content_consistency, atol=1e-6, equal_nan=True)


def test_a_raising_scorer_fails_only_the_poisoned_items():
    """BrightnessScorer raises on a trajectory whose output size differs from its source's (mixed image sizes)."""
    scorer = BrightnessScorer()
    app = create_app(scorer, max_batch_size=64, max_wait_ms=200.0, max_batches_in_flight=2)
    requests = [make_items(1, num_turns=2, seed=seed) for seed in range(INNOCENT + POISONED)]
    poisoned_at = set(range(0, INNOCENT + POISONED, (INNOCENT + POISONED) // POISONED))
    for index in poisoned_at:
        item = requests[index][0]
        item.outputs[1] = item.outputs[1].resize((48, 40))  # a different size from the source
    expected = [None if i in poisoned_at else scorer.score(items) for i, items in enumerate(requests)]
    bodies = [{"items": [item_to_json(item) for item in items]} for items in requests]
    with BackgroundServer(app) as server:
        responses = fire_together(server.url, bodies)
        health = app.state.batcher.stats
    check(responses, expected, poisoned_at, "ValueError")
    assert health.isolated_batches >= 1 and health.failed_items == POISONED
    assert health.batches < len(bodies)  # the poison really shared batches with innocent requests


@pytest.fixture(scope="module")
def toy_items():
    world = ToyWorld(seed=3)
    items = []
    for index in range(INNOCENT):
        chain = world.chain(index, num_turns=2)
        images = chain.images()
        metadata = chain.metadata()
        items.append(
            [ScoringItem(f"toy{index}", chain.chain_id, images[0], images[1:], chain.instructions, metadata)]
        )
    return items


def more_colours(render: dict) -> dict:
    extra = [[f"extra{i}", [i % 250, 3 + i // 250, 250]] for i in range(200)]
    return {"shape_palette": [*render["shape_palette"], *extra]}


@pytest.mark.parametrize(
    ("poison", "reason"),
    [
        (lambda render: {"image_size": 4_000_000}, "exceeds this judge's max_image_size"),
        (lambda render: {"image_size": -8}, "image_size must be"),
        (more_colours, "at most 127 palette"),
    ],
    ids=["huge render size", "negative render size", "oversized palette"],
)
def test_toy_judge_metadata_cannot_poison_a_batch(toy_items, poison, reason):
    judge = ToyJudge()
    app = create_app(judge, max_batch_size=64, max_wait_ms=200.0)
    expected = [judge.score(items) for items in toy_items]
    requests = [copy.deepcopy(items) for items in toy_items]
    poisoned_at = {5, 17, 33}
    for index in poisoned_at:
        item = requests[index][0]
        render = item.metadata["toy"]["render"]
        render.update(poison(render))
    bodies = [{"items": [item_to_json(item) for item in items]} for items in requests]
    with BackgroundServer(app) as server:
        responses = fire_together(server.url, bodies)
    check(responses, expected, poisoned_at, reason)
    assert all(expected[i].scored.all() for i in range(INNOCENT) if i not in poisoned_at)
