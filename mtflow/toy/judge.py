"""The toy world's exact judge: per-turn IF and CC computed from the ground-truth scene graphs, no model involved.

Everything the judge needs travels in ``ScoringItem.metadata["toy"]`` (written by ``ToyChainSample.metadata``):
the render spec, the K + 1 ground-truth scenes S_0 (source) .. S_K and the K instructions. The judge re-renders
the scenes as label maps T_0 .. T_K (palette indices, exact) and the source's instance map (0 background, i + 1 on
object i).

**Reading an output.** Each output y_k is resized to the world's size if needed (PIL BOX filter) and every pixel
is snapped to the nearest palette colour (Euclidean RGB distance); a pixel farther than ``colour_tolerance`` from
every palette colour gets label -1 ("off palette"), which matches nothing. Decoded images are never exactly flat;
the palette colours are >= 95 apart, so a pixel within the tolerance has an unambiguous colour.

**Edge weight.** A pixel whose 4-neighbourhood holds another label in one of the ground-truth maps involved is an
edge pixel; it counts with weight ``edge_weight`` (default 0.25) instead of 1, because decoders blur edges and a
boundary pixel says little about whether the edit was done.

**IF (instruction following), turn k.** Edit region E_k = pixels where T_{k-1} != T_k (exactly the pixels the
instruction changes). Each pixel p of E_k scores

    s(p) = 1                       if out(p) == T_k(p)                               (correct)
         = wrong_colour_credit     if out(p) != T_{k-1}(p), out(p) is a palette colour of the same kind as
                                   T_k(p) (shape colour vs background colour), but not T_k(p)   (wrong colour)
         = 0                       otherwise (unchanged, or off palette, or the wrong kind of colour)

E_k is split by *transition* (T_{k-1}(p), T_k(p)): a move has two (object -> background at the old cell,
background -> object at the new one), a replacement up to three, a recolour one. The match is the mean over the
transitions of each one's weighted mean score, so every part of an edit counts equally whatever its pixel count:

    m_IF = mean_transitions ( sum_p w(p) s(p) / sum_p w(p) ),      IF = 1 + 4 m_IF.

Reference points: a perfect edit scores IF 5; an untouched image (y_k = y_{k-1} = ground truth) scores IF 1
(every pixel of E_k still shows T_{k-1}); a recolour / add / background change to the wrong colour scores
IF = 1 + 4 * wrong_colour_credit = 3 (default); moving an object correctly but painting it the wrong colour
scores 1 + 4 * (1 + 0.5) / 2 = 4; removing an object that should have moved scores 3.

**CC (content consistency), turn k.** Turn k may change only its edit region E_k. CC checks the *never-edited*
region U_k = pixels whose ground-truth label is the same in every one of T_0 .. T_k, against the source T_0
(EdiVal's choice): damage to content no instruction has touched keeps counting at every later turn (drift), and an
earlier turn's failed edit is not charged to later turns. U_k is split into *units* by the source's instance map
(the background, and each object of S_0), each weighing the same, so destroying a small untouched object costs as
much as repainting the whole background.

With ``protect_earlier_edits`` CC also checks what earlier turns *delivered*: D_k = pixels turn k must keep
(T_{k-1} == T_k) that an earlier turn changed, restricted to those the output turn k received got right
(y_{k-1}(p) == T_{k-1}(p)), against T_k, in units by S_k's instance map. A later turn that wrecks an earlier edit
(repaints a changed background, erases an added object) then pays for it; with U_k alone it does not (the shipped
prior loses more than a quarter of an earlier edit in 7 % of the chains still alive at turns 2 and 3). It is off by
default because, as a GRPO *training* reward, it made learning worse (docs/toy-world.md, "the judge's blind spot": 2 of 5 seeds, whose
tuned editors also score lower on the D_k-aware judge's own O_3): D_k depends on each trajectory's own earlier
outputs, so within a group turn k's CC also reflects whether earlier turns succeeded. Use it to evaluate.

    m_CC = mean_units ( sum_p w(p) [out(p) == T_ref(p)] / sum_p w(p) ),      CC = 1 + 4 m_CC,

with T_ref = T_0 on U_k and T_k on D_k. An untouched output (y_k equal to the previous ground truth) scores CC 5.

**Success** (docs/design.md section 7): a turn succeeds when IF >= 4, i.e. m_IF >= 0.75 (``SUCCESS_THRESHOLD``).

**Never invented.** A turn whose E_k is empty, or whose checked region (U_k, with D_k when protected) is
(impossible for world-generated chains, which keep at least ``min_preserved_fraction`` of the image in U_k), is NaN
with ``scored`` False; so is every turn of an item whose metadata is missing or malformed, whose instructions
differ from the ground truth's, or whose output count does not match. The reason is in that item's diagnostic.

``collapse_to_single_turn`` rewrites a chain's metadata as one turn S_0 -> S_K, to judge the single-turn-merged
baseline (all instructions delivered at once) on the same chains.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from PIL import Image

from mtflow.reward.base import SCORE_MAX, SCORE_MIN, ScoreBatch, ScoringItem
from mtflow.toy.world import RenderSpec, Scene

SUCCESS_THRESHOLD = 4.0
"""A turn succeeds when its IF >= this (docs/design.md section 7); for the exact judge that is m_IF >= 0.75."""

OFF_PALETTE = -1
_CHUNK = 128  # items per vectorised call
_MAX_SPECS = 64  # distinct render specs kept
_MAX_TABLES = 4  # distinct palettes' lookup tables kept (16 MiB each)


def snap_to_palette(rgb: np.ndarray, palette: np.ndarray, tolerance: float) -> np.ndarray:
    """Nearest-palette labels.

    Args:
        rgb: [..., 3] uint8 pixels.
        palette: [P, 3] uint8 colours.
        tolerance: largest Euclidean RGB distance still snapped; farther pixels get ``OFF_PALETTE`` (-1).
    Returns:
        [...] int16 labels in [-1, P).
    """
    flat = rgb.reshape(-1, 3).astype(np.int32)
    best = np.full(flat.shape[0], np.iinfo(np.int32).max, dtype=np.int32)
    label = np.zeros(flat.shape[0], dtype=np.int16)
    for i, colour in enumerate(palette.astype(np.int32)):
        diff = flat - colour
        d2 = np.einsum("ij,ij->i", diff, diff)
        closer = d2 < best
        best[closer] = d2[closer]
        label[closer] = i
    label[best > tolerance * tolerance] = OFF_PALETTE
    return label.reshape(rgb.shape[:-1])


def palette_lookup_table(palette: np.ndarray, tolerance: float) -> np.ndarray:
    """[2**24] int8: ``snap_to_palette`` of every RGB value, indexed by ``r << 16 | g << 8 | b`` (16 MB, exact).

    Built by visiting, for each colour in label order, only the RGB cube around it that can lie within the
    tolerance; a value takes the colour if it is strictly closer than every earlier one (ties go to the lower
    label, as in ``snap_to_palette``).
    """
    if palette.shape[0] > 127:
        raise ValueError(f"at most 127 palette colours fit the int8 table, got {palette.shape[0]}")
    table = np.full(1 << 24, OFF_PALETTE, dtype=np.int8)
    best = np.full(1 << 24, np.iinfo(np.int32).max, dtype=np.int32)
    radius = int(math.floor(tolerance))
    offsets = np.arange(-radius, radius + 1)
    for label, colour in enumerate(palette.astype(np.int32)):
        axes = [np.clip(c + offsets, 0, 255) for c in colour]
        axes = [np.unique(a) for a in axes]
        r, g, b = np.meshgrid(*axes, indexing="ij")
        d2 = (r - colour[0]) ** 2 + (g - colour[1]) ** 2 + (b - colour[2]) ** 2
        inside = d2 <= tolerance * tolerance
        code = ((r << 16) | (g << 8) | b)[inside]
        d2 = d2[inside]
        closer = d2 < best[code]
        best[code[closer]] = d2[closer]
        table[code[closer]] = label
    return table


def snap_with_table(rgb: np.ndarray, table: np.ndarray) -> np.ndarray:
    """[..., 3] uint8 -> [...] int8 labels through a ``palette_lookup_table`` (same result as ``snap_to_palette``)."""
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    return table[code]


def label_edges(labels: np.ndarray) -> np.ndarray:
    """[..., H, W] bool: True where a 4-neighbour (inside the image) has a different label."""
    edge = np.zeros(labels.shape, dtype=bool)
    vertical = labels[..., 1:, :] != labels[..., :-1, :]
    horizontal = labels[..., :, 1:] != labels[..., :, :-1]
    edge[..., 1:, :] |= vertical
    edge[..., :-1, :] |= vertical
    edge[..., :, 1:] |= horizontal
    edge[..., :, :-1] |= horizontal
    return edge


def _grouped_mean_of_means(
    group: np.ndarray, weight: np.ndarray, value: np.ndarray, num_rows: int, num_groups: int
) -> np.ndarray:
    """Per row: mean over groups (those with positive weight) of the weighted mean of ``value`` in the group.

    group, weight, value: [R, M] (group ids in [0, num_groups)). Returns [R], NaN where no group has weight.
    """
    row = np.broadcast_to(np.arange(num_rows, dtype=np.int64)[:, None], group.shape)
    keep = weight > 0  # regions are sparse: count only their pixels
    index = row[keep] * num_groups + group[keep]
    w = weight[keep]
    den = np.bincount(index, weights=w, minlength=num_rows * num_groups).reshape(num_rows, num_groups)
    num = np.bincount(index, weights=w * value[keep], minlength=num_rows * num_groups).reshape(
        num_rows, num_groups
    )
    present = den > 0
    frac = np.where(present, num / np.where(present, den, 1.0), 0.0)
    count = present.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, frac.sum(axis=1) / count, np.nan)


@dataclass
class ExactScores:
    """Outcome of ``exact_scores`` for N items of K turns.

    Attributes:
        if_match: [N, K] float64 m_IF in [0, 1]; NaN where the edit region is empty.
        cc_preserved: [N, K] float64 m_CC in [0, 1]; NaN where the preserved region is empty.
        edit_pixels: [N, K] int64 pixels in the edit region E_k.
        preserved_pixels: [N, K] int64 pixels checked by CC (U_k, and D_k when protected).
        off_palette: [N, K] float64 share of the output's pixels that snapped to no palette colour.
    """

    if_match: np.ndarray
    cc_preserved: np.ndarray
    edit_pixels: np.ndarray
    preserved_pixels: np.ndarray
    off_palette: np.ndarray

    @property
    def instruction_following(self) -> np.ndarray:
        """[N, K] IF on the 1-5 scale."""
        return SCORE_MIN + (SCORE_MAX - SCORE_MIN) * self.if_match

    @property
    def content_consistency(self) -> np.ndarray:
        """[N, K] CC on the 1-5 scale."""
        return SCORE_MIN + (SCORE_MAX - SCORE_MIN) * self.cc_preserved


def exact_scores(
    truth_labels: np.ndarray,
    output_labels: np.ndarray,
    scene_instances: np.ndarray,
    label_is_shape_color: np.ndarray,
    edge_weight: float = 0.25,
    wrong_colour_credit: float = 0.5,
    protect_earlier_edits: bool = False,
) -> ExactScores:
    """IF and CC matches of N trajectories (formulas in the module docstring).

    Args:
        truth_labels: [N, K + 1, H, W] int, ground-truth label maps T_0 .. T_K (values in [0, P)).
        output_labels: [N, K, H, W] int, snapped outputs y_1 .. y_K (values in [-1, P); -1 off palette).
        scene_instances: [N, K + 1, H, W] int, instance maps of S_0 .. S_K: 0 on the background, i + 1 on the
            scene's object i (only S_0's is read unless ``protect_earlier_edits``).
        label_is_shape_color: [P] bool, True for shape-palette labels.
        edge_weight: weight of edge pixels (in (0, 1]).
        wrong_colour_credit: score of a changed pixel with a wrong colour of the right kind (in [0, 1)).
        protect_earlier_edits: CC also checks D_k (default: U_k only).
    Returns:
        ``ExactScores`` with [N, K] arrays.
    """
    if truth_labels.ndim != 4 or output_labels.ndim != 4 or scene_instances.ndim != 4:
        raise ValueError(
            f"expected truth [N, K+1, H, W], outputs [N, K, H, W], instances [N, K+1, H, W]; got {truth_labels.shape}, "
            f"{output_labels.shape}, {scene_instances.shape}"
        )
    n, k1, h, w = truth_labels.shape
    k = k1 - 1
    if output_labels.shape != (n, k, h, w) or scene_instances.shape != truth_labels.shape:
        raise ValueError(
            f"shape mismatch: truth {truth_labels.shape}, outputs {output_labels.shape}, "
            f"instances {scene_instances.shape}"
        )
    if not 0.0 < edge_weight <= 1.0 or not 0.0 <= wrong_colour_credit < 1.0:
        raise ValueError(
            f"need 0 < edge_weight <= 1 and 0 <= wrong_colour_credit < 1, got {edge_weight}, {wrong_colour_credit}"
        )
    num_labels = int(label_is_shape_color.shape[0])
    truth = truth_labels.astype(np.int16)
    out = output_labels.astype(np.int16)
    prev, target, source = truth[:, :-1], truth[:, 1:], truth[:, :1]
    edges = label_edges(truth)

    # IF on the edit region, grouped by transition (prev label, target label).
    edit = prev != target
    w_if = np.where(edit, np.where(edges[:, :-1] | edges[:, 1:], edge_weight, 1.0), 0.0)
    on_palette = out >= 0
    is_shape = label_is_shape_color.astype(bool)
    same_kind = on_palette & (is_shape[np.clip(out, 0, None)] == is_shape[target])
    pixel_if = np.where(out == target, 1.0, np.where(same_kind & (out != prev), wrong_colour_credit, 0.0))
    transition = (prev.astype(np.int64) * num_labels + target).reshape(n * k, h * w)
    if_match = _grouped_mean_of_means(
        transition, w_if.reshape(n * k, -1), pixel_if.reshape(n * k, -1), n * k, num_labels * num_labels
    )

    # CC on the never-edited region, against the source, grouped by source instance.
    never_changed = np.logical_and.accumulate(target == source, axis=1)
    checked = never_changed
    w_cc = np.where(never_changed, np.where(edges[:, :1] | edges[:, 1:], edge_weight, 1.0), 0.0)
    preserved = (out == source).astype(np.float64)
    instances = scene_instances.astype(np.int64)
    units = np.broadcast_to(instances[:, :1], (n, k, h, w))
    num_units = int(instances[:, 0].max(initial=0)) + 1
    if protect_earlier_edits:
        # ... and on what earlier turns delivered (and turn k received right), against the target, grouped by the
        # target scene's instances (unit ids after the source's).
        received = np.concatenate(
            [source, out[:, :-1]], axis=1
        )  # what turn k was handed (turn 1: the source)
        delivered = (prev == target) & ~never_changed & (received == prev)
        checked = never_changed | delivered
        w_cc = np.where(delivered, np.where(edges[:, :-1] | edges[:, 1:], edge_weight, 1.0), w_cc)
        preserved = np.where(delivered, (out == target).astype(np.float64), preserved)
        units = np.where(delivered, num_units + instances[:, 1:], units)
        num_units += int(instances[:, 1:].max(initial=0)) + 1
    cc_preserved = _grouped_mean_of_means(
        units.reshape(n * k, -1), w_cc.reshape(n * k, -1), preserved.reshape(n * k, -1), n * k, num_units
    )
    return ExactScores(
        if_match=if_match.reshape(n, k),
        cc_preserved=cc_preserved.reshape(n, k),
        edit_pixels=edit.sum(axis=(2, 3)),
        preserved_pixels=checked.sum(axis=(2, 3)),
        off_palette=(~on_palette).mean(axis=(2, 3)),
    )


def parse_toy_metadata(
    metadata: dict[str, Any],
) -> tuple[dict[str, Any], list[dict[str, Any]], list[str] | None]:
    """Check and unpack ``metadata["toy"]``: (render spec JSON, K + 1 scene JSONs, instructions or None).

    Raises ``ValueError`` naming the missing or malformed field.
    """
    toy = metadata.get("toy") if isinstance(metadata, dict) else None
    if not isinstance(toy, dict):
        raise ValueError("metadata has no 'toy' ground truth (is this a toy-world chain?)")
    render, scenes = toy.get("render"), toy.get("scenes")
    if not isinstance(render, dict):
        raise ValueError("metadata['toy']['render'] is missing or not an object")
    if not isinstance(scenes, list) or len(scenes) < 2:
        raise ValueError("metadata['toy']['scenes'] must list the source and at least one target scene")
    instructions = toy.get("instructions")
    if instructions is not None and (
        not isinstance(instructions, list) or len(instructions) != len(scenes) - 1
    ):
        raise ValueError(f"metadata['toy']['instructions'] must list {len(scenes) - 1} instructions")
    return render, scenes, instructions


def collapse_to_single_turn(metadata: dict[str, Any], instruction: str) -> dict[str, Any]:
    """Metadata judging one turn S_0 -> S_K delivered as ``instruction`` (single-turn-merged baseline)."""
    render, scenes, _ = parse_toy_metadata(metadata)
    toy = dict(metadata["toy"])
    toy.update(
        scenes=[scenes[0], scenes[-1]], instructions=[instruction], edits=None, collapsed_from=len(scenes) - 1
    )
    return {**metadata, "toy": toy}


class ToyJudge:
    """Exact ``Scorer`` for toy-world chains (formulas in the module docstring). Deterministic; vectorised."""

    def __init__(
        self,
        colour_tolerance: float = 48.0,
        edge_weight: float = 0.25,
        wrong_colour_credit: float = 0.5,
        check_instructions: bool = True,
        cache_size: int = 65536,
        protect_earlier_edits: bool = False,
        binary_threshold: float | None = None,
        max_image_size: int = 512,
        cache_mb: float = 256.0,
    ) -> None:
        """
        Args:
            colour_tolerance: largest RGB distance at which an output pixel still takes a palette colour.
            edge_weight: weight of pixels on a ground-truth label boundary (decoders blur edges), in (0, 1].
            wrong_colour_credit: IF credit of a changed pixel painted a wrong colour of the right kind, in [0, 1).
            check_instructions: refuse to score items whose instructions differ from the ground truth's.
            cache_size: rendered ground-truth label maps kept in memory (LRU).
            protect_earlier_edits: CC also checks what earlier turns delivered (D_k); off by default (module docstring).
            binary_threshold: report pass / fail instead of the 1-5 scale: a score >= this becomes 5, below it 1, for
                IF and CC alike (None: the 1-5 scores; 4.0: pass at the success threshold).
            max_image_size: largest render size (pixels per side) a chain's metadata may ask for; larger ones are
                unscored (behind the reward service the metadata comes from clients).
            cache_mb: bound on the bytes of the cached label maps (with ``cache_size`` on their number).
        """
        if colour_tolerance <= 0:
            raise ValueError(f"colour_tolerance must be > 0, got {colour_tolerance}")
        if not 0.0 < edge_weight <= 1.0:
            raise ValueError(f"edge_weight must be in (0, 1], got {edge_weight}")
        if not 0.0 <= wrong_colour_credit < 1.0:
            raise ValueError(f"wrong_colour_credit must be in [0, 1), got {wrong_colour_credit}")
        self.colour_tolerance = colour_tolerance
        self.edge_weight = edge_weight
        self.wrong_colour_credit = wrong_colour_credit
        self.check_instructions = check_instructions
        self.cache_size = cache_size
        self.protect_earlier_edits = protect_earlier_edits
        if binary_threshold is not None and not SCORE_MIN < binary_threshold <= SCORE_MAX:
            raise ValueError(
                f"binary_threshold must be in ({SCORE_MIN}, {SCORE_MAX}], got {binary_threshold}"
            )
        self.binary_threshold = binary_threshold
        self.max_image_size = max_image_size
        self.cache_bytes = int(cache_mb * 1024 * 1024)
        # every cache is bounded: behind the reward service their keys come from clients
        self._specs: OrderedDict[str, RenderSpec] = OrderedDict()
        self._maps: OrderedDict[tuple[str, str, str], np.ndarray] = OrderedDict()
        self._maps_bytes = 0
        self._tables: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # the reward service scores several batches at once

    @staticmethod
    def merged_metadata(metadata: dict[str, Any], instruction: str) -> dict[str, Any]:
        """The evaluation's single-turn-merged baseline delivers a chain's K instructions as one edit; this judge
        then needs the collapsed ground truth (source -> final scene). Other metadata passes unchanged."""
        return collapse_to_single_turn(metadata, instruction) if "toy" in metadata else metadata

    # ----- ground truth rendering (cached) -----
    def _spec(self, render: dict[str, Any]) -> tuple[str, RenderSpec]:
        key = json.dumps(render, sort_keys=True)
        with self._lock:
            found = self._specs.get(key)
        if found is None:
            found = RenderSpec.from_json(render)
            if found.image_size > self.max_image_size:
                raise ValueError(
                    f"render size {found.image_size} exceeds this judge's max_image_size {self.max_image_size}"
                )
            with self._lock:
                self._specs[key] = found
                while len(self._specs) > _MAX_SPECS:
                    self._specs.popitem(last=False)
        return key, found

    def _map(self, spec_key: str, spec: RenderSpec, scene: dict[str, Any], kind: str) -> np.ndarray:
        key = (kind, spec_key, json.dumps(scene, sort_keys=True))
        with self._lock:
            found = self._maps.get(key)
            if found is not None:
                self._maps.move_to_end(key)
                return found
        parsed = Scene.from_json(scene)
        found = spec.render_labels(parsed) if kind == "labels" else spec.render_instances(parsed)
        with self._lock:
            if key not in self._maps:
                self._maps[key] = found
                self._maps_bytes += found.nbytes
            while self._maps and (len(self._maps) > self.cache_size or self._maps_bytes > self.cache_bytes):
                self._maps_bytes -= self._maps.popitem(last=False)[1].nbytes
        return found

    def _table(self, palette: np.ndarray) -> np.ndarray:
        key = palette.tobytes()
        with self._lock:
            found = self._tables.get(key)
        if found is None:
            found = palette_lookup_table(palette, self.colour_tolerance)
            with self._lock:
                self._tables[key] = found
                while len(self._tables) > _MAX_TABLES:
                    self._tables.popitem(last=False)
        return found

    @staticmethod
    def _pixels(image: Image.Image, size: int) -> np.ndarray:
        if image.mode != "RGB":
            image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BOX)
        return np.asarray(image)

    # ----- Scorer -----
    def score(self, items: Sequence[ScoringItem]) -> ScoreBatch:
        """Score toy-world trajectories (all with the same K). Bad items are flagged, never scored 0."""
        start = time.perf_counter()
        if not items:
            return ScoreBatch(torch.zeros(0, 0), torch.zeros(0, 0), torch.zeros(0, 0, dtype=torch.bool))
        num_turns = items[0].num_turns
        n = len(items)
        if_scores = np.full((n, num_turns), math.nan)
        cc_scores = np.full((n, num_turns), math.nan)
        diagnostics: list[dict[str, Any]] = [{"item_id": it.item_id} for it in items]
        groups: dict[str, tuple[RenderSpec, list[tuple[int, list[dict[str, Any]]]]]] = {}
        for i, item in enumerate(items):
            try:
                if item.num_turns != num_turns:
                    raise ValueError(f"item has {item.num_turns} turns, the batch {num_turns}")
                render, scenes, instructions = parse_toy_metadata(item.metadata)
                if len(scenes) - 1 != num_turns:
                    raise ValueError(
                        f"ground truth has {len(scenes) - 1} turns but the item has {num_turns} outputs"
                    )
                if (
                    self.check_instructions
                    and instructions is not None
                    and list(item.instructions) != instructions
                ):
                    turn = next(t for t, (a, b) in enumerate(zip(item.instructions, instructions)) if a != b)
                    raise ValueError(
                        f"turn {turn + 1} instruction {item.instructions[turn]!r} differs from the ground truth's "
                        f"{instructions[turn]!r}"
                    )
                spec_key, spec = self._spec(render)
                groups.setdefault(spec_key, (spec, []))[1].append((i, scenes))
            except Exception as err:  # whatever a client's metadata provokes stays with its item
                diagnostics[i].update(status="unscored", error=f"item {item.item_id!r}: {err}")

        for spec_key, (spec, members) in groups.items():
            rows, truth, instances, outputs = [], [], [], []
            for i, scenes in members:
                try:
                    t = np.stack([self._map(spec_key, spec, s, "labels") for s in scenes])
                    # D_k's units need every scene's instance map; U_k's only the source's
                    shown = scenes if self.protect_earlier_edits else scenes[:1]
                    inst = np.stack([self._map(spec_key, spec, scene, "instances") for scene in shown])
                    inst = np.broadcast_to(inst, (len(scenes), *inst.shape[1:]))
                    o = np.stack([self._pixels(im, spec.image_size) for im in items[i].outputs])
                except Exception as err:  # whatever a client's metadata provokes stays with its item
                    diagnostics[i].update(status="unscored", error=f"item {items[i].item_id!r}: {err}")
                    continue
                rows.append(i)
                truth.append(t)
                instances.append(inst)
                outputs.append(o)
            if not rows:
                continue
            try:
                table = self._table(spec.palette)
            except Exception as err:  # a palette from a client's metadata: its items only
                for i in rows:
                    diagnostics[i].update(status="unscored", error=f"item {items[i].item_id!r}: {err}")
                continue
            parts = [  # chunks of items keep the working arrays in cache (2x faster at thousands of items)
                exact_scores(
                    np.stack(truth[c : c + _CHUNK]),
                    snap_with_table(np.stack(outputs[c : c + _CHUNK]), table),
                    np.stack(instances[c : c + _CHUNK]),
                    spec.label_is_shape_color,
                    self.edge_weight,
                    self.wrong_colour_credit,
                    self.protect_earlier_edits,
                )
                for c in range(0, len(rows), _CHUNK)
            ]
            result = ExactScores(
                *(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(ExactScores))
            )
            if_scores[rows] = result.instruction_following
            cc_scores[rows] = result.content_consistency
            for r, i in enumerate(rows):
                problems = [
                    f"turn {t + 1}: the ground truth changes no pixel"
                    for t in range(num_turns)
                    if math.isnan(result.if_match[r, t])
                ] + [
                    f"turn {t + 1}: nothing left that should be preserved"
                    for t in range(num_turns)
                    if math.isnan(result.cc_preserved[r, t])
                ]
                diagnostics[i].update(
                    status="partial" if problems else "ok",
                    if_match=[round(float(v), 4) for v in result.if_match[r]],
                    cc_preserved=[round(float(v), 4) for v in result.cc_preserved[r]],
                    off_palette=[round(float(v), 4) for v in result.off_palette[r]],
                )
                if problems:
                    diagnostics[i]["error"] = f"item {items[i].item_id!r}: " + "; ".join(problems)

        scored = ~(np.isnan(if_scores) | np.isnan(cc_scores))
        if self.binary_threshold is not None:  # pass / fail at the threshold, on the judge's own scale ends
            for scores in (if_scores, cc_scores):
                scores[scored] = np.where(scores[scored] >= self.binary_threshold, SCORE_MAX, SCORE_MIN)
        if_scores[~scored] = math.nan
        cc_scores[~scored] = math.nan
        return ScoreBatch(
            instruction_following=torch.from_numpy(if_scores).float(),
            content_consistency=torch.from_numpy(cc_scores).float(),
            scored=torch.from_numpy(scored),
            diagnostics=diagnostics,
            latency_s=time.perf_counter() - start,
        )
