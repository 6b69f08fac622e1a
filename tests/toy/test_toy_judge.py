"""The exact judge: reference values of the documented formulas, robustness, flagging, Scorer contract."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from mtflow.reward.base import Scorer, ScoringItem
from mtflow.toy.judge import (
    OFF_PALETTE,
    SUCCESS_THRESHOLD,
    ToyJudge,
    collapse_to_single_turn,
    exact_scores,
    label_edges,
    palette_lookup_table,
    snap_to_palette,
    snap_with_table,
)
from mtflow.toy.world import Edit, RenderSpec, Scene, ToyChainSample, ToyObject, ToyWorld

SPEC = RenderSpec()
RED_CIRCLE = ToyObject((0, 0), "circle", "red")
BLUE_SQUARE = ToyObject((1, 1), "square", "blue")
SOURCE = Scene("white", (RED_CIRCLE, BLUE_SQUARE))


@pytest.fixture(scope="module")
def judge():
    return ToyJudge()


def make_chain(source: Scene, edits: list[Edit], chain_id: str = "hand") -> ToyChainSample:
    scenes = [source]
    for e in edits:
        scenes.append(e.apply(scenes[-1]))
    return ToyChainSample(chain_id, "train", scenes, edits, [e.instruction(2) for e in edits], SPEC)


def item(chain: ToyChainSample, outputs: list, item_id: str = "g0") -> ScoringItem:
    images = [o if isinstance(o, Image.Image) else SPEC.render(o) for o in outputs]
    return ScoringItem(
        item_id, chain.chain_id, SPEC.render(chain.scenes[0]), images, chain.instructions, chain.metadata()
    )


def scores(judge, items):
    batch = judge.score(items)
    return batch.instruction_following.numpy(), batch.content_consistency.numpy(), batch


def test_toy_judge_is_a_scorer(judge):
    assert isinstance(judge, Scorer)


def test_perfect_edits_score_five_and_untouched_outputs_score_if_one_full_cc(judge):
    world = ToyWorld()
    chains = [world.chain(i, "heldout") for i in range(60)]
    perfect = [item(c, c.scenes[1:]) for c in chains]
    if_, cc, batch = scores(judge, perfect)
    assert (if_ == 5).all() and (cc == 5).all() and batch.scored.all()
    # untouched: each turn returns its input (the previous ground truth) unchanged
    untouched = [item(c, c.scenes[:-1]) for c in chains]
    if_, cc, batch = scores(judge, untouched)
    assert (if_ == 1).all() and (cc == 5).all() and batch.scored.all()


def test_wrong_colour_recolour_scores_three():
    judge = ToyJudge()
    chain = make_chain(SOURCE, [Edit("color_alter", RED_CIRCLE, new_color="green")])
    wrong = Scene("white", (ToyObject((0, 0), "circle", "purple"), BLUE_SQUARE))
    if_, cc, _ = scores(judge, [item(chain, [wrong])])
    assert if_[0, 0] == pytest.approx(1 + 4 * 0.5) and cc[0, 0] == 5
    assert if_[0, 0] < SUCCESS_THRESHOLD
    if_, _, _ = scores(ToyJudge(wrong_colour_credit=0.25), [item(chain, [wrong])])
    assert if_[0, 0] == pytest.approx(2.0)
    # a background colour where a shape colour belongs is the wrong kind of colour: no credit
    hole = Scene("white", (BLUE_SQUARE,))
    if_, _, _ = scores(judge, [item(chain, [hole])])
    assert if_[0, 0] == pytest.approx(1.0)


def test_wrong_background_colour_scores_three(judge):
    chain = make_chain(SOURCE, [Edit("background_change", new_background="black")])
    if_, cc, _ = scores(judge, [item(chain, [Scene("gray", SOURCE.objects)])])
    assert if_[0, 0] == pytest.approx(3.0) and cc[0, 0] == 5


def test_move_parts_count_equally(judge):
    chain = make_chain(SOURCE, [Edit("position_change", RED_CIRCLE, new_cell=(1, 0))])
    removed_only = Scene("white", (BLUE_SQUARE,))
    moved_wrong_colour = Scene("white", (BLUE_SQUARE, ToyObject((1, 0), "circle", "yellow")))
    # the circle drawn at the new cell but left at the old one too (not a valid scene: paint it by hand)
    moved = chain.scenes[1]
    copied_rgb = np.where(
        (SPEC.render_instances(SOURCE) > 0)[..., None],
        np.asarray(SPEC.render(SOURCE)),
        np.asarray(SPEC.render(moved)),
    )
    copied = Image.fromarray(copied_rgb)
    if_, cc, _ = scores(judge, [item(chain, [s]) for s in (removed_only, moved_wrong_colour, copied)])
    np.testing.assert_allclose(if_[:, 0], [3.0, 1 + 4 * (1 + 0.5) / 2, 3.0])
    assert (cc == 5).all()


def test_collateral_damage_costs_cc_per_unit(judge):
    chain = make_chain(SOURCE, [Edit("color_alter", RED_CIRCLE, new_color="green")])
    # the edit is right but the untouched blue square vanished: units = background (intact) and square (lost)
    damaged = Scene("white", (ToyObject((0, 0), "circle", "green"),))
    if_, cc, _ = scores(judge, [item(chain, [damaged])])
    assert if_[0, 0] == 5 and cc[0, 0] == pytest.approx(1 + 4 * (1.0 + 0.0) / 2)


def test_cc_is_relative_to_the_source_and_damage_persists(judge):
    edits = [
        Edit("color_alter", RED_CIRCLE, new_color="green"),
        Edit("background_change", new_background="black"),
    ]
    chain = make_chain(SOURCE, edits)
    # turn 1 fails (circle unchanged) and wipes the square; turn 2 changes the background correctly.
    turn1 = Scene("white", (RED_CIRCLE,))
    turn2 = Scene("black", (RED_CIRCLE,))
    if_, cc, _ = scores(judge, [item(chain, [turn1, turn2])])
    assert if_[0, 0] == 1 and if_[0, 1] == 5
    # turn 1 units: background + square; turn 2: the background changed, so only the square is left to preserve
    assert cc[0, 0] == pytest.approx(3.0) and cc[0, 1] == pytest.approx(1.0)
    # the failed recolour of turn 1 does not count against turn 2's CC (the circle is no longer in U_2)
    good = Scene("black", (RED_CIRCLE, BLUE_SQUARE))
    _, cc, _ = scores(judge, [item(chain, [Scene("white", SOURCE.objects), good])])
    assert cc[0, 1] == 5


def test_snapping_tolerates_decoder_noise_and_resizing(judge):
    world = ToyWorld()
    chains = [world.chain(i) for i in range(20)]
    rng = np.random.default_rng(0)
    noisy_items, big_items = [], []
    for c in chains:
        noisy, big = [], []
        for s in c.scenes[1:]:
            rgb = np.asarray(SPEC.render(s)).astype(np.int16)
            noise = rng.integers(-20, 21, size=rgb.shape)  # |noise| <= 20 * sqrt(3) < 48
            noisy.append(Image.fromarray(np.clip(rgb + noise, 0, 255).astype(np.uint8)))
            big.append(SPEC.render(s).resize((64, 64), Image.Resampling.NEAREST))
        noisy_items.append(item(c, noisy))
        big_items.append(item(c, big))
    for items in (noisy_items, big_items):
        if_, cc, _ = scores(judge, items)
        assert (if_ == 5).all() and (cc == 5).all()


def test_snap_to_palette_and_its_table_agree():
    palette = SPEC.palette
    red = palette[SPEC.label("red")].astype(int)
    near = np.array([[red + [47, 0, 0]], [red - [0, 0, 30]]]).clip(0, 255).astype(np.uint8)
    far = np.array([[red + [0, 49, 0]]]).astype(np.uint8)
    assert (snap_to_palette(near, palette, 48.0) == SPEC.label("red")).all()
    assert (snap_to_palette(far, palette, 48.0) == OFF_PALETTE).all()
    table = palette_lookup_table(palette, 48.0)
    pixels = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3)).astype(np.uint8)
    pixels[:8] = palette[np.arange(8) % len(palette)][:, None]  # some exact palette colours too
    np.testing.assert_array_equal(snap_with_table(pixels, table), snap_to_palette(pixels, palette, 48.0))


def test_label_edges_by_hand():
    labels = np.zeros((4, 5), dtype=np.uint8)
    labels[1:3, 1:3] = 1
    expected = np.array([[0, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(label_edges(labels), expected)


def reference_scores(truth, outputs, instances, is_shape, edge_weight, credit, protect):
    """Straight per-pixel loops in float64 (the formulas of the judge's docstring, written independently)."""
    n, k1, h, w = truth.shape

    def is_edge(lab, y, x):
        return any(
            0 <= y + dy < h and 0 <= x + dx < w and lab[y + dy, x + dx] != lab[y, x]
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1))
        )

    if_out = np.full((n, k1 - 1), np.nan)
    cc_out = np.full((n, k1 - 1), np.nan)
    for i in range(n):
        for k in range(1, k1):
            prev, tgt, src, out = truth[i, k - 1], truth[i, k], truth[i, 0], outputs[i, k - 1]
            groups: dict = {}
            units: dict = {}
            for y in range(h):
                for x in range(w):
                    if prev[y, x] != tgt[y, x]:
                        wt = edge_weight if (is_edge(prev, y, x) or is_edge(tgt, y, x)) else 1.0
                        o = out[y, x]
                        if o == tgt[y, x]:
                            s = 1.0
                        elif o >= 0 and o != prev[y, x] and is_shape[o] == is_shape[tgt[y, x]]:
                            s = credit
                        else:
                            s = 0.0
                        g = groups.setdefault((prev[y, x], tgt[y, x]), [0.0, 0.0])
                        g[0] += wt * s
                        g[1] += wt
                    handed = src[y, x] if k == 1 else outputs[i, k - 2, y, x]  # what turn k received
                    if all(truth[i, j, y, x] == src[y, x] for j in range(k + 1)):  # never edited: vs source
                        wt = edge_weight if (is_edge(src, y, x) or is_edge(tgt, y, x)) else 1.0
                        u = units.setdefault(("source", instances[i, 0, y, x]), [0.0, 0.0])
                        u[0] += wt * float(out[y, x] == src[y, x])
                        u[1] += wt
                    elif protect and prev[y, x] == tgt[y, x] and handed == prev[y, x]:  # delivered earlier
                        wt = edge_weight if (is_edge(prev, y, x) or is_edge(tgt, y, x)) else 1.0
                        u = units.setdefault(("target", instances[i, k, y, x]), [0.0, 0.0])
                        u[0] += wt * float(out[y, x] == tgt[y, x])
                        u[1] += wt
            if groups:
                if_out[i, k - 1] = np.mean([a / b for a, b in groups.values()])
            if units:
                cc_out[i, k - 1] = np.mean([a / b for a, b in units.values()])
    return if_out, cc_out


