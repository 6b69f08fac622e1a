"""Where does an editor's multi-turn loss come from? Exposure-bias diagnostics on the toy world.

Exposure bias (docs/design.md section 7) is a fall of marginal success M_k with k: a turn that edits the model's own
output succeeds less often than one that edits a clean image. ``diagnose_exposure_bias`` separates the pieces on
held-out chains, all with deterministic rollouts, the exact judge and the same per-chain noise:

- **own output, through pixels**: the chains as users run them (turn k+1 edits turn k's decoded uint8 image).
- **own output, through latents**: turn k+1 is conditioned on turn k's final latent as is
  (``RolloutConfig.chain_through="latents"``). If decoding and re-encoding hid the editor's drift (a VAE that
  snaps outputs back to clean renderings), M_k falls here and not through pixels.
- **teacher forced**: each turn from the ground-truth previous scene, i.e. the turn's difficulty on clean input.
- **pass quality**: how close to perfect the turns that pass are (IF = 5 and CC = 5 is a pixel-exact edit), and
  the next turn's success after an imperfect pass vs after a near-perfect one. Imperfect passes are the only way
  a successful turn can hand the next one a harder input.
- **robustness**: single-turn success when Gaussian noise of standard deviation sigma is added to the source's
  latent (the latents have unit scale), i.e. how far off the clean manifold an input must be to hurt.
- **VAE colour snap**: colours that drifted off the palette, put through the hand-off between turns (encode, then
  decode), and how far from the exact rendering they come back. A decoder that snaps them back erases colour
  drift at every turn.
- **VAE round-trip drift**: the hand-off repeated on exact renderings, no editor: the error that compounds along
  a chain even if every edit were perfect.
- **where survivorship comes from**: teacher-forced success per turn grouped by how many shapes the chain's source
  holds; scene complexity persists along a chain, so the chains that survive are the simpler ones.
- **where the picture went**: the displacement (down, right) that best aligns each turn's output with its
  ground truth (``estimated_displacement``): an editor that moves the picture at every turn (the drift prior,
  trained on pairs misaligned by one pixel) compounds it, (1, 1) after turn 1, (2, 2) after turn 2, ...
- **why M_k moves**: ``marginal_change_decomposition`` splits M_k - M_1 exactly into turn difficulty (turn k
  on clean input vs turn 1), survivorship (the chains still alive at turn k are easier) and exposure (the paired
  gap), so a survivorship gain that hides an exposure loss is seen, not guessed.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from mtflow.eval.evaluate import evaluate_chains
from mtflow.toy.judge import SUCCESS_THRESHOLD, ToyJudge, snap_to_palette
from mtflow.toy.prior import (
    evaluation_kwargs,
    pair_chains,
    render_uint8,
    success_rates,
    teacher_forced_successes,
    turn_successes,
    with_progress,
)
from mtflow.toy.world import RenderSpec, Scene, ToyWorld

PERFECT_IF = 4.75
"""IF at or above which a passing turn counts as near-perfect (the exact judge gives 5 to a pixel-exact edit)."""


@dataclass
class ExposureBiasSettings:
    """What ``diagnose_exposure_bias`` measures on."""

    num_chains: int = 600
    """held-out K-turn chains (world.chain(i, "heldout"), i < num_chains)."""
    num_pairs: int = 300
    """held-out single-turn pairs for the robustness curve."""
    source_noise: tuple[float, ...] = (0.0, 0.2, 0.4, 0.8)
    """standard deviations of the Gaussian noise added to the source latent."""
    num_steps: int = 10
    """deterministic sampler steps per turn."""
    seed: int = 0
    """evaluation seed (per-chain noise; also seeds the source-latent noise)."""
    batch_size: int = 100
    """chains per evaluation rollout."""
    forward_batch_size: int = 100
    """samples per transformer call."""
    threshold: float = SUCCESS_THRESHOLD
    """IF score that counts as a successful turn."""
    perfect_if: float = PERFECT_IF
    """IF at or above which a pass counts as near-perfect."""
    num_bootstrap: int = 200
    """bootstrap resamples of the confidence intervals."""
    colour_fades: tuple[float, ...] = (0.1, 0.2, 0.3)
    """how far toward mid-gray the colours are pulled for the VAE colour-snap measurement."""
    round_trip_passes: int = 6
    """repeated VAE round trips of exact renderings for the hand-off drift measurement (0: not measured)."""


def next_turn_success_by_pass_quality(
    instruction_following: np.ndarray, threshold: float, perfect_if: float
) -> list[dict[str, Any]]:
    """Success of turn k+1 among chains whose turns 1..k all passed, split by how well turn k passed.

    Args:
        instruction_following: [N, K] IF scores (1-5) of N fully scored chains.
        threshold: IF that counts as a pass; perfect_if: IF at or above which a pass is near-perfect.

    Returns:
        K - 1 dicts (turn k+1 = 2..K): ``{"turn", "after_imperfect", "after_perfect", "num_imperfect",
        "num_perfect"}``, success rates in percent (NaN when the group is empty).
    """
    scores = np.asarray(instruction_following, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"instruction_following must be [N, K], got shape {scores.shape}")
    passed = scores >= threshold
    rows = []
    for k in range(scores.shape[1] - 1):
        alive = passed[:, : k + 1].all(axis=1)
        perfect = alive & (scores[:, k] >= perfect_if)
        imperfect = alive & ~perfect
        rows.append(
            {
                "turn": k + 2,
                "after_imperfect": _percent(passed[imperfect, k + 1]),
                "after_perfect": _percent(passed[perfect, k + 1]),
                "num_imperfect": int(imperfect.sum()),
                "num_perfect": int(perfect.sum()),
            }
        )
    return rows


def pass_quality(
    instruction_following: np.ndarray, content_consistency: np.ndarray, threshold: float, perfect_if: float
) -> list[dict[str, Any]]:
    """Per turn, among the turns that pass: the share with IF >= ``perfect_if``, and the median CC (1-5).

    Args:
        instruction_following, content_consistency: [N, K] judge scores of N fully scored chains.

    Returns:
        K dicts ``{"turn", "num_passed", "perfect_share", "median_cc"}`` (percent; NaN when nothing passed).
    """
    if_scores = np.asarray(instruction_following, dtype=np.float64)
    cc_scores = np.asarray(content_consistency, dtype=np.float64)
    if if_scores.shape != cc_scores.shape or if_scores.ndim != 2:
        raise ValueError(f"IF and CC must both be [N, K], got {if_scores.shape} and {cc_scores.shape}")
    rows = []
    for k in range(if_scores.shape[1]):
        passed = if_scores[:, k] >= threshold
        rows.append(
            {
                "turn": k + 1,
                "num_passed": int(passed.sum()),
                "perfect_share": _percent(if_scores[passed, k] >= perfect_if),
                "median_cc": float(np.median(cc_scores[passed, k])) if passed.any() else math.nan,
            }
        )
    return rows


def paired_turn_gap(
    own_success: np.ndarray, forced_success: np.ndarray, num_bootstrap: int = 1000, seed: int = 0
) -> list[dict[str, Any]]:
    """Exposure bias turn by turn, paired: among the chains whose own turns 1..k-1 all succeeded, turn k's
    success on the model's own previous output minus its success from the ground-truth previous scene (same
    chain, same noise), with a percentile bootstrap 95 % interval over chains.

    Args:
        own_success: [N, K] 1.0 / 0.0 per chained turn (NaN: unscored).
        forced_success: [N, K] 1.0 / 0.0 per teacher-forced turn (NaN: unscored).

    Returns:
        K dicts ``{"turn", "num_chains", "own", "forced", "gap", "gap_ci_low", "gap_ci_high"}`` in percent (NaN
        when no chain qualifies).
    """
    own = np.asarray(own_success, dtype=np.float64)
    forced = np.asarray(forced_success, dtype=np.float64)
    if own.shape != forced.shape or own.ndim != 2:
        raise ValueError(f"own and forced successes must both be [N, K], got {own.shape} and {forced.shape}")
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(own.shape[1]):
        alive = np.ones(own.shape[0], dtype=bool) if k == 0 else (own[:, :k] == 1.0).all(axis=1)
        valid = alive & ~np.isnan(own[:, k]) & ~np.isnan(forced[:, k])
        pairs = own[valid, k] - forced[valid, k]
        row = {"turn": k + 1, "num_chains": int(valid.sum()), "own": _percent(own[valid, k])}
        row["forced"] = _percent(forced[valid, k])
        row["gap"] = 100.0 * float(pairs.mean()) if pairs.size else math.nan
        means = np.empty(0)
        if pairs.size and num_bootstrap > 0:
            means = pairs[rng.integers(0, pairs.size, size=(num_bootstrap, pairs.size))].mean(axis=1)
        low, high = _interval95(means)
        row["gap_ci_low"], row["gap_ci_high"] = 100.0 * low, 100.0 * high
        rows.append(row)
    return rows


def estimated_displacement(output: np.ndarray, truth: np.ndarray, max_shift: int) -> tuple[int, int] | None:
    """The shift (down, right), each in [-max_shift, max_shift], under which ``output`` best matches ``truth``.

    Args:
        output: [H, W] labels of an output (snapped to the palette; off-palette pixels match nothing).
        truth: [H, W] ground-truth labels.
    Returns:
        (dy, dx) maximising the share of equal labels over the overlap of ``output`` with ``truth`` moved by
        (dy, dx); ties go to the smallest shift (|dy| + |dx|, then the order of the search). None when ``truth``
        is a single label (every shift matches alike: no displacement to see).
    """
    if (truth == truth.flat[0]).all():
        return None
    h, w = truth.shape
    best, best_score = (0, 0), -1.0
    shifts = [(dy, dx) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)]
    for dy, dx in sorted(shifts, key=lambda d: abs(d[0]) + abs(d[1])):
        moved = output[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)]
        source = truth[max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)]
        score = float((moved == source).mean())
        if score > best_score:
            best, best_score = (dy, dx), score
    return best


def output_displacement(
    items: Sequence[Any], colour_tolerance: float, max_shift: int = 4
) -> list[dict[str, Any]]:
    """Per turn: how far the outputs of ``items`` (``ScoringItem`` with toy metadata) sit from their ground truth.

    Returns:
        One row per turn: ``num_outputs`` (outputs whose ground truth is not a flat image), ``mean_dy`` /
        ``mean_dx`` (mean ``estimated_displacement`` in pixels, down / right) and ``aligned_share`` (% at (0, 0)).
    """
    rows: dict[int, list[tuple[int, int]]] = {}
    for item in items:
        toy = item.metadata["toy"]
        spec = RenderSpec.from_json(toy["render"])
        for k, (image, scene) in enumerate(zip(item.outputs, toy["scenes"][1:])):
            truth = spec.render_labels(Scene.from_json(scene))
            output = snap_to_palette(np.asarray(image.convert("RGB")), spec.palette, colour_tolerance)
            shift = estimated_displacement(output, truth, max_shift)
            rows.setdefault(k, [])
            if shift is not None:
                rows[k].append(shift)
    out = []
    for k in sorted(rows):
        shifts = np.array(rows[k], dtype=float).reshape(-1, 2)
        found = len(shifts) > 0
        out.append(
            {
                "turn": k + 1,
                "num_outputs": len(shifts),
                "mean_dy": float(shifts[:, 0].mean()) if found else math.nan,
                "mean_dx": float(shifts[:, 1].mean()) if found else math.nan,
                "aligned_share": _percent((shifts == 0).all(axis=1)) if found else math.nan,
            }
        )
    return out


def marginal_change_decomposition(
    paired: Sequence[dict[str, Any]], teacher_forced_success: Sequence[float]
) -> list[dict[str, Any]]:
    """M_k - M_1 split into three parts that add up exactly, for every turn k >= 2 (percentage points).

    With F_k the teacher-forced success of turn k on all chains, F_k|alive the same on the chains whose own
    turns 1..k-1 passed, and M_k the own-output success on those chains (= C_k / C_{k-1}):

        M_k - M_1 = (F_k - M_1)              turn difficulty: turn k's edits on clean input vs turn 1's
                  + (F_k|alive - F_k)        survivorship: the chains still alive are easier than all chains
                  + (M_k - F_k|alive)        exposure: own previous output vs ground truth (the paired gap)

    Turn 1 needs no split: its teacher-forced and own runs are the same rollout, so F_1 = M_1.

    Args:
        paired: ``paired_turn_gap``'s K rows (``own`` and ``forced`` in percent).
        teacher_forced_success: [K] F_k in percent, over all chains.

    Returns:
        K - 1 dicts ``{"turn", "marginal_change", "turn_difficulty", "survivorship", "exposure"}``.
    """
    if len(paired) != len(teacher_forced_success):
        raise ValueError(f"{len(paired)} paired rows for {len(teacher_forced_success)} teacher-forced turns")
    first = paired[0]["own"]
    rows = []
    for k in range(1, len(paired)):
        alive_own, alive_forced, forced = paired[k]["own"], paired[k]["forced"], teacher_forced_success[k]
        rows.append(
            {
                "turn": k + 1,
                "marginal_change": alive_own - first,
                "turn_difficulty": forced - first,
                "survivorship": alive_forced - forced,
                "exposure": alive_own - alive_forced,
            }
        )
    return rows


def success_by_group(success: np.ndarray, groups: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Per-turn success rate within each group of chains.

    Args:
        success: [N, K] 1.0 / 0.0 / NaN per turn; groups: [N] a group label per chain.

    Returns:
        ``{str(label): {"num_chains": n, "success": [K] percent}}`` in sorted label order.
    """
    success = np.asarray(success, dtype=np.float64)
    labels = np.asarray(groups)
    if labels.shape != success.shape[:1]:
        raise ValueError(f"{labels.shape[0]} group labels for {success.shape[0]} chains")
    return {
        str(label): {
            "num_chains": int((labels == label).sum()),
            "success": success_rates(success[labels == label]),
        }
        for label in sorted(set(labels.tolist()))
    }


