"""Admission control: PNG headers priced by hand, the byte budget's queue, and several batches in flight."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time

import pytest
import torch
from PIL import Image

from mtflow.reward.admission import (
    BudgetBusyError,
    ByteBudget,
    RequestCost,
    downscaled_size,
    image_cost,
)
from mtflow.reward.base import ScoreBatch
from mtflow.reward.batcher import DynamicBatcher
from mtflow.reward.judge import VLMJudge
from mtflow.reward.wire import decode_image, peek_png_header, resize_to_max_side

from .conftest import make_items
from .test_judge import ScriptedBackend


def png(mode: str, size: tuple[int, int], **save) -> str:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG", **save)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    ("mode", "save", "colour_type", "depth", "decoded_mode"),
    [
        ("RGB", {}, 2, 8, "RGB"),
        ("RGBA", {}, 6, 8, "RGBA"),
        ("L", {}, 0, 8, "L"),
        ("LA", {}, 4, 8, "LA"),
        ("P", {}, 3, 1, "P"),  # Pillow writes a one-colour palette with 1-bit indices
        ("1", {}, 0, 1, "1"),
        ("I;16", {}, 0, 16, "I;16"),
    ],
)
def test_headers_are_read_without_decoding_and_match_what_pillow_decodes(
    mode, save, colour_type, depth, decoded_mode
):
    data = png(mode, (300, 200), **save)
    header = peek_png_header(data, "x")
    assert (header.width, header.height, header.colour_type, header.bit_depth) == (
        300,
        200,
        colour_type,
        depth,
    )
    assert Image.open(io.BytesIO(base64.b64decode(data))).mode == decoded_mode  # the mode image_cost assumes
    decoded = decode_image(data, "x", max_side=100)
    assert decoded.mode == "RGB" and decoded.size == (100, 67)


def test_image_cost_by_hand():
    rgb = peek_png_header(png("RGB", (1024, 768)), "x")
    # RGB decodes to RGB (4 bytes a pixel in Pillow); downscaled to 512 x 384, the full image is transient
    assert image_cost(rgb, 512).held == 512 * 384 * 4
    assert image_cost(rgb, 512).transient == 1024 * 768 * 4
    # no downscale: it holds itself, nothing transient
    assert image_cost(rgb, None).held == 1024 * 768 * 4 and image_cost(rgb, None).transient == 0
    grey = peek_png_header(png("L", (1024, 768)), "x")
    # L: 1 byte a pixel, then the RGB copy (4), then the 512 x 384 downscale while the RGB copy lives
    assert image_cost(grey, 512).transient == 1024 * 768 * (1 + 4) + 512 * 384 * 4 - 512 * 384 * 4
    costs = [image_cost(rgb, 512), image_cost(grey, None), image_cost(rgb, 512)]
    request = RequestCost.of(costs)
    assert request.held == 2 * 512 * 384 * 4 + 1024 * 768 * 4
    assert request.transient == 1024 * 768 * 4  # decoded one after another: the largest transient only


@pytest.mark.parametrize("size", [(1000, 1), (1, 1000), (999, 333), (640, 480), (513, 512), (512, 513)])
def test_downscaled_size_is_what_the_resize_produces(size):
    image = Image.new("RGB", size)
    assert resize_to_max_side(image, 512).size == downscaled_size(*size, 512)


def run(coroutine):
    return asyncio.run(coroutine)


def test_budget_hands_out_bytes_first_come_first_served():
    async def scenario():
        budget = ByteBudget(100, max_waiting=4, name="test budget")
        await budget.acquire(60, 1.0)
        order = []

        async def wait_for(amount: int, tag: str) -> None:
            await budget.acquire(amount, 5.0)
            order.append(tag)

        big = asyncio.create_task(wait_for(70, "big"))
        await asyncio.sleep(0.01)
        small = asyncio.create_task(wait_for(10, "small"))  # fits now, but waits behind "big" (no overtaking)
        await asyncio.sleep(0.01)
        assert order == [] and budget.waiting == 2
        budget.release(60)
        await asyncio.gather(big, small)
        assert order == ["big", "small"] and budget.used == 80 and budget.peak == 80

    run(scenario())


def test_budget_refuses_when_the_queue_is_full_or_the_wait_too_long():
    async def scenario():
        budget = ByteBudget(100, max_waiting=1, name="test budget")
        await budget.acquire(100, 1.0)
        waiter = asyncio.create_task(budget.acquire(50, 5.0))
        await asyncio.sleep(0.01)
        with pytest.raises(BudgetBusyError, match="1 requests already wait"):
            await budget.acquire(10, 5.0)
        waiter.cancel()  # a client that goes away leaves the queue
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert budget.waiting == 0
        start = time.monotonic()
        with pytest.raises(BudgetBusyError, match="waited 0.2 s for 0.0 MiB"):
            await budget.acquire(10, 0.2)
        assert 0.15 < time.monotonic() - start < 1.0 and budget.used == 100
        with pytest.raises(ValueError, match="can never fit"):
            await budget.acquire(101, 1.0)

    run(scenario())


class Gate:
    """A scorer whose calls block until released; counts how many run at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0

    def score(self, items):
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        self.release.wait(10)
        with self.lock:
            self.running -= 1
        full = torch.full((len(items), items[0].num_turns), 3.0)
        return ScoreBatch(full, full, torch.ones_like(full, dtype=torch.bool))