def test_exact_scores_match_a_float64_reference_on_random_outputs():
    spec = RenderSpec(image_size=16)
    world = ToyWorld(image_size=16)
    rng = np.random.default_rng(5)
    chains = [world.chain(i) for i in range(6)]
    truth = np.stack([np.stack([spec.render_labels(s) for s in c.scenes]) for c in chains]).astype(np.int64)
    instances = np.stack([np.stack([spec.render_instances(scene) for scene in c.scenes]) for c in chains])
    # outputs: the ground truth with a third of the pixels replaced by random labels (some off palette)
    outputs = truth[:, 1:].copy()
    mask = rng.random(outputs.shape) < 0.33
    outputs[mask] = rng.integers(-1, len(spec.palette), size=mask.sum())
    cc_by_protect = {}
    for protect in (False, True):
        result = exact_scores(truth, outputs, instances, spec.label_is_shape_color, 0.3, 0.4, protect)
        ref_if, ref_cc = reference_scores(
            truth, outputs, instances, spec.label_is_shape_color, 0.3, 0.4, protect
        )
        np.testing.assert_allclose(result.if_match, ref_if, rtol=0, atol=1e-12)
        np.testing.assert_allclose(result.cc_preserved, ref_cc, rtol=0, atol=1e-12)
        cc_by_protect[protect] = result.cc_preserved
    assert not np.allclose(
        cc_by_protect[False][:, 1:], cc_by_protect[True][:, 1:]
    )  # D_k really changed later turns
    np.testing.assert_array_equal(cc_by_protect[False][:, 0], cc_by_protect[True][:, 0])  # turn 1 has no D_k
    assert 0 < np.nanmin(result.if_match) and np.nanmax(result.if_match) < 1  # the noise really bit
    np.testing.assert_allclose(result.off_palette, (outputs < 0).mean(axis=(2, 3)))