DECOMPOSITION_PARTS = ("marginal_change", "turn_difficulty", "survivorship", "exposure")
"""The keys of a ``marginal_change_decomposition`` row, the sum first."""


def marginal_change_intervals(
    own_success: np.ndarray, forced_success: np.ndarray, num_bootstrap: int = 1000, seed: int = 0
) -> list[dict[str, Any]]:
    """``marginal_change_decomposition`` of the chains, with percentile bootstrap 95 % intervals over chains for
    every part (``<part>_ci_low`` / ``<part>_ci_high``; NaN without resamples).

    Args:
        own_success: [N, K] 1.0 / 0.0 / NaN per chained turn; forced_success: [N, K] the same, teacher forced.
    """
    own = np.asarray(own_success, dtype=np.float64)
    forced = np.asarray(forced_success, dtype=np.float64)

    def decompose(rows: np.ndarray) -> list[dict[str, Any]]:
        paired = paired_turn_gap(own[rows], forced[rows], num_bootstrap=0)
        return marginal_change_decomposition(paired, success_rates(forced[rows]))

    point = decompose(np.arange(own.shape[0]))
    rng = np.random.default_rng(seed)
    resampled = [decompose(rng.integers(0, own.shape[0], size=own.shape[0])) for _ in range(num_bootstrap)]
    for k, row in enumerate(point):
        for part in DECOMPOSITION_PARTS:
            low, high = _interval95(np.array([sample[k][part] for sample in resampled], dtype=np.float64))
            row[f"{part}_ci_low"], row[f"{part}_ci_high"] = low, high
    return point


