"""The toy edit world: scenes of flat-coloured shapes on a coloured background, exact edits, templated instructions.

A *scene* is a background colour and up to ``max_shapes`` objects, each a (shape, colour) placed in one cell of a
``grid_size`` x ``grid_size`` grid. No two objects of a scene share (shape, colour), so "the red circle" always
names exactly one object. Scenes are rendered with PIL, without anti-aliasing, so every pixel of a rendered scene
is exactly one palette colour: the renderer draws a *label map* (palette indices) and the RGB image is the palette
looked up at those labels. The judge (``mtflow.toy.judge``) re-renders the ground truth from JSON with the same code.

Edit types (EdiVal's names where one fits):

============================  ============================================================  ===================
type                          instruction (canonical template)                              valid when
============================  ============================================================  ===================
``color_alter``               change the color of the red circle to blue                    (circle, blue) free
``subject_add``               add a blue square in the top left                             cell empty, < max
``subject_remove``            remove the red circle                                         an object exists
``subject_replace``           replace the red circle with a blue square                     new shape differs
``position_change``           move the red circle to the bottom right                       target cell empty
``background_change``         change the background to black                                new colour differs
============================  ============================================================  ===================

``templates_per_type`` > 1 draws among paraphrases ("make the red circle blue", ...).

Chains: K turns, each instruction sampled among the edits valid on the ground-truth scene it applies to (the edit
type first, by ``edit_type_weights``, then uniformly among that type's valid edits). A chain is also rejected if,
at some turn, fewer than ``min_preserved_fraction`` of the pixels are left that no turn so far has changed: the
judge's content-consistency region (see ``mtflow.toy.judge``) is never empty for a world chain.

Splits: every scene belongs to exactly one split, decided by a hash of its canonical JSON (and ``split_salt``);
``heldout_fraction`` of the scene space is held out. Train and held-out chains are drawn from their own split's
source scenes, so they share no source scene by construction, whatever their number. Every chain / pair is a pure
function of (``seed``, split, index): datasets are random-access and reproducible.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from mtflow.data.records import EditChain

Split = Literal["train", "heldout"]
SPLITS: tuple[str, ...] = ("train", "heldout")

EDIT_TYPES: tuple[str, ...] = (
    "color_alter",
    "subject_add",
    "subject_remove",
    "subject_replace",
    "position_change",
    "background_change",
)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")

# Palettes: names are single words; every pair of colours (both palettes together) is >= 95 apart in RGB, so a
# decoded pixel snaps to its colour unambiguously. Shape and background palettes are disjoint.
DEFAULT_SHAPE_PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 30),
    "purple": (140, 40, 190),
    "orange": (250, 120, 20),
}
DEFAULT_BACKGROUND_PALETTE: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "cyan": (40, 200, 210),
}

# Instruction templates per edit type; the first one is canonical. Fields: {color} {shape} (the object the edit
# acts on), {new_color} {new_shape} {cell} {background}.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "color_alter": (
        "change the color of the {color} {shape} to {new_color}",
        "make the {color} {shape} {new_color}",
        "turn the {color} {shape} {new_color}",
    ),
    "subject_add": (
        "add a {new_color} {new_shape} in the {cell}",
        "put a {new_color} {new_shape} in the {cell}",
        "add a {new_color} {new_shape} to the {cell}",
    ),
    "subject_remove": (
        "remove the {color} {shape}",
        "delete the {color} {shape}",
        "remove the {color} {shape} from the image",
    ),
    "subject_replace": (
        "replace the {color} {shape} with a {new_color} {new_shape}",
        "change the {color} {shape} into a {new_color} {new_shape}",
        "turn the {color} {shape} into a {new_color} {new_shape}",
    ),
    "position_change": (
        "move the {color} {shape} to the {cell}",
        "put the {color} {shape} in the {cell}",
        "move the {color} {shape} into the {cell}",
    ),
    "background_change": (
        "change the background to {background}",
        "make the background {background}",
        "turn the background {background}",
    ),
}

_ROW_NAMES = {2: ("top", "bottom"), 3: ("top", "middle", "bottom")}
_COL_NAMES = {2: ("left", "right"), 3: ("left", "center", "right")}


def cell_name(cell: tuple[int, int], grid_size: int) -> str:
    """Human name of a grid cell: ``(0, 1)`` in a 2x2 grid is "top right"; the middle of a 3x3 grid is "center"."""
    row, col = cell
    if grid_size == 3 and (row, col) == (1, 1):
        return "center"
    return f"{_ROW_NAMES[grid_size][row]} {_COL_NAMES[grid_size][col]}"


@dataclass(frozen=True, order=True)
class ToyObject:
    """One shape of a scene: what it is, which grid cell (row, column) it occupies and, in a world with
    ``position_jitter``, its offset (down, right) in pixels from the cell's centred position."""

    cell: tuple[int, int]
    shape: str
    color: str
    offset: tuple[int, int] = (0, 0)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "shape": self.shape,
            "color": self.color,
            "cell": [int(self.cell[0]), int(self.cell[1])],
        }
        if self.offset != (
            0,
            0,
        ):  # absent when centred: scenes of an unjittered world keep their JSON (and split)
            out["offset"] = [int(self.offset[0]), int(self.offset[1])]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ToyObject:
        offset = data.get("offset", (0, 0))
        return cls(
            cell=(int(data["cell"][0]), int(data["cell"][1])),
            shape=str(data["shape"]),
            color=str(data["color"]),
            offset=(int(offset[0]), int(offset[1])),
        )

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A scene graph: background colour name and objects (kept sorted by cell, so equal scenes compare equal)."""

    background: str
    objects: tuple[ToyObject, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(sorted(self.objects)))
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"scene has two objects in one cell: {self.to_json()}")
        kinds = [(o.shape, o.color) for o in self.objects]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"scene has two objects with the same shape and colour: {self.to_json()}")

    def to_json(self) -> dict[str, Any]:
        return {"background": self.background, "objects": [o.to_json() for o in self.objects]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Scene:
        return cls(
            background=str(data["background"]), objects=tuple(ToyObject.from_json(o) for o in data["objects"])
        )

    def key(self) -> str:
        """Canonical JSON text of the scene (hashing, caching, split assignment)."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    def find(self, shape: str, color: str) -> ToyObject:
        for o in self.objects:
            if o.shape == shape and o.color == color:
                return o
        raise KeyError(f"no {color} {shape} in scene {self.key()}")

    def occupied(self) -> set[tuple[int, int]]:
        return {o.cell for o in self.objects}

    def kinds(self) -> set[tuple[str, str]]:
        return {(o.shape, o.color) for o in self.objects}