def test_unscorable_items_are_flagged_not_zeroed(judge):
    world = ToyWorld()
    good = world.chain(0)
    ok = item(good, good.scenes[1:], "ok")
    missing = ScoringItem("missing", "c", ok.source, ok.outputs, ok.instructions, {})
    wrong_text = ScoringItem("text", good.chain_id, ok.source, ok.outputs, ["x", "y", "z"], good.metadata())
    # a hand-made chain whose turn 2 leaves nothing to preserve: the background changed, the only object is removed,
    # and turn 1's output left the old background (so no earlier edit was delivered either)
    one = Scene("white", (RED_CIRCLE,))
    empty_chain = make_chain(
        one, [Edit("background_change", new_background="black"), Edit("subject_remove", RED_CIRCLE)]
    )
    empty = item(empty_chain, [one, empty_chain.scenes[2]], "empty")
    short = ScoringItem(
        "short", good.chain_id, ok.source, ok.outputs[:2], ok.instructions[:2], good.metadata()
    )
    if_, cc, batch = scores(judge, [ok, missing, wrong_text])
    assert batch.scored[0].all() and (if_[0] == 5).all()
    for row in (1, 2):
        assert not batch.scored[row].any() and np.isnan(if_[row]).all() and np.isnan(cc[row]).all()
    assert "missing" in batch.diagnostics[1]["error"] and "'toy'" in batch.diagnostics[1]["error"]
    assert "turn 1 instruction 'x'" in batch.diagnostics[2]["error"]
    assert batch.trajectory_scored.tolist() == [True, False, False]
    if_, cc, batch = scores(judge, [empty, short])
    assert batch.scored[0].tolist() == [True, False] and math.isnan(if_[0, 1]) and math.isnan(cc[0, 1])
    assert if_[0, 0] == 1 and "turn 2: nothing left that should be preserved" in batch.diagnostics[0]["error"]
    assert not batch.scored[1].any() and "ground truth has 3 turns" in batch.diagnostics[1]["error"]


