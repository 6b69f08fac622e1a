"""Judge variants for the ablation study: the toy judge's binary mode and ``PerturbedJudge``'s documented flaws,
against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from mtflow.reward.base import ScoringItem
from mtflow.toy.judge import ToyJudge
from mtflow.toy.perturbed import PerturbedJudge, _noise, mean_saturation
from mtflow.toy.world import Edit, RenderSpec, Scene, ToyChainSample, ToyObject, ToyWorld

SPEC = RenderSpec()
RED_CIRCLE = ToyObject((0, 0), "circle", "red")
BLUE_SQUARE = ToyObject((1, 1), "square", "blue")
SOURCE = Scene("white", (RED_CIRCLE, BLUE_SQUARE))


def _chain(edits: list[Edit]) -> ToyChainSample:
    scenes = [SOURCE]
    for edit in edits:
        scenes.append(edit.apply(scenes[-1]))
    return ToyChainSample("hand", "train", scenes, edits, [e.instruction(2) for e in edits], SPEC)


def _item(chain: ToyChainSample, outputs: list, item_id: str = "g0") -> ScoringItem:
    images = [o if isinstance(o, Image.Image) else SPEC.render(o) for o in outputs]
    return ScoringItem(
        item_id, chain.chain_id, SPEC.render(chain.scenes[0]), images, chain.instructions, chain.metadata()
    )


def test_binary_judge_passes_at_the_threshold_on_both_scores():
    recolour = Edit("color_alter", RED_CIRCLE, new_color="green")
    chain = _chain([recolour])
    wrong = Scene("white", (ToyObject((0, 0), "circle", "purple"), BLUE_SQUARE))  # IF 3 on the 1-5 scale
    damaged = Scene("white", (ToyObject((0, 0), "circle", "green"),))  # IF 5, lost the untouched square
    exact = ToyJudge().score(
        [_item(chain, [wrong]), _item(chain, [chain.scenes[1]]), _item(chain, [damaged])]
    )
    assert exact.instruction_following[:, 0].tolist() == pytest.approx([3.0, 5.0, 5.0])
    cc_damaged = float(exact.content_consistency[2, 0])
    assert cc_damaged < 4.0  # one of the two never-edited units (background, square) is gone: 1 + 4 * 0.5 = 3
    binary = ToyJudge(binary_threshold=4.0).score(
        [_item(chain, [wrong]), _item(chain, [chain.scenes[1]]), _item(chain, [damaged])]
    )
    assert binary.instruction_following[:, 0].tolist() == [1.0, 5.0, 5.0]
    assert binary.content_consistency[:, 0].tolist() == [5.0, 5.0, 1.0]
    assert binary.scored.all()
    assert ToyJudge(binary_threshold=3.0).score([_item(chain, [wrong])]).instruction_following[0, 0] == 5.0
    with pytest.raises(ValueError, match="binary_threshold"):
        ToyJudge(binary_threshold=0.5)


def test_binary_judge_keeps_unscorable_items_unscored():
    chain = _chain([Edit("color_alter", RED_CIRCLE, new_color="green")])
    good = _item(chain, [chain.scenes[1]])
    broken = ScoringItem("broken", "c", good.source, good.outputs, good.instructions, {})
    batch = ToyJudge(binary_threshold=4.0).score([good, broken])
    assert batch.scored.tolist() == [[True], [False]] and math.isnan(float(batch.instruction_following[1, 0]))


def _flat(colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (32, 32), colour)


def test_shrink_pulls_every_score_toward_the_middle():
    world = ToyWorld()
    chains = [world.chain(i, "heldout") for i in range(6)]
    items = [_item_world(c, c.scenes[1:]) for c in chains] + [_item_world(c, c.scenes[:-1]) for c in chains]
    exact = ToyJudge().score(items)
    shrunk = PerturbedJudge(ToyJudge(), shrink=0.5).score(items)
    for name in ("instruction_following", "content_consistency"):
        expected = 3.0 + 0.5 * (getattr(exact, name).double() - 3.0)
        assert getattr(shrunk, name).double().flatten().tolist() == pytest.approx(expected.flatten().tolist())
    assert set(shrunk.instruction_following.flatten().tolist()) == {4.0, 2.0}  # 5 -> 4 and 1 -> 2


def _item_world(chain, scenes) -> ScoringItem:
    images = [chain.spec.render(s) for s in scenes]
    return ScoringItem(
        "g0", chain.chain_id, chain.spec.render(chain.scenes[0]), images, chain.instructions, chain.metadata()
    )


def test_saturation_bias_rewards_vivid_outputs_whatever_the_instruction():
    assert mean_saturation(_flat((255, 0, 0))) == 1.0 and mean_saturation(_flat((128, 128, 128))) == 0.0
    chain = _chain([Edit("color_alter", RED_CIRCLE, new_color="green")])
    plain = _item(chain, [chain.scenes[1]])
    source_sat = mean_saturation(plain.source)
    output_sat = mean_saturation(plain.outputs[0])
    vivid = ScoringItem(
        "vivid", "hand", plain.source, [_flat((255, 0, 0))], plain.instructions, chain.metadata()
    )
    judge = PerturbedJudge(ToyJudge(), saturation_bias=2.0)
    exact = ToyJudge().score([plain, vivid])
    biased = judge.score([plain, vivid])
    expected_plain = min(5.0, float(exact.instruction_following[0, 0]) + 2.0 * (output_sat - source_sat))
    expected_vivid = min(5.0, float(exact.instruction_following[1, 0]) + 2.0 * (1.0 - source_sat))
    assert float(biased.instruction_following[0, 0]) == pytest.approx(expected_plain, abs=1e-6)
    assert float(biased.instruction_following[1, 0]) == pytest.approx(expected_vivid, abs=1e-6)
    assert float(biased.instruction_following[1, 0]) > float(
        exact.instruction_following[1, 0]
    )  # not asked for
    assert biased.content_consistency.tolist() == exact.content_consistency.tolist()  # IF only


def test_noise_is_zero_mean_reproducible_and_tied_to_the_output():
    world = ToyWorld()
    chains = [world.chain(i, "heldout") for i in range(40)]
    items = [_item_world(c, c.scenes[1:]) for c in chains]
    judge = PerturbedJudge(ToyJudge(), noise_std=0.5, seed=3)
    first, again = judge.score(items), judge.score(items)
    assert (
        first.instruction_following.tolist() == again.instruction_following.tolist()
    )  # same output, same noise
    # the noise of one entry, by hand: 5 (perfect) + 0.5 z, clipped to [1, 5]
    z = _noise(3, items[0].item_id, 0, items[0].outputs[0])
    assert float(first.instruction_following[0, 0]) == pytest.approx(min(5.0, 5.0 + 0.5 * z), abs=1e-6)
    draws = np.array([_noise(3, f"item{i}", 0, items[0].outputs[0]) for i in range(2000)])
    assert abs(draws.mean()) < 0.1 and 0.9 < draws.std() < 1.1  # standard normal
    other_output = ScoringItem(
        items[0].item_id,
        items[0].chain_id,
        items[0].source,
        [items[1].outputs[0], *items[0].outputs[1:]],
        items[0].instructions,
        items[0].metadata,
    )
    assert _noise(3, items[0].item_id, 0, other_output.outputs[0]) != z  # a different output draws anew
    assert ((first.instruction_following >= 1) & (first.instruction_following <= 5)).all()


def test_perturbations_never_score_what_the_exact_judge_refused():
    chain = _chain([Edit("color_alter", RED_CIRCLE, new_color="green")])
    good = _item(chain, [chain.scenes[1]])
    broken = ScoringItem("broken", "c", good.source, good.outputs, good.instructions, {})
    batch = PerturbedJudge(ToyJudge(), noise_std=1.0, shrink=0.3, saturation_bias=1.0).score([good, broken])
    assert batch.scored.tolist() == [[True], [False]]
    assert math.isnan(float(batch.instruction_following[1, 0])) and math.isnan(
        float(batch.content_consistency[1, 0])
    )
    with pytest.raises(ValueError, match="shrink"):
        PerturbedJudge(ToyJudge(), shrink=1.0)