def vae_colour_snap(
    policy, world: ToyWorld, fades: Sequence[float], num_scenes: int = 64
) -> list[dict[str, Any]]:
    """What the hand-off between turns does to colours that drifted off the palette.

    ``num_scenes`` held-out source scenes are rendered with every colour pulled ``fade`` of the way to mid-gray
    (``render_uint8``), encoded and decoded as a chained turn's output is (``encode_reference``, ``decode``).

    Returns:
        per fade ``{"fade", "input_error", "output_error"}``: the median per-pixel RGB distance (0-441) from the
        exact rendering, of the faded input and of its round trip. ``output_error`` well below ``input_error``
        means the VAE snaps drifted colours back onto the palette.
    """
    scenes = _heldout_sources(world, num_scenes)
    exact = render_uint8(world, scenes).float()
    rows = []
    for fade in fades:
        faded = render_uint8(world, scenes, fade)
        round_trip = _hand_off(policy, faded).float()
        rows.append(
            {
                "fade": float(fade),
                "input_error": float((faded.float() - exact).norm(dim=1).median()),
                "output_error": float((round_trip - exact).norm(dim=1).median()),
            }
        )
    return rows


def vae_round_trip_drift(
    policy, world: ToyWorld, passes: int, num_scenes: int = 64, colour_tolerance: float = 48.0
) -> list[dict[str, Any]]:
    """What repeated hand-offs alone do to an image: the VAE round trip (encode, then decode to uint8, as between
    chained turns) applied ``passes`` times to exact renderings of ``num_scenes`` held-out sources, no editor.

    Returns:
        per pass n = 1 .. ``passes`` ``{"pass", "rgb_error", "label_error"}``: the mean per-pixel RGB distance
        (0-441) from the exact rendering (the mean, since the drift sits on a few edge pixels), and the percent
        of pixels whose colour, snapped as the judge snaps it (``snap_to_palette`` within ``colour_tolerance``),
        is no longer the ground-truth palette colour. Growth with n is error that compounds along a chain even
        when every edit is perfect.
    """
    scenes = _heldout_sources(world, num_scenes)
    images = render_uint8(world, scenes)
    exact = images.float()
    truth = np.stack([world.spec.render_labels(s) for s in scenes]).astype(np.int64)
    rows = []
    for n in range(1, passes + 1):
        images = _hand_off(policy, images)
        labels = snap_to_palette(images.permute(0, 2, 3, 1).numpy(), world.spec.palette, colour_tolerance)
        rows.append(
            {
                "pass": n,
                "rgb_error": float((images.float() - exact).norm(dim=1).mean()),
                "label_error": _percent(labels != truth),
            }
        )
    return rows