@dataclass(frozen=True)
class RenderSpec:
    """How scenes become pixels; JSON-serialisable so a judge can re-render the ground truth from metadata alone.

    Labels: background colours take indices ``0 .. B-1`` (in ``background_palette`` order), shape colours
    ``B .. B+S-1``. Shapes are drawn without anti-aliasing, so a rendered image holds palette colours only.
    """

    image_size: int = 32
    grid_size: int = 2
    shape_scale: float = 0.75
    background_palette: tuple[tuple[str, tuple[int, int, int]], ...] = tuple(
        DEFAULT_BACKGROUND_PALETTE.items()
    )
    shape_palette: tuple[tuple[str, tuple[int, int, int]], ...] = tuple(DEFAULT_SHAPE_PALETTE.items())

    def __post_init__(self) -> None:
        if self.image_size < 8 or self.image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 and >= 8, got {self.image_size}")
        if self.grid_size not in _ROW_NAMES:
            raise ValueError(f"grid_size must be one of {sorted(_ROW_NAMES)}, got {self.grid_size}")
        if not 0.2 <= self.shape_scale <= 1.0:
            raise ValueError(f"shape_scale must be in [0.2, 1], got {self.shape_scale}")
        names = [n for n, _ in self.background_palette] + [n for n, _ in self.shape_palette]
        if len(set(names)) != len(names):
            raise ValueError(f"colour names must be unique across both palettes, got {names}")
        rgbs = [tuple(c) for _, c in self.background_palette] + [tuple(c) for _, c in self.shape_palette]
        if len(set(rgbs)) != len(rgbs):
            raise ValueError("two palette entries share one RGB value")
        for name, rgb in zip(names, rgbs):
            if len(rgb) != 3 or not all(0 <= int(v) <= 255 for v in rgb):
                raise ValueError(f"colour {name!r} must be three integers in [0, 255], got {rgb}")
        if len(self.background_palette) < 2 or len(self.shape_palette) < 2:
            raise ValueError("need at least two background and two shape colours")

    # ----- palette -----
    @property
    def color_names(self) -> list[str]:
        """Palette colour names in label order (backgrounds first)."""
        return [n for n, _ in self.background_palette] + [n for n, _ in self.shape_palette]

    @property
    def palette(self) -> np.ndarray:
        """[P, 3] uint8: RGB of every label."""
        return np.array(
            [c for _, c in self.background_palette] + [c for _, c in self.shape_palette], dtype=np.uint8
        )

    @property
    def label_is_shape_color(self) -> np.ndarray:
        """[P] bool: True for shape-palette labels, False for background-palette labels."""
        b = len(self.background_palette)
        return np.arange(b + len(self.shape_palette)) >= b

    def label(self, color: str) -> int:
        try:
            return self.color_names.index(color)
        except ValueError:
            raise KeyError(f"colour {color!r} is not in the palette {self.color_names}") from None

    # ----- geometry -----
    def cell_box(self, cell: tuple[int, int]) -> tuple[int, int, int]:
        """(x0, y0, side) of the square a shape in ``cell`` is drawn in (inclusive pixel coordinates start)."""
        edges = [round(i * self.image_size / self.grid_size) for i in range(self.grid_size + 1)]
        row, col = cell
        cx0, cx1 = edges[col], edges[col + 1]
        cy0, cy1 = edges[row], edges[row + 1]
        side = max(2, round(min(cx1 - cx0, cy1 - cy0) * self.shape_scale))
        return cx0 + (cx1 - cx0 - side) // 2, cy0 + (cy1 - cy0 - side) // 2, side

    def cell_margin(self) -> int:
        """Fewest pixels between a centred shape and its cell's border (the largest offset that stays inside)."""
        edges = [round(i * self.image_size / self.grid_size) for i in range(self.grid_size + 1)]
        margins = []
        for row in range(self.grid_size):
            for col in range(self.grid_size):
                x0, y0, side = self.cell_box((row, col))
                margins += [
                    x0 - edges[col],
                    edges[col + 1] - x0 - side,
                    y0 - edges[row],
                    edges[row + 1] - y0 - side,
                ]
        return min(margins)

    def _draw(self, draw: ImageDraw.ImageDraw, obj: ToyObject, fill: int) -> None:
        x0, y0, s = self.cell_box(obj.cell)
        x0, y0 = x0 + obj.offset[1], y0 + obj.offset[0]
        x1, y1 = x0 + s - 1, y0 + s - 1
        cy = y0 + (s - 1) / 2
        if obj.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        elif obj.shape in ("triangle", "diamond"):
            # Row by row, centred spans of even margin: exactly left-right symmetric whatever the side parity.
            for i in range(s):
                if obj.shape == "triangle":
                    inset = (s - 1 - i) // 2
                else:
                    inset = int(abs(i - cy + y0))
                draw.rectangle([x0 + inset, y0 + i, x1 - inset, y0 + i], fill=fill)
        elif obj.shape == "cross":
            t = s // 3
            draw.rectangle([x0, y0 + t, x1, y1 - t], fill=fill)
            draw.rectangle([x0 + t, y0, x1 - t, y1], fill=fill)
        else:
            raise KeyError(f"unknown shape {obj.shape!r}; known: {SHAPES}")

    # ----- rendering -----
    def render_labels(self, scene: Scene) -> np.ndarray:
        """[H, W] uint8 palette labels of ``scene``."""
        img = Image.new("L", (self.image_size, self.image_size), self.label(scene.background))
        draw = ImageDraw.Draw(img)
        for obj in scene.objects:
            self._draw(draw, obj, self.label(obj.color))
        return np.asarray(img)

    def render_instances(self, scene: Scene) -> np.ndarray:
        """[H, W] uint8: 0 on the background, i + 1 on the pixels of ``scene.objects[i]``."""
        img = Image.new("L", (self.image_size, self.image_size), 0)
        draw = ImageDraw.Draw(img)
        for i, obj in enumerate(scene.objects):
            self._draw(draw, obj, i + 1)
        return np.asarray(img)

    def render(self, scene: Scene) -> Image.Image:
        """The RGB image of ``scene`` (palette colours only)."""
        return Image.fromarray(self.palette[self.render_labels(scene)], mode="RGB")

    # ----- JSON -----
    def to_json(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "grid_size": self.grid_size,
            "shape_scale": self.shape_scale,
            "background_palette": [[n, list(c)] for n, c in self.background_palette],
            "shape_palette": [[n, list(c)] for n, c in self.shape_palette],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RenderSpec:
        return cls(
            image_size=int(data["image_size"]),
            grid_size=int(data["grid_size"]),
            shape_scale=float(data["shape_scale"]),
            background_palette=tuple(
                (str(n), tuple(int(v) for v in c)) for n, c in data["background_palette"]
            ),
            shape_palette=tuple((str(n), tuple(int(v) for v in c)) for n, c in data["shape_palette"]),
        )


@dataclass(frozen=True)
class Edit:
    """One edit of a scene. ``target`` is the object acted on (None for add and background change)."""

    type: str
    target: ToyObject | None = None
    new_color: str | None = None
    new_shape: str | None = None
    new_cell: tuple[int, int] | None = None
    new_background: str | None = None

    def apply(self, scene: Scene) -> Scene:
        """The scene after this edit (raises if the edit is not valid on ``scene``)."""
        objects = list(scene.objects)
        if self.type == "background_change":
            if self.new_background == scene.background:
                raise ValueError(f"background is already {self.new_background}")
            return Scene(self.new_background, scene.objects)
        if self.type == "subject_add":
            if self.new_cell in scene.occupied():
                raise ValueError(f"cell {self.new_cell} is occupied in {scene.key()}")
            return Scene(
                scene.background, (*objects, ToyObject(self.new_cell, self.new_shape, self.new_color))
            )
        if self.target not in objects:
            raise ValueError(f"{self.type}: no {self.target} in scene {scene.key()}")
        objects.remove(self.target)
        t = self.target
        if self.type == "subject_remove":
            return Scene(scene.background, tuple(objects))
        if self.type == "color_alter":
            if self.new_color == t.color:
                raise ValueError(f"color_alter to the same colour {t.color}")
            new = ToyObject(t.cell, t.shape, self.new_color, t.offset)
        elif self.type == "subject_replace":
            if self.new_shape == t.shape:
                raise ValueError(f"subject_replace keeps the shape {t.shape}")
            new = ToyObject(t.cell, self.new_shape, self.new_color, t.offset)
        elif self.type == "position_change":
            if self.new_cell in scene.occupied():
                raise ValueError(f"cell {self.new_cell} is occupied in {scene.key()}")
            new = ToyObject(
                self.new_cell, t.shape, t.color
            )  # centred in its new cell: all the instruction says
        else:
            raise KeyError(f"unknown edit type {self.type!r}; known: {EDIT_TYPES}")
        return Scene(scene.background, (*objects, new))

    def instruction(self, grid_size: int, template_index: int = 0) -> str:
        """The instruction text, from template ``template_index`` of this edit type."""
        fields = {
            "color": self.target.color if self.target else "",
            "shape": self.target.shape if self.target else "",
            "new_color": self.new_color or "",
            "new_shape": self.new_shape or "",
            "cell": cell_name(self.new_cell, grid_size) if self.new_cell is not None else "",
            "background": self.new_background or "",
        }
        text = TEMPLATES[self.type][template_index].format(**fields)
        return re.sub(r"\ba (?=[aeiou])", "an ", text)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.target is not None:
            out["target"] = self.target.to_json()
        if self.new_color is not None:
            out["new_color"] = self.new_color
        if self.new_shape is not None:
            out["new_shape"] = self.new_shape
        if self.new_cell is not None:
            out["new_cell"] = [int(self.new_cell[0]), int(self.new_cell[1])]
        if self.new_background is not None:
            out["new_background"] = self.new_background
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Edit:
        return cls(
            type=str(data["type"]),
            target=ToyObject.from_json(data["target"]) if "target" in data else None,
            new_color=data.get("new_color"),
            new_shape=data.get("new_shape"),
            new_cell=tuple(data["new_cell"]) if "new_cell" in data else None,
            new_background=data.get("new_background"),
        )


@dataclass
class ToyChainSample:
    """A sampled chain with its ground truth: ``scenes[0]`` is the source, ``scenes[k]`` the target of turn k."""

    chain_id: str
    split: str
    scenes: list[Scene]
    edits: list[Edit]
    instructions: list[str]
    spec: RenderSpec = field(repr=False)

    @property
    def num_turns(self) -> int:
        return len(self.edits)

    def images(self) -> list[Image.Image]:
        """K + 1 rendered images: the source, then the target of every turn."""
        return [self.spec.render(s) for s in self.scenes]

    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable ground truth; the judge scores from this alone (see ``mtflow.toy.judge``)."""
        return {
            "toy": {
                "version": 1,
                "split": self.split,
                "render": self.spec.to_json(),
                "scenes": [s.to_json() for s in self.scenes],
                "edits": [e.to_json() for e in self.edits],
                "instructions": list(self.instructions),
            }
        }

    def to_edit_chain(self) -> EditChain:
        return EditChain(
            chain_id=self.chain_id,
            source=self.spec.render(self.scenes[0]),
            instructions=list(self.instructions),
            edit_types=[e.type for e in self.edits],
            metadata=self.metadata(),
        )


class ToyWorld:
    """Samples scenes, valid edits, K-turn chains and single-turn pairs; all seeded and reproducible."""

    def __init__(
        self,
        image_size: int = 32,
        grid_size: int = 2,
        shape_scale: float = 0.75,
        min_shapes: int = 1,
        max_shapes: int = 3,
        shapes: Sequence[str] = ("circle", "square", "triangle"),
        shape_palette: dict[str, tuple[int, int, int]] | None = None,
        background_palette: dict[str, tuple[int, int, int]] | None = None,
        edit_types: Sequence[str] = EDIT_TYPES,
        edit_type_weights: dict[str, float] | None = None,
        num_turns: int = 3,
        templates_per_type: int = 1,
        heldout_fraction: float = 0.1,
        split_salt: int = 0,
        min_preserved_fraction: float = 0.05,
        position_jitter: int = 0,
        seed: int = 0,
    ) -> None:
        """
        Args:
            image_size: side of the square images in pixels (multiple of 4).
            grid_size: objects sit in a grid_size x grid_size grid of cells (2 or 3).
            shape_scale: side of a shape relative to its cell.
            min_shapes: fewest objects in a source scene.
            max_shapes: most objects in any scene (adds beyond it are not offered).
            shapes: shape vocabulary (subset of ``SHAPES``).
            shape_palette: colour name -> RGB for shapes (None: ``DEFAULT_SHAPE_PALETTE``).
            background_palette: colour name -> RGB for backgrounds (None: ``DEFAULT_BACKGROUND_PALETTE``).
            edit_types: edit types chains and pairs may use (subset of ``EDIT_TYPES``).
            edit_type_weights: relative sampling weight per edit type (None: uniform over the valid types).
            num_turns: K, the number of turns of a chain.
            templates_per_type: how many instruction paraphrases per edit type to draw from (1: canonical only).
            heldout_fraction: share of the scene space reserved for the held-out split.
            split_salt: changes which scenes are held out (the partition is a hash of scene and salt).
            min_preserved_fraction: reject chains leaving less than this share of never-edited pixels at a turn.
            position_jitter: source objects sit up to this many pixels (per axis, uniform) off their cell's centred
                position; recolours and replacements keep the offset, adds and moves centre the object (all their
                instruction says). 0: every object centred (the shipped prior's world).
            seed: seed of every chain / pair / scene draw (together with split and index).
        """
        self.spec = RenderSpec(
            image_size=image_size,
            grid_size=grid_size,
            shape_scale=shape_scale,
            background_palette=tuple((background_palette or DEFAULT_BACKGROUND_PALETTE).items()),
            shape_palette=tuple((shape_palette or DEFAULT_SHAPE_PALETTE).items()),
        )
        self.shapes = tuple(shapes)
        unknown = [s for s in self.shapes if s not in SHAPES]
        if unknown or len(self.shapes) < 2:
            raise ValueError(f"shapes must be >= 2 of {SHAPES}, got {list(shapes)}")
        self.shape_colors = tuple(n for n, _ in self.spec.shape_palette)
        self.background_colors = tuple(n for n, _ in self.spec.background_palette)
        self.cells = tuple((r, c) for r in range(grid_size) for c in range(grid_size))
        if not 0 <= min_shapes <= max_shapes <= len(self.cells):
            raise ValueError(f"need 0 <= min_shapes <= max_shapes <= {len(self.cells)} cells")
        if max_shapes > len(self.shapes) * len(self.shape_colors):
            raise ValueError("max_shapes exceeds the number of distinct (shape, colour) pairs")
        self.min_shapes, self.max_shapes = min_shapes, max_shapes
        self.edit_types = tuple(edit_types)
        bad = [t for t in self.edit_types if t not in EDIT_TYPES]
        if bad or not self.edit_types:
            raise ValueError(f"edit_types must be a non-empty subset of {EDIT_TYPES}, got {list(edit_types)}")
        weights = edit_type_weights or {}
        bad = [t for t in weights if t not in self.edit_types]
        if bad or any(w < 0 for w in weights.values()):
            raise ValueError(f"edit_type_weights: unknown types {bad} or negative weights in {weights}")
        self.edit_type_weights = {t: float(weights.get(t, 1.0)) for t in self.edit_types}
        if num_turns < 1:
            raise ValueError(f"num_turns must be >= 1, got {num_turns}")
        self.num_turns = num_turns
        if not 1 <= templates_per_type <= min(len(v) for v in TEMPLATES.values()):
            raise ValueError(f"templates_per_type must be in [1, {min(len(v) for v in TEMPLATES.values())}]")
        self.templates_per_type = templates_per_type
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        self.heldout_fraction = heldout_fraction
        self.split_salt = split_salt
        if not 0.0 <= min_preserved_fraction < 1.0:
            raise ValueError(f"min_preserved_fraction must be in [0, 1), got {min_preserved_fraction}")
        self.min_preserved_fraction = min_preserved_fraction
        if not 0 <= position_jitter <= self.spec.cell_margin():
            raise ValueError(
                f"position_jitter must be in [0, {self.spec.cell_margin()}] (the cells' margin), got {position_jitter}"
            )
        self.position_jitter = position_jitter
        self.seed = seed

    # ----- randomness: every draw is a pure function of (seed, purpose, split, index) -----
    def rng(self, purpose: str, split: str, index: int) -> np.random.Generator:
        """The generator of draw ``index`` of ``purpose`` ("chain", "pair", "scene") in ``split``."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        purposes = ("chain", "pair", "scene")
        if purpose not in purposes:
            raise ValueError(f"purpose must be one of {purposes}, got {purpose!r}")
        return np.random.default_rng([self.seed, purposes.index(purpose) + 1, SPLITS.index(split), index])

    # ----- splits -----
    def split_of(self, scene: Scene) -> str:
        """The split a scene belongs to: a fixed partition of the scene space (hash of scene and salt)."""
        digest = hashlib.sha256(f"{self.split_salt}|{scene.key()}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2.0**64
        return "heldout" if u < self.heldout_fraction else "train"

    # ----- scenes -----
    def random_scene(self, rng: np.random.Generator) -> Scene:
        """A uniformly random scene (object count uniform in [min_shapes, max_shapes])."""
        n = int(rng.integers(self.min_shapes, self.max_shapes + 1))
        cell_ids = rng.choice(len(self.cells), size=n, replace=False)
        kinds = [(s, c) for s in self.shapes for c in self.shape_colors]
        kind_ids = rng.choice(len(kinds), size=n, replace=False)
        offsets = [(0, 0)] * n
        if self.position_jitter:  # drawn only when jittered: an unjittered world's scenes stay what they were
            j = self.position_jitter
            offsets = [tuple(int(v) for v in pair) for pair in rng.integers(-j, j + 1, size=(n, 2))]
        objects = tuple(
            ToyObject(self.cells[i], *kinds[k], offset) for i, k, offset in zip(cell_ids, kind_ids, offsets)
        )
        return Scene(self.background_colors[int(rng.integers(len(self.background_colors)))], objects)

    def sample_scene(self, rng: np.random.Generator, split: str, max_tries: int = 100_000) -> Scene:
        """A random scene of ``split`` (rejection sampling over the partition)."""
        for _ in range(max_tries):
            scene = self.random_scene(rng)
            if self.split_of(scene) == split:
                return scene
        raise RuntimeError(
            f"no {split} scene found in {max_tries} draws (heldout_fraction={self.heldout_fraction})"
        )

    # ----- edits -----
    def valid_edits(self, scene: Scene, edit_type: str) -> list[Edit]:
        """Every edit of ``edit_type`` that is valid on ``scene`` (deterministic order)."""
        kinds = scene.kinds()
        free = [c for c in self.cells if c not in scene.occupied()]
        out: list[Edit] = []
        if edit_type == "background_change":
            out = [Edit(edit_type, new_background=b) for b in self.background_colors if b != scene.background]
        elif edit_type == "subject_add":
            if len(scene.objects) < self.max_shapes:
                out = [
                    Edit(edit_type, new_shape=s, new_color=c, new_cell=cell)
                    for cell in free
                    for s in self.shapes
                    for c in self.shape_colors
                    if (s, c) not in kinds
                ]
        elif edit_type == "subject_remove":
            out = [Edit(edit_type, target=o) for o in scene.objects]
        elif edit_type == "color_alter":
            out = [
                Edit(edit_type, target=o, new_color=c)
                for o in scene.objects
                for c in self.shape_colors
                if (o.shape, c) not in kinds
            ]
        elif edit_type == "subject_replace":
            out = [
                Edit(edit_type, target=o, new_shape=s, new_color=c)
                for o in scene.objects
                for s in self.shapes
                if s != o.shape
                for c in self.shape_colors
                if (s, c) not in kinds
            ]
        elif edit_type == "position_change":
            out = [Edit(edit_type, target=o, new_cell=cell) for o in scene.objects for cell in free]
        else:
            raise KeyError(f"unknown edit type {edit_type!r}; known: {EDIT_TYPES}")
        return out

    def sample_edit(self, scene: Scene, rng: np.random.Generator) -> Edit:
        """A random valid edit: the type by ``edit_type_weights`` among the types valid here, then uniform."""
        options = {t: self.valid_edits(scene, t) for t in self.edit_types}
        types = [t for t in self.edit_types if options[t] and self.edit_type_weights[t] > 0]
        if not types:
            raise RuntimeError(f"no valid edit of types {self.edit_types} on scene {scene.key()}")
        w = np.array([self.edit_type_weights[t] for t in types])
        t = types[int(rng.choice(len(types), p=w / w.sum()))]
        return options[t][int(rng.integers(len(options[t])))]

    def instruction(self, edit: Edit, rng: np.random.Generator) -> str:
        return edit.instruction(self.spec.grid_size, int(rng.integers(self.templates_per_type)))

    # ----- chains -----
    def sample_chain(
        self,
        rng: np.random.Generator,
        split: str,
        chain_id: str,
        num_turns: int | None = None,
        max_tries: int = 200,
    ) -> ToyChainSample:
        """A K-turn chain from a ``split`` source scene; each edit is valid on the scene it applies to and leaves
        at least ``min_preserved_fraction`` of the pixels never edited so far."""
        num_turns = num_turns or self.num_turns
        area = self.spec.image_size**2
        for _ in range(max_tries):
            scenes = [self.sample_scene(rng, split)]
            source_labels = self.spec.render_labels(scenes[0])
            never_changed = np.ones_like(source_labels, dtype=bool)
            edits: list[Edit] = []
            instructions: list[str] = []
            for _turn in range(num_turns):
                for _attempt in range(20):
                    edit = self.sample_edit(scenes[-1], rng)
                    after = edit.apply(scenes[-1])
                    labels = self.spec.render_labels(after)
                    keep = never_changed & (labels == source_labels)
                    changed = labels != self.spec.render_labels(scenes[-1])
                    if changed.any() and keep.sum() >= self.min_preserved_fraction * area and keep.any():
                        break
                else:
                    break
                never_changed = keep
                edits.append(edit)
                instructions.append(self.instruction(edit, rng))
                scenes.append(after)
            if len(edits) == num_turns:
                return ToyChainSample(chain_id, split, scenes, edits, instructions, self.spec)
        raise RuntimeError(f"could not sample a valid {num_turns}-turn chain in {max_tries} tries")

    def chain(self, index: int, split: str = "train", num_turns: int | None = None) -> ToyChainSample:
        """Chain ``index`` of ``split``: the same chain for the same (seed, split, index, num_turns)."""
        chain_id = f"toy/{split}/s{self.seed}/{index}"
        return self.sample_chain(self.rng("chain", split, index), split, chain_id, num_turns)

    def pair(self, index: int, split: str = "train") -> ToyChainSample:
        """Single-turn pair ``index`` of ``split`` (a 1-turn chain: source, instruction, target)."""
        pair_id = f"toy-pair/{split}/s{self.seed}/{index}"
        return self.sample_chain(self.rng("pair", split, index), split, pair_id, num_turns=1)

    # ----- text -----
    def vocabulary(self) -> list[str]:
        """Every word an instruction of this world can contain (for building tokenizers)."""
        words: set[str] = set()
        for templates in TEMPLATES.values():
            for t in templates[: self.templates_per_type]:
                words.update(w for w in t.replace("{", " {").split() if not w.startswith("{"))
        if "subject_add" in self.edit_types or "subject_replace" in self.edit_types:
            words.add("an")  # "an orange square"
        words.update(self.shapes)
        words.update(self.shape_colors)
        words.update(self.background_colors)
        for cell in self.cells:
            words.update(cell_name(cell, self.spec.grid_size).split())
        return sorted(words)

    def render(self, scene: Scene) -> Image.Image:
        return self.spec.render(scene)