def test_scores_depend_on_metadata_alone_and_are_deterministic():
    world = ToyWorld()
    chains = [world.chain(i) for i in range(30)]
    rng = np.random.default_rng(2)
    items = []
    for c in chains:  # each turn randomly perfect, untouched or the source
        outs = [
            c.scenes[k + 1] if rng.random() < 0.5 else c.scenes[int(rng.integers(0, k + 1))] for k in range(3)
        ]
        items.append(item(c, outs))
    a = ToyJudge().score(items)
    over_http = [
        ScoringItem(
            it.item_id,
            it.chain_id,
            it.source,
            it.outputs,
            it.instructions,
            json.loads(json.dumps(it.metadata)),
        )
        for it in items
    ]
    b = ToyJudge().score(over_http)
    assert a.instruction_following.equal(b.instruction_following)
    assert a.content_consistency.equal(b.content_consistency)
    assert len(set(a.instruction_following.flatten().tolist())) > 2


def test_collapsed_single_turn_scores_the_merged_edit(judge):
    chain = make_chain(
        SOURCE, [Edit("color_alter", RED_CIRCLE, new_color="green"), Edit("subject_remove", BLUE_SQUARE)]
    )
    merged = collapse_to_single_turn(chain.metadata(), "do both")
    source = SPEC.render(SOURCE)
    done = ScoringItem("m", "c", source, [SPEC.render(chain.scenes[-1])], ["do both"], merged)
    nothing = ScoringItem("n", "c", source, [source], ["do both"], merged)
    half = ScoringItem("h", "c", source, [SPEC.render(chain.scenes[1])], ["do both"], merged)
    if_, cc, batch = scores(judge, [done, nothing, half])
    assert batch.scored.all()
    np.testing.assert_allclose(if_[:, 0], [5.0, 1.0, 3.0])  # two transitions: red->green, blue->white
    assert (cc == 5).all()