def _heldout_sources(world: ToyWorld, num_scenes: int) -> list:
    """The source scenes of the first ``num_scenes`` held-out chains."""
    return [world.chain(i, "heldout").scenes[0] for i in range(num_scenes)]


def _hand_off(policy, images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] uint8 -> the same after what lies between two chained turns: encode, decode to uint8 (CPU)."""
    return policy.decode(policy.encode_reference(policy.uint8_to_pixels(images))).cpu()


def _interval95(values: np.ndarray) -> tuple[float, float]:
    """Percentile 95 % interval of bootstrap ``values`` [B], NaN resamples left out; (NaN, NaN) if none."""
    values = values[~np.isnan(values)]
    if not values.size:
        return math.nan, math.nan
    low, high = np.quantile(values, [0.025, 0.975])
    return float(low), float(high)


def _percent(flags: np.ndarray) -> float:
    return 100.0 * float(np.mean(flags)) if flags.size else math.nan


@contextlib.contextmanager
def noisy_source_latents(policy, sigma: float, generator: torch.Generator) -> Iterator[None]:
    """Within the block, ``policy.encode_reference`` returns latent + sigma * N(0, I) (draws from ``generator``).

    Only the source is encoded through it in a 1-turn rollout, so this perturbs exactly the edited image.
    """
    encode = policy.encode_reference

    def noisy(pixels: torch.Tensor) -> torch.Tensor:
        latents = encode(pixels)
        if sigma == 0.0:
            return latents
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
        return latents + sigma * noise.to(latents.device)

    shadowed = vars(policy).get("encode_reference")  # an instance-level override to put back, if any
    policy.encode_reference = noisy
    try:
        yield
    finally:
        if shadowed is None:
            del policy.encode_reference  # back to the class's method
        else:
            policy.encode_reference = shadowed


@dataclass
class ChainCondition:
    """One way of running the held-out chains, as measured."""

    per_turn_success: list[float]
    cumulative_success: list[float]
    marginal_success: list[float]
    consistency: list[float]
    exposure_bias: dict[str, float | None]
    next_turn: list[dict[str, Any]] = field(default_factory=list)
    pass_quality: list[dict[str, Any]] = field(default_factory=list)
    paired_with_teacher_forced: list[dict[str, Any]] = field(default_factory=list)
    marginal_change: list[dict[str, Any]] = field(default_factory=list)
    displacement: list[dict[str, Any]] = field(default_factory=list)


def _run_chains(
    policy, judge, chains, evaluate_kwargs: dict, settings: ExposureBiasSettings, chain_through: str
) -> tuple[ChainCondition, np.ndarray]:
    """The chains run one way; also returns the [N, K] 1.0 / 0.0 / NaN per-turn successes in chain order."""
    report, raw = evaluate_chains(
        policy, judge, chains, chain_through=chain_through, **{**evaluate_kwargs, "keep_items": len(chains)}
    )
    metrics = report.conditions["model"]
    scores = raw["model"].scores
    complete = scores.scored.all(dim=1).numpy()
    if_scores = scores.instruction_following.numpy()[complete]
    cc_scores = scores.content_consistency.numpy()[complete]
    condition = ChainCondition(
        per_turn_success=[e.value for e in metrics.success_rate],
        cumulative_success=[e.value for e in metrics.cumulative_success],
        marginal_success=[e.value for e in metrics.marginal_success],
        consistency=[e.value for e in metrics.consistency],
        exposure_bias=metrics.exposure_bias.to_dict(),
        next_turn=next_turn_success_by_pass_quality(if_scores, settings.threshold, settings.perfect_if),
        pass_quality=pass_quality(if_scores, cc_scores, settings.threshold, settings.perfect_if),
        displacement=output_displacement(raw["model"].items, judge.colour_tolerance),
    )
    return condition, turn_successes(scores, settings.threshold)


def diagnose_exposure_bias(
    policy,
    world: ToyWorld,
    settings: ExposureBiasSettings | None = None,
    judge: ToyJudge | None = None,
    adapter: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Every measurement of the module docstring on ``world``'s held-out split; a JSON-ready dict.
    ``progress``: progress bars on stderr."""
    settings = settings or ExposureBiasSettings()
    judge = judge or ToyJudge()
    started = time.perf_counter()
    samples = [world.chain(i, "heldout") for i in range(settings.num_chains)]
    chains = [sample.to_edit_chain() for sample in samples]
    common = evaluation_kwargs(settings, adapter)
    forced = teacher_forced_successes(
        policy, judge, samples, world.num_turns, common, settings.threshold, progress
    )
    conditions = {}
    for mode in ("pixels", "latents"):
        labelled = with_progress(common, f"own output through {mode}", progress)
        condition, success = _run_chains(policy, judge, chains, labelled, settings, mode)
        condition.paired_with_teacher_forced = paired_turn_gap(
            success, forced, settings.num_bootstrap, settings.seed
        )
        condition.marginal_change = marginal_change_intervals(
            success, forced, settings.num_bootstrap, settings.seed
        )
        conditions[mode] = asdict(condition)

    pairs = pair_chains(world, settings.num_pairs)
    robustness = []
    for sigma in settings.source_noise:
        generator = torch.Generator().manual_seed(settings.seed)
        with noisy_source_latents(policy, sigma, generator):
            report, _ = evaluate_chains(
                policy, judge, pairs, **with_progress(common, f"source noise {sigma:g}", progress)
            )
        metrics = report.conditions["model"]
        robustness.append(
            {
                "sigma": sigma,
                "success": metrics.cumulative_success[0].value,
                "mean_if": metrics.mean_if[0].value,
                "consistency": metrics.consistency[0].value,
            }
        )
    return {
        "settings": asdict(settings),
        "num_turns": world.num_turns,
        "own_output_through_pixels": conditions["pixels"],
        "own_output_through_latents": conditions["latents"],
        "teacher_forced_success": success_rates(forced),
        "teacher_forced_by_source_shapes": success_by_group(
            forced, [len(x.scenes[0].objects) for x in samples]
        ),
        "source_noise_robustness": robustness,
        "vae_colour_snap": vae_colour_snap(policy, world, settings.colour_fades),
        "vae_round_trip_drift": vae_round_trip_drift(
            policy, world, settings.round_trip_passes, colour_tolerance=judge.colour_tolerance
        ),
        "seconds": time.perf_counter() - started,
    }