@pytest.mark.parametrize("in_flight", [1, 3])
def test_batches_in_flight_are_bounded(in_flight):
    gate = Gate()

    async def scenario():
        batcher = DynamicBatcher(gate, max_batch_size=1, max_wait_ms=0.0, max_batches_in_flight=in_flight)
        await batcher.start()
        requests = [asyncio.create_task(batcher.submit(make_items(1, seed=s))) for s in range(6)]
        deadline = time.monotonic() + 10
        while gate.running < in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # time for more calls to start, if the bound leaked
        assert gate.running == in_flight and batcher.stats.batches_in_flight == in_flight
        gate.release.set()
        results = await asyncio.gather(*requests)
        await batcher.stop()
        return results

    results = run(scenario())
    assert gate.peak == in_flight
    assert all(r.scored.all() and r.instruction_following.eq(3.0).all() for r in results)


def test_if_and_cc_prompts_go_out_in_one_backend_call():
    answer = "<Thought>ok</Thought><Turn1Score>4</Turn1Score><Turn2Score>2</Turn2Score>"
    items = make_items(3, num_turns=2)
    outcomes = {}
    for together in (True, False):
        backend = ScriptedBackend({("if", None): answer, ("cc", None): answer.replace("4", "5")})
        calls = []
        generate = backend.generate
        backend.generate = lambda prompts, n, generate=generate, calls=calls: (
            calls.append(len(prompts)) or generate(prompts, n)
        )
        outcomes[together] = (
            VLMJudge(backend, mode="thinking", criteria_together=together).score(items),
            calls,
        )
    (joint, joint_calls), (apart, apart_calls) = outcomes[True], outcomes[False]
    assert joint_calls == [6] and apart_calls == [3, 3]  # 3 items x (IF + CC), one multi-turn prompt each
    assert torch.equal(joint.instruction_following, apart.instruction_following)
    assert torch.equal(joint.content_consistency, apart.content_consistency)
    assert joint.instruction_following[:, 0].eq(4.0).all() and joint.content_consistency[:, 0].eq(5.0).all()


def test_the_judge_declares_its_input_size_only_when_it_resizes_everything():
    from mtflow.reward.openai_backend import OpenAIBackend

    backend = OpenAIBackend("http://127.0.0.1:9/v1", "m", image_max_side=448)
    assert VLMJudge(backend).input_max_side == 448
    assert VLMJudge(ScriptedBackend({})).input_max_side is None
