"""VLMJudge: non-thinking scores equal the expectation computed by hand from the model's logits; thinking mode
parses answers into per-turn scores and flags what it cannot read."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mtflow.reward.backends import Generation, JudgeBackend
from mtflow.reward.base import Scorer
from mtflow.reward.judge import VLMJudge, expected_scores
from mtflow.reward.prompts import build_prompts

from .conftest import make_items


def test_expected_scores_by_hand():
    probs = torch.tensor(
        [
            [0.4, 0.1, 0.1, 0.1, 0.1],  # mass 0.8 -> (0.4 + 0.2 + 0.3 + 0.4 + 0.5) / 0.8 = 2.25
            [0.0, 0.0, 0.0, 0.0, 0.5],  # only "5" -> 5
            [0.0, 0.0, 0.0, 0.0, 0.0],  # no digit at all -> unscored
            [0.002, 0.0, 0.0, 0.0, 0.002],  # mass 0.004 < min_mass -> unscored
        ],
        dtype=torch.float64,
    )
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    scores, renormalised, mass = expected_scores(probs.log(), values, min_mass=0.01)
    assert scores[0].item() == pytest.approx(2.25, abs=1e-12)
    assert scores[1].item() == pytest.approx(5.0, abs=1e-12)
    assert math.isnan(scores[2]) and math.isnan(scores[3])
    assert renormalised[0].tolist() == pytest.approx([0.5, 0.125, 0.125, 0.125, 0.125])
    assert mass.tolist() == pytest.approx([0.8, 0.5, 0.0, 0.004])
    # binary: "0" and "1" stand for 1 and 5; P(0)=0.3, P(1)=0.1 -> 1 + 4 * 0.25 = 2
    binary, _, _ = expected_scores(
        torch.tensor([[0.3, 0.1]], dtype=torch.float64).log(), torch.tensor([1.0, 5.0])
    )
    assert binary.item() == pytest.approx(2.0, abs=1e-12)
    # a failed prompt (NaN row) is unscored, not zero
    failed, _, _ = expected_scores(torch.full((1, 5), math.nan), values)
    assert math.isnan(failed.item())


@pytest.fixture(scope="module")
def float64_model(tiny_backend):
    return copy.deepcopy(tiny_backend.model).double()


def hand_expectation(backend, model64, prompt, images, candidates, values) -> float:
    """Expected score of one prompt, computed alone (no batching, no padding) in float64."""
    processor = backend.processor
    user = [
        {"type": "image", "image": p} if not isinstance(p, str) else {"type": "text", "text": p}
        for p in prompt.content
    ]
    messages = [{"role": "system", "content": prompt.system}, {"role": "user", "content": user}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=images, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].double()
    with torch.no_grad():
        logits = model64(**inputs).logits[0, -1]
    ids = [processor.tokenizer.convert_tokens_to_ids(c) for c in candidates]
    probs = torch.softmax(logits[ids], dim=0)  # renormalised over the candidate digits
    return float((probs * torch.tensor(values, dtype=torch.float64)).sum())


def test_non_thinking_equals_hand_expectation(tiny_backend, float64_model):
    items = make_items(4, num_turns=2, seed=1)
    judge = VLMJudge(tiny_backend, mode="non_thinking")
    assert isinstance(judge, Scorer)
    batch = judge.score(items)
    assert batch.scored.all()
    for tensor in (batch.instruction_following, batch.content_consistency):
        assert ((tensor >= 1.0) & (tensor <= 5.0)).all()
    # The scores must depend on the inputs, or the comparison below could not tell items apart.
    assert batch.instruction_following.std() > 1e-2
    for i, item in enumerate(items):
        for criterion, scores in (("if", batch.instruction_following), ("cc", batch.content_consistency)):
            prompts = build_prompts(
                criterion,
                "multi_turn",
                "likert",
                "non_thinking",
                item.source,
                item.outputs,
                item.instructions,
            )
            for k, prompt in enumerate(prompts):
                assert prompt.images == [item.source, *item.outputs]
                expected = hand_expectation(
                    tiny_backend,
                    float64_model,
                    prompt,
                    [item.source, *item.outputs],
                    list("12345"),
                    [1, 2, 3, 4, 5],
                )
                assert scores[i, k].item() == pytest.approx(expected, abs=2e-4), (criterion, i, k)
    # probabilities in the diagnostics are the renormalised digit distribution behind the score
    probs = torch.tensor(batch.diagnostics[0]["if"]["probs"][1])
    assert probs.sum().item() == pytest.approx(1.0)
    assert (probs * torch.arange(1, 6)).sum().item() == pytest.approx(
        batch.instruction_following[0, 1].item(), abs=1e-5
    )


def test_binary_single_turn_equals_hand_expectation(tiny_backend, float64_model):
    items = make_items(2, num_turns=2, seed=2)
    judge = VLMJudge(tiny_backend, mode="non_thinking", prompt_style="single_turn", scale="binary")
    batch = judge.score(items)
    item = items[1]
    prompt = build_prompts(
        "if", "single_turn", "binary", "non_thinking", item.source, item.outputs, item.instructions
    )[1]
    # single-turn prompts show only the image before and after the turn
    expected = hand_expectation(
        tiny_backend, float64_model, prompt, [item.outputs[0], item.outputs[1]], ["0", "1"], [1.0, 5.0]
    )
    assert batch.instruction_following[1, 1].item() == pytest.approx(expected, abs=2e-4)
    assert ((batch.instruction_following >= 1) & (batch.instruction_following <= 5)).all()


def test_batching_does_not_change_scores(tiny_backend):
    items = make_items(5, num_turns=3, seed=3)
    judge = VLMJudge(tiny_backend)
    together = judge.score(items)
    alone = [judge.score([item]) for item in items]
    for i, single in enumerate(alone):
        assert torch.allclose(together.instruction_following[i], single.instruction_following[0], atol=1e-5)
        assert torch.allclose(together.content_consistency[i], single.content_consistency[0], atol=1e-5)


def test_thinking_mode_with_the_real_model(tiny_backend):
    """The random tiny model writes no tags: its answers are kept verbatim and every turn is flagged."""
    items = make_items(2, num_turns=2, seed=4)
    judge = VLMJudge(tiny_backend, mode="thinking", max_new_tokens=12)
    batch = judge.score(items)
    assert not batch.scored.any()
    assert batch.instruction_following.isnan().all() and batch.content_consistency.isnan().all()
    item = items[1]
    prompt = build_prompts(
        "if", "multi_turn", "likert", "thinking", item.source, item.outputs, item.instructions
    )[0]
    direct = tiny_backend.generate([prompt], max_new_tokens=12)[0].text
    assert batch.diagnostics[1]["if"]["raw"] == [direct]
    assert batch.diagnostics[1]["status"] == "unscored"
    assert batch.diagnostics[1]["if"]["problems"]


class ScriptedBackend(JudgeBackend):
    """Answers thinking prompts with given text (a judge that writes tags needs a trained model)."""

    def __init__(self, answers: dict[tuple[str, int | None], str]) -> None:
        self.answers = answers
        self.prompts = []

    def generate(self, prompts, max_new_tokens):
        self.prompts += prompts
        return [Generation(self.answers.get((p.criterion, p.turn))) for p in prompts]

    def first_token_logprobs(self, prompts, candidates):
        raise AssertionError("not used in thinking mode")

    def describe(self):
        return {"backend": "scripted", "model": "none"}


def test_thinking_scores_and_flags():
    backend = ScriptedBackend(
        {
            (
                "if",
                None,
            ): "<Thought>t1 good, t2 poor</Thought><Turn1Score>5</Turn1Score><Turn2Score>2</Turn2Score>",
            ("cc", None): "<Thought>t2 unclear</Thought><Turn1Score>4</Turn1Score>",
        }
    )
    items = make_items(1, num_turns=2)
    batch = VLMJudge(backend, mode="thinking").score(items)
    assert batch.scored.tolist() == [[True, False]]
    assert batch.instruction_following[0, 0].item() == 5.0 and batch.content_consistency[0, 0].item() == 4.0
    # turn 2's IF was read but CC was not: the turn is unscored as a whole, both NaN
    assert math.isnan(batch.instruction_following[0, 1]) and math.isnan(batch.content_consistency[0, 1])
    assert batch.diagnostics[0]["status"] == "partial"
    assert batch.diagnostics[0]["cc"]["parse"] == "partial"
    assert len(backend.prompts) == 2  # one multi-turn prompt per criterion


def test_thinking_binary_single_turn_maps_to_1_or_5():
    backend = ScriptedBackend(
        {
            ("if", 1): "<Thought>done</Thought><Score>1</Score>",
            ("if", 2): "<Thought>not done</Thought><Score>0</Score>",
            ("cc", 1): "<Score>1</Score>",
            ("cc", 2): "<Score>1</Score>",
        }
    )
    batch = VLMJudge(backend, mode="thinking", prompt_style="single_turn", scale="binary").score(
        make_items(1)
    )
    assert batch.instruction_following.tolist() == [[5.0, 1.0]]
    assert batch.content_consistency.tolist() == [[5.0, 5.0]]
    assert batch.scored.all()
    assert [p.turn for p in backend.prompts] == [1, 2, 1, 2]


def test_cc_scorer_replaces_the_cc_prompt():
    from mtflow.reward.judge import TurnScorer, TurnScores

    class HalfCC(TurnScorer):
        def score_turns(self, items):
            return TurnScores(torch.full((len(items), items[0].num_turns), 3.0), [{} for _ in items])

    backend = ScriptedBackend({("if", None): "<Turn1Score>4</Turn1Score><Turn2Score>4</Turn2Score>"})
    batch = VLMJudge(backend, mode="thinking", cc_scorer=HalfCC()).score(make_items(2))
    assert batch.content_consistency.eq(3.0).all() and batch.instruction_following.eq(4.0).all()
    assert all(p.criterion == "if" for p in backend.prompts)


def test_mixed_turn_counts_are_refused(tiny_backend):
    items = make_items(1, num_turns=2) + make_items(1, num_turns=3)
    with pytest.raises(ValueError, match="turns"):
        VLMJudge(tiny_backend).score(items)


def test_max_pixels_bounds_the_image_tokens(tiny_qwen3vl_path):
    from mtflow.reward.backends import TransformersBackend

    item = make_items(1, num_turns=1, size=(64, 64))[0]
    prompt = build_prompts(
        "if", "single_turn", "likert", "non_thinking", item.source, item.outputs, item.instructions
    )[0]
    default = TransformersBackend(str(tiny_qwen3vl_path)).encode([prompt])
    bounded = TransformersBackend(str(tiny_qwen3vl_path), max_pixels=32 * 32).encode([prompt])
    # patch 8: 64x64 -> an 8x8 grid; capped at 32x32 pixels -> 4x4
    assert default["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8]]
    assert bounded["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