def format_diagnosis(diagnosis: dict[str, Any]) -> str:
    """A plain-text table of ``diagnose_exposure_bias``'s result."""
    turns = diagnosis["num_turns"]
    head = "| measurement | " + " | ".join(f"turn {k + 1}" for k in range(turns)) + " | M_1 - M_K [95% CI] |"
    lines = [head, "|" + " --- |" * (turns + 2)]

    def row(name: str, values: Sequence[float], bias: str = "") -> None:
        lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in values) + f" | {bias} |")

    for mode in ("pixels", "latents"):
        c = diagnosis[f"own_output_through_{mode}"]
        b = c["exposure_bias"]
        bias = f"{_fmt(b['value'])} [{_fmt(b['ci_low'])}, {_fmt(b['ci_high'])}]"
        row(f"marginal success M_k, own output through {mode}", c["marginal_success"], bias)
        row(f"per-turn success, own output through {mode}", c["per_turn_success"])
        row(f"passes that are near-perfect (through {mode})", [q["perfect_share"] for q in c["pass_quality"]])
    row("per-turn success, teacher forced", diagnosis["teacher_forced_success"])
    for mode in ("pixels", "latents"):
        gaps = diagnosis[f"own_output_through_{mode}"]["paired_with_teacher_forced"]
        lines.append(
            f"| paired gap own ({mode}) - teacher forced, chains alive so far [95% CI] | "
            + " | ".join(
                f"{_fmt(g['gap'])} [{_fmt(g['gap_ci_low'])}, {_fmt(g['gap_ci_high'])}]" for g in gaps
            )
            + " | |"
        )
    for mode in ("pixels", "latents"):
        parts = diagnosis[f"own_output_through_{mode}"]["marginal_change"]
        for key, name in zip(
            DECOMPOSITION_PARTS,
            (
                f"M_k - M_1, own output through {mode} [95% CI]",
                "  = turn difficulty (teacher forced, all chains: F_k - M_1)",
                "  + survivorship (teacher forced, alive chains - all chains)",
                "  + exposure (paired gap, alive chains)",
            ),
        ):
            cells = [
                f"{_fmt(p[key])} [{_fmt(p[key + '_ci_low'])}, {_fmt(p[key + '_ci_high'])}]" for p in parts
            ]
            lines.append(f"| {name} | - | " + " | ".join(cells) + " | |")
    pixels = diagnosis["own_output_through_pixels"]
    row(
        "next turn's success after an imperfect pass",
        [math.nan] + [r["after_imperfect"] for r in pixels["next_turn"]],
    )
    row(
        "next turn's success after a near-perfect pass",
        [math.nan] + [r["after_perfect"] for r in pixels["next_turn"]],
    )
    row("imperfect passes (count)", [math.nan] + [r["num_imperfect"] for r in pixels["next_turn"]])
    for mode in ("pixels", "latents"):
        moved = diagnosis[f"own_output_through_{mode}"].get("displacement", [])
        if moved:  # diagnoses written before the measurement have none
            lines.append(
                f"| outputs' displacement from the ground truth (through {mode}): mean (down, right) px, % aligned | "
                + " | ".join(
                    f"({r['mean_dy']:.2f}, {r['mean_dx']:.2f}), {_fmt(r['aligned_share'])}" for r in moved
                )
                + " | |"
            )
    noise = ", ".join(
        f"sigma {r['sigma']:g}: {_fmt(r['success'])}" for r in diagnosis["source_noise_robustness"]
    )
    lines.append("")
    lines.append(f"single-turn success with noise on the source latent: {noise}")
    by_shapes = "; ".join(
        f"{label} shape(s), {g['num_chains']} chains: " + " / ".join(_fmt(v) for v in g["success"])
        for label, g in diagnosis["teacher_forced_by_source_shapes"].items()
    )
    lines.append(f"teacher-forced success per turn by shapes in the source: {by_shapes}")
    snap = ", ".join(
        f"fade {r['fade']:g}: {r['input_error']:.1f} -> {r['output_error']:.1f}"
        for r in diagnosis["vae_colour_snap"]
    )
    if snap:  # no fades measured: no line
        lines.append(f"VAE hand-off, median RGB distance from the exact rendering before -> after: {snap}")
    drift = ", ".join(f"{r['label_error']:.2f}" for r in diagnosis["vae_round_trip_drift"])
    if drift:  # no passes measured: no line
        lines.append(f"VAE hand-off repeated, % pixels off their true colour after 1, 2, ... passes: {drift}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)
