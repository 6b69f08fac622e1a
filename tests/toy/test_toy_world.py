"""The toy world: renderer, edits, instructions, chain validity, splits, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mtflow.toy.world import (
    EDIT_TYPES,
    SHAPES,
    TEMPLATES,
    Edit,
    RenderSpec,
    Scene,
    ToyObject,
    ToyWorld,
    cell_name,
)

RED_CIRCLE = ToyObject((0, 0), "circle", "red")
BLUE_SQUARE = ToyObject((1, 1), "square", "blue")
SCENE = Scene("white", (BLUE_SQUARE, RED_CIRCLE))


def test_square_covers_exactly_its_hand_computed_pixels():
    # 32 px, 2x2 grid: shape side round(16 * 0.75) = 12, centred in cell (1, 1) -> pixels 18..29
    spec = RenderSpec()
    labels = spec.render_labels(Scene("gray", (BLUE_SQUARE,)))
    expected = np.full((32, 32), spec.label("gray"), dtype=np.uint8)
    expected[18:30, 18:30] = spec.label("blue")
    np.testing.assert_array_equal(labels, expected)


def test_render_uses_palette_colours_only_and_matches_labels():
    world = ToyWorld(shapes=SHAPES)
    for i in range(20):
        scene = world.random_scene(np.random.default_rng(i))
        labels = world.spec.render_labels(scene)
        rgb = np.asarray(world.render(scene))
        np.testing.assert_array_equal(rgb, world.spec.palette[labels])
        instances = world.spec.render_instances(scene)
        # every object is visible, owns its pixels, and has the colour of its label
        for j, obj in enumerate(scene.objects):
            mask = instances == j + 1
            assert mask.sum() > 20
            assert (labels[mask] == world.spec.label(obj.color)).all()
        assert (labels[instances == 0] == world.spec.label(scene.background)).all()


def test_shapes_are_distinct_and_symmetric():
    spec = RenderSpec()
    masks = {}
    for shape in SHAPES:
        inst = spec.render_instances(Scene("white", (ToyObject((0, 0), shape, "red"),)))
        masks[shape] = inst == 1
        # every shape is left-right symmetric in its box
        box = masks[shape][2:14, 2:14]
        np.testing.assert_array_equal(box, box[:, ::-1])
    assert masks["square"].sum() == 144
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert (masks[a] != masks[b]).sum() >= 8, (a, b)
    # triangle: apex at the top, full base at the bottom
    tri = masks["triangle"][2:14, 2:14]
    assert tri[0].sum() <= 2 and tri[-1].sum() == 12


def test_scene_invariants_and_json_round_trip():
    with pytest.raises(ValueError, match="same shape and colour"):
        Scene("white", (RED_CIRCLE, ToyObject((1, 0), "circle", "red")))
    with pytest.raises(ValueError, match="one cell"):
        Scene("white", (RED_CIRCLE, ToyObject((0, 0), "square", "blue")))
    assert Scene.from_json(json.loads(json.dumps(SCENE.to_json()))) == SCENE
    assert Scene("white", (RED_CIRCLE, BLUE_SQUARE)) == SCENE  # order-independent
    spec = RenderSpec(image_size=48, grid_size=3)
    assert RenderSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


def test_edits_apply_and_read_as_written():
    cases = [
        (Edit("color_alter", RED_CIRCLE, new_color="green"), "change the color of the red circle to green",
         Scene("white", (BLUE_SQUARE, ToyObject((0, 0), "circle", "green")))),
        (Edit("subject_add", new_shape="triangle", new_color="orange", new_cell=(0, 1)),
         "add an orange triangle in the top right",
         Scene("white", (BLUE_SQUARE, RED_CIRCLE, ToyObject((0, 1), "triangle", "orange")))),
        (Edit("subject_remove", RED_CIRCLE), "remove the red circle", Scene("white", (BLUE_SQUARE,))),
        (Edit("subject_replace", RED_CIRCLE, new_shape="square", new_color="yellow"),
         "replace the red circle with a yellow square",
         Scene("white", (BLUE_SQUARE, ToyObject((0, 0), "square", "yellow")))),
        (Edit("position_change", RED_CIRCLE, new_cell=(1, 0)), "move the red circle to the bottom left",
         Scene("white", (BLUE_SQUARE, ToyObject((1, 0), "circle", "red")))),
        (Edit("background_change", new_background="black"), "change the background to black",
         Scene("black", (BLUE_SQUARE, RED_CIRCLE))),
    ]  # fmt: skip
    for edit, text, after in cases:
        assert edit.apply(SCENE) == after
        assert edit.instruction(grid_size=2) == text
        assert Edit.from_json(json.loads(json.dumps(edit.to_json()))) == edit
    with pytest.raises(ValueError):
        Edit("position_change", RED_CIRCLE, new_cell=(1, 1)).apply(SCENE)  # occupied
    with pytest.raises(ValueError):
        Edit("subject_remove", ToyObject((0, 1), "circle", "red")).apply(SCENE)  # not in the scene
    with pytest.raises(ValueError):
        Edit("color_alter", RED_CIRCLE, new_color="red").apply(SCENE)


def test_valid_edits_are_exactly_the_applicable_ones():
    world = ToyWorld(max_shapes=3)
    # 2 objects, 2 free cells, 3 shapes x 6 colours, 4 backgrounds
    counts = {t: len(world.valid_edits(SCENE, t)) for t in EDIT_TYPES}
    assert counts == {
        "color_alter": 2 * 5,
        "subject_add": 2 * (18 - 2),
        "subject_remove": 2,
        "subject_replace": 2 * (5 + 6),  # the other object's (shape, colour) is taken
        "position_change": 2 * 2,
        "background_change": 3,
    }
    full = Scene(
        "white", tuple(ToyObject(c, "circle", col) for c, col in zip(world.cells, ["red", "blue", "green"]))
    )
    assert world.valid_edits(full, "subject_add") == []  # max_shapes reached
    # a circle may not become a colour another circle already has
    assert all(e.new_color not in ("blue", "green") for e in world.valid_edits(full, "color_alter"))


def test_cell_names():
    assert [cell_name(c, 2) for c in [(0, 0), (0, 1), (1, 0), (1, 1)]] == [
        "top left", "top right", "bottom left", "bottom right",
    ]  # fmt: skip
    assert cell_name((1, 1), 3) == "center" and cell_name((1, 2), 3) == "middle right"
    assert cell_name((2, 1), 3) == "bottom center"


@pytest.mark.parametrize(
    "kwargs", [{}, {"grid_size": 3, "shapes": SHAPES, "max_shapes": 5, "templates_per_type": 3}]
)
def test_chains_are_valid_turn_by_turn(kwargs):
    world = ToyWorld(num_turns=4, **kwargs)
    area = world.spec.image_size**2
    seen_types = set()
    for i in range(60):
        chain = world.chain(i, "train" if i % 2 else "heldout")
        assert len(chain.scenes) == 5 and len(chain.edits) == len(chain.instructions) == 4
        source = world.spec.render_labels(chain.scenes[0])
        never_changed = np.ones_like(source, dtype=bool)
        for k, edit in enumerate(chain.edits):
            before, after = chain.scenes[k], chain.scenes[k + 1]
            assert edit in world.valid_edits(before, edit.type)
            assert edit.apply(before) == after
            texts = {edit.instruction(world.spec.grid_size, t) for t in range(world.templates_per_type)}
            assert chain.instructions[k] in texts
            labels = world.spec.render_labels(after)
            assert (labels != world.spec.render_labels(before)).any()
            never_changed &= labels == source
            assert never_changed.sum() >= world.min_preserved_fraction * area
            assert len(after.objects) <= world.max_shapes
            seen_types.add(edit.type)
    assert seen_types == set(EDIT_TYPES)


def test_instruction_words_are_in_the_vocabulary():
    world = ToyWorld(templates_per_type=3, shapes=SHAPES, grid_size=3, max_shapes=4)
    vocab = set(world.vocabulary())
    for i in range(100):
        for text in world.chain(i).instructions:
            assert set(text.split()) <= vocab, text
    for templates in TEMPLATES.values():
        assert len(templates) == 3


def test_splits_share_no_source_scene_and_follow_the_partition():
    world = ToyWorld(heldout_fraction=0.2)
    train = {world.chain(i, "train").scenes[0] for i in range(300)}
    held = {world.chain(i, "heldout").scenes[0] for i in range(300)}
    assert not train & held
    assert all(world.split_of(s) == "train" for s in train) and all(
        world.split_of(s) == "heldout" for s in held
    )
    rng = np.random.default_rng(0)
    share = np.mean([world.split_of(world.random_scene(rng)) == "heldout" for _ in range(4000)])
    assert abs(share - 0.2) < 0.03
    # a different salt gives a different partition
    other = ToyWorld(heldout_fraction=0.2, split_salt=1)
    assert any(other.split_of(s) != "heldout" for s in held)


def test_chains_are_reproducible_and_seeded():
    a, b, c = ToyWorld(seed=3), ToyWorld(seed=3), ToyWorld(seed=4)
    for i in (0, 7, 123):
        ca, cb = a.chain(i, "heldout"), b.chain(i, "heldout")
        assert json.dumps(ca.metadata()) == json.dumps(cb.metadata())
        assert [im.tobytes() for im in ca.images()] == [im.tobytes() for im in cb.images()]
        assert ca.chain_id == f"toy/heldout/s3/{i}"
    assert [a.chain(i).metadata() for i in range(20)] != [c.chain(i).metadata() for i in range(20)]
    # random access: chain 5 does not depend on whether chains 0..4 were drawn first
    assert ToyWorld(seed=3).chain(5).metadata() == a.chain(5).metadata()


def test_edit_type_weights_steer_sampling():
    world = ToyWorld(edit_type_weights={"background_change": 0.0, "color_alter": 5.0})
    types = [e.type for i in range(100) for e in world.chain(i).edits]
    assert "background_change" not in types
    assert types.count("color_alter") > len(types) / 3
    only = ToyWorld(edit_types=("color_alter",))
    assert {e.type for i in range(20) for e in only.chain(i).edits} == {"color_alter"}


def test_bad_configuration_is_named():
    with pytest.raises(ValueError, match="multiple of 4"):
        ToyWorld(image_size=30)
    with pytest.raises(ValueError, match="shapes"):
        ToyWorld(shapes=("circle", "blob"))
    with pytest.raises(ValueError, match="edit_types"):
        ToyWorld(edit_types=("colour",))
    with pytest.raises(ValueError, match="unique"):
        ToyWorld(shape_palette={"white": (1, 2, 3), "red": (200, 0, 0)})
    with pytest.raises(ValueError, match="split"):
        ToyWorld().chain(0, "test")


# ---------------------------------------------------------------------------------------------- position jitter
def test_an_offset_moves_the_shape_by_exactly_its_pixels_and_survives_json():
    # the square of cell (1, 1) covers 18..29 centred (see above); offset (down -2, right +1) -> rows 16..27, cols 19..30
    spec = RenderSpec()
    moved = ToyObject((1, 1), "square", "blue", offset=(-2, 1))
    labels = spec.render_labels(Scene("gray", (moved,)))
    expected = np.full((32, 32), spec.label("gray"), dtype=np.uint8)
    expected[16:28, 19:31] = spec.label("blue")
    np.testing.assert_array_equal(labels, expected)
    scene = Scene("gray", (moved, RED_CIRCLE))
    assert Scene.from_json(json.loads(scene.key())) == scene
    assert "offset" not in json.dumps(RED_CIRCLE.to_json())  # centred objects keep the JSON they always had
    assert spec.cell_margin() == 2  # (16 - 12) / 2


def test_jittered_world_offsets_sources_and_edits_keep_or_centre_them():
    world = ToyWorld(position_jitter=2)
    offsets = set()
    for i in range(80):
        chain = world.chain(i, "train")
        offsets.update(o.offset for o in chain.scenes[0].objects)
        for edit, before, after in zip(chain.edits, chain.scenes, chain.scenes[1:]):
            if edit.type in ("color_alter", "subject_replace"):  # the instruction says nothing about position
                (new,) = set(after.objects) - set(before.objects)
                assert new.cell == edit.target.cell and new.offset == edit.target.offset
            elif edit.type in ("subject_add", "position_change"):  # "in the top left": the cell's centre
                (new,) = set(after.objects) - set(before.objects)
                assert new.offset == (0, 0)
    assert offsets == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}
    # objects stay inside their cells: no two objects ever overlap
    for i in range(40):
        scene = world.random_scene(np.random.default_rng(i))
        instances = world.spec.render_instances(scene)
        for j, obj in enumerate(scene.objects):
            assert (instances == j + 1).sum() == world.spec.render_instances(Scene("white", (obj,))).astype(
                bool
            ).sum()


def test_an_unjittered_world_draws_exactly_the_chains_it_always_drew():
    # the jitter draw is skipped at 0, so the shipped prior's world (and its recorded numbers) are unchanged
    assert ToyWorld().chain(0, "heldout").instructions == [
        "change the color of the yellow circle to blue",
        "replace the blue circle with a green triangle",
        "move the green triangle to the top right",
    ]
    assert all(o.offset == (0, 0) for i in range(20) for o in ToyWorld().chain(i, "train").scenes[0].objects)
    with pytest.raises(ValueError, match="position_jitter must be in \\[0, 2\\]"):
        ToyWorld(position_jitter=3)