def test_protected_cc_charges_a_later_turn_that_wrecks_an_earlier_edit_but_not_an_earlier_failure():
    judge = ToyJudge(protect_earlier_edits=True)
    chain = make_chain(
        SOURCE,
        [
            Edit("subject_add", new_shape="triangle", new_color="green", new_cell=(0, 1)),
            Edit("background_change", new_background="black"),
        ],
    )
    added, repainted = chain.scenes[1], chain.scenes[2]
    # turn 2 changes the background right but erases the triangle turn 1 added: turn 2's units are the circle and
    # the square (never edited, intact) and the triangle (delivered by turn 1, lost): CC = 1 + 4 * (1 + 1 + 0) / 3
    erased = Scene("black", SOURCE.objects)
    if_, cc, _ = scores(judge, [item(chain, [added, erased]), item(chain, [added, repainted])])
    assert if_[0].tolist() == [5, 5] and cc[0, 0] == 5
    assert cc[0, 1] == pytest.approx(1 + 4 * 2 / 3)
    assert cc[1].tolist() == [5, 5]
    # the default judge checks the never-edited circle and square only, so the erased triangle is free
    _, unprotected, _ = scores(ToyJudge(), [item(chain, [added, erased])])
    assert unprotected[0].tolist() == [5, 5]
    # turn 1 failed (no triangle): its failure is not charged again to turn 2, which has nothing of it to keep
    if_, cc, _ = scores(judge, [item(chain, [SOURCE, erased])])
    assert if_[0, 0] == 1 and if_[0, 1] == 5 and cc[0].tolist() == [5, 5]

    # a background changed by turn 1 and repainted by turn 2: the square is intact, the new background is lost
    chain = make_chain(
        SOURCE,
        [
            Edit("background_change", new_background="black"),
            Edit("color_alter", RED_CIRCLE, new_color="green"),
        ],
    )
    green = ToyObject((0, 0), "circle", "green")
    if_, cc, _ = scores(judge, [item(chain, [chain.scenes[1], Scene("gray", (green, BLUE_SQUARE))])])
    assert if_[0].tolist() == [5, 5] and cc[0, 0] == 5 and cc[0, 1] == pytest.approx(1 + 4 * (1 + 0) / 2)


def test_jittered_chains_score_five_only_where_the_offset_is_kept(judge):
    world = ToyWorld(position_jitter=2)
    chains = [world.chain(i, "heldout") for i in range(40)]
    if_, cc, batch = scores(judge, [item_of(c, world) for c in chains])
    assert (if_ == 5).all() and (cc == 5).all() and batch.scored.all()
    # a recolour rendered at the centred position instead of the object's offset is not a perfect edit
    source = Scene("white", (ToyObject((0, 0), "circle", "red", offset=(2, 2)),))
    chain = make_chain(source, [Edit("color_alter", target=source.objects[0], new_color="blue")])
    centred = Scene("white", (ToyObject((0, 0), "circle", "blue"),))
    if_, cc, _ = scores(judge, [item(chain, [centred])])
    # part of the circle left background-coloured (IF), and blue painted on never-edited background (CC)
    assert 1 < if_[0, 0] < 5 and cc[0, 0] < 5


def item_of(chain: ToyChainSample, world: ToyWorld) -> ScoringItem:
    images = [world.render(s) for s in chain.scenes[1:]]
    return ScoringItem(
        "g0", chain.chain_id, world.render(chain.scenes[0]), images, chain.instructions, chain.metadata()
    )
