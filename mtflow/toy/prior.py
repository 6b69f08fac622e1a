"""The toy world's editor prior: a small FLUX.1-Kontext of the real classes, trained by supervised flow matching on
single-turn (source, instruction, target) pairs of clean renderings.

Pipeline: a ``FluxTransformer2DModel`` (patch 1, guidance embedding, 2x2-packed latents), the shipped toy
``AutoencoderKL`` (``mtflow/toy/assets/vae``), tiny random CLIP / T5 encoders whose tokenizers hold every word of
the world, and FLUX's ``FlowMatchEulerDiscreteScheduler``. It is saved as a ``FluxKontextPipeline`` folder and
trained and evaluated through ``KontextPolicy`` (``lora_rank=0``), so latents, packing, position ids, guidance and
the timestep input are exactly the ones RL rollouts use.

Training (docs/design.md section 2): for a pair (y_src, c, y_tgt) with clean latents x_ref = E(y_src), x0 = E(y_tgt)
(VAE posterior mode, ``(z - shift) * scale``, packed), draw sigma from a logit-normal and eps ~ N(0, I),
x_sigma = (1 - sigma) x0 + sigma eps, and minimise mean ||v_theta(x_sigma, sigma, x_ref, c) - (eps - x0)||^2.
The transformer receives ``timestep = sigma`` (what the pipeline passes). The prior only ever sees clean
renderings as references, never its own outputs. Whether chains on its own outputs then show exposure bias is
measured by ``mtflow.toy.diagnostics`` (for the shipped prior they do not: its passing turns are pixel-exact; docs/toy-world.md,
"Exposure bias").

Latents of clean renderings are a pure function of the scene, so they are cached by scene key (the world has a
few tens of thousands of scenes): the VAE encodes each scene once per run.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtflow.data.records import EditChain
from mtflow.models.base import TextEmbeddings
from mtflow.toy.judge import SUCCESS_THRESHOLD, ToyJudge
from mtflow.toy.vae import warmup_cosine  # noqa: F401  (the prior's schedule; tests import it from here)
from mtflow.toy.world import Scene, ToyChainSample, ToyWorld

ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED_VAE = ASSETS / "vae"
SHIPPED_PRIOR = ASSETS / "prior"
PRIOR_ASSET = "mtflow-assets:toy/prior"
PRIOR_MAX_SEQUENCE_LENGTH = (
    12  # T5 tokens the prior was trained with: the default world's longest instruction + </s>
)


# ====================================================================== building
@dataclass
class ToyPriorSpec:
    """Sizes of the prior's transformer and text encoders (the VAE is the shipped toy VAE)."""

    num_layers: int = 2
    """double-stream (MM-DiT) blocks."""
    num_single_layers: int = 4
    """single-stream blocks."""
    num_attention_heads: int = 4
    """attention heads."""
    attention_head_dim: int = 32
    """width per head (hidden = heads x head_dim)."""
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)
    """RoPE dims of (marker, row, column); must sum to ``attention_head_dim``."""
    text_width: int = 64
    """width of the CLIP and T5 encoders (T5 sequence and CLIP pooled embedding)."""
    clip_layers: int = 2
    """CLIP transformer layers."""
    t5_layers: int = 2
    """T5 encoder layers."""

    def __post_init__(self) -> None:
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {tuple(self.axes_dims_rope)} must sum to attention_head_dim {self.attention_head_dim}"
            )


def build_toy_prior_components(
    world: ToyWorld,
    spec: ToyPriorSpec | None = None,
    vae_path: str | Path = SHIPPED_VAE,
    seed: int = 0,
) -> dict[str, Any]:
    """Randomly initialised components of the prior's ``FluxKontextPipeline`` (real classes), with the toy VAE.

    Args:
        world: the toy world (its vocabulary goes into the tokenizers; its image size must suit the VAE).
        spec: transformer / text encoder sizes.
        vae_path: folder of a trained toy ``AutoencoderKL`` (``save_toy_vae``).
        seed: initialisation seed.
    """
    from mtflow.testing.tiny_kontext import TinyKontextSpec, build_tiny_kontext_components
    from mtflow.toy.vae import load_toy_vae

    spec = spec or ToyPriorSpec()
    vae = load_toy_vae(vae_path)
    return build_tiny_kontext_components(
        TinyKontextSpec(
            **{**asdict(spec), "axes_dims_rope": tuple(spec.axes_dims_rope)},
            latent_channels=int(vae.config.latent_channels),
            extra_words=world.vocabulary(),
        ),
        seed=seed,
        vae=vae,
    )


def save_toy_prior(components: dict[str, Any], path: str | Path, transformer_dtype: str = "float32") -> Path:
    """``save_pretrained`` a ``FluxKontextPipeline`` of ``components`` into ``path`` (safetensors).

    ``transformer_dtype="bfloat16"`` halves the file; ``KontextPolicy(dtype="float32")`` loads it back as float32.
    """
    from diffusers import FluxKontextPipeline

    if transformer_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"transformer_dtype must be float32 or bfloat16, got {transformer_dtype!r}")
    path = Path(path)
    transformer = components["transformer"]
    if transformer_dtype == "bfloat16":  # a copy: casting the caller's model in place would round its weights
        transformer = copy.deepcopy(transformer).to(torch.bfloat16)
    FluxKontextPipeline(**{**components, "transformer": transformer}).save_pretrained(
        path, safe_serialization=True
    )
    return path


def prior_world(pretrained: str | Path = PRIOR_ASSET, **overrides: Any) -> ToyWorld:
    """The ``ToyWorld`` a prior was trained on, from the ``"world"`` record of its ``training_stats.json`` (a
    folder or ``mtflow-assets:`` name; ``overrides`` win, e.g. ``num_turns``). A folder without the record (a
    foreign editor) gets the default world."""
    from mtflow.models.kontext import resolve_pretrained

    stats = Path(resolve_pretrained(str(pretrained))) / "training_stats.json"
    world = json.loads(stats.read_text()).get("world", {}) if stats.is_file() else {}
    return ToyWorld(**{**world, **overrides})


def load_prior_policy(
    pretrained: str | Path = PRIOR_ASSET,
    max_sequence_length: int = PRIOR_MAX_SEQUENCE_LENGTH,
    resolution: int = 32,
    lora_rank: int = 0,
    **kwargs: Any,
):
    """The prior as a float32 ``KontextPolicy``, loaded: bare by default (``lora_rank=0``), or with a LoRA adapter
    of ``lora_rank`` (and the ``lora_*`` ``kwargs``) to load trained weights into."""
    from mtflow.models.kontext import KontextPolicy

    return KontextPolicy(
        pretrained=str(pretrained),
        dtype="float32",
        resolution=resolution,
        max_sequence_length=max_sequence_length,
        lora_rank=lora_rank,
        **kwargs,
    ).load()


# ====================================================================== flow-matching math
def logit_normal_sigmas(num: int, mean: float, std: float, generator: torch.Generator | None) -> torch.Tensor:
    """[num] float32 sigma = sigmoid(mean + std * n), n ~ N(0, 1) (SD3's logit-normal time density)."""
    return torch.sigmoid(mean + std * torch.randn(num, generator=generator))


def noised(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x0 + sigma eps.

    Args: x0, eps: [N, L, C]; sigma: [N]. Returns [N, L, C].
    """
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * eps


def flow_matching_loss(
    velocity: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean squared error to the rectified-flow target v = eps - x0.

    Args:
        velocity: [N, L, C] predicted velocity; x0, eps: [N, L, C].
    Returns:
        scalar loss and stats: ``loss/flow`` (the loss) and ``loss/flow_per_sample`` ([N], detached).
    """
    per_sample = (velocity.float() - (eps - x0).float()).pow(2).mean(dim=tuple(range(1, velocity.ndim)))
    loss = per_sample.mean()
    return loss, {"loss/flow": loss.detach(), "loss/flow_per_sample": per_sample.detach()}


# ====================================================================== data
def shifted_labels(labels: np.ndarray, shift: int, fill: int) -> np.ndarray:
    """[H, W] label map moved ``shift`` pixels down and right; the uncovered top rows / left columns get ``fill``."""
    if shift == 0:
        return labels
    out = np.full_like(labels, fill)
    out[shift:, shift:] = labels[:-shift, :-shift]
    return out


def render_uint8(world: ToyWorld, scenes: Sequence[Scene], fade: float = 0.0, shift: int = 0) -> torch.Tensor:
    """[N, 3, H, W] uint8 renderings of ``scenes``: exact palette colours, or with ``fade`` > 0 every colour
    pulled that fraction of the way to mid-gray (128), rounded: colours that drifted off the palette; with
    ``shift`` > 0 the picture is moved that many pixels down and right (``shifted_labels``): a misaligned copy."""
    spec = world.spec
    palette = spec.palette
    if fade:
        palette = np.rint(palette + fade * (128.0 - palette.astype(np.float64))).astype(palette.dtype)
    array = np.stack(
        [palette[shifted_labels(spec.render_labels(s), shift, spec.label(s.background))] for s in scenes]
    )
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


class SceneLatentCache:
    """Packed reference latents of renderings, by (shift, scene key) (the VAE is frozen, so they never change)."""

    def __init__(self, policy, world: ToyWorld, max_entries: int = 200_000) -> None:
        """
        Args:
            policy: a loaded ``KontextPolicy`` (its ``encode_reference`` is the RL path's).
            world: renders the scenes.
            max_entries: stop caching new scenes beyond this many (memory bound; ~4 KB each at 32 px).
        """
        self.policy = policy
        self.world = world
        self.max_entries = max_entries
        self._latents: dict[tuple[int, str], torch.Tensor] = {}
        self.encoded = 0

    def __len__(self) -> int:
        return len(self._latents)

    def latents(self, scenes: Sequence[Scene], shift: int = 0) -> torch.Tensor:
        """[N, L, C] float32 packed latents of ``scenes`` (missing ones encoded in one VAE call), rendered moved
        ``shift`` pixels down and right (``render_uint8``)."""
        keys = [(shift, s.key()) for s in scenes]
        missing = {k: s for k, s in zip(keys, scenes) if k not in self._latents}
        fresh: dict[tuple[int, str], torch.Tensor] = {}
        if missing:
            rendered = render_uint8(self.world, list(missing.values()), shift=shift)
            pixels = self.policy.uint8_to_pixels(rendered)
            encoded = self.policy.encode_reference(pixels.to(self.policy.device))
            fresh = dict(zip(missing, encoded))
            self.encoded += len(missing)
            for k, v in fresh.items():
                if len(self._latents) < self.max_entries:
                    self._latents[k] = v
        return torch.stack([fresh[k] if k in fresh else self._latents[k] for k in keys])


def pair_samples(world: ToyWorld, start: int, count: int, split: str = "train") -> list[ToyChainSample]:
    """Single-turn pairs ``start .. start + count - 1`` of ``split`` (each a 1-turn ``ToyChainSample``)."""
    return [world.pair(i, split) for i in range(start, start + count)]


def encode_instructions(policy, instructions: Sequence[str], with_grad: bool) -> TextEmbeddings:
    """Encode unique instructions; ``with_grad`` keeps the graph through the text encoders (training them),
    otherwise the policy's cached, gradient-free ``encode_text`` is used."""
    if not with_grad:
        return policy.encode_text(instructions)
    pipe = policy._require_loaded()
    unique = list(dict.fromkeys(instructions))
    prompt_embeds, pooled, _ = pipe.encode_prompt(
        prompt=unique, prompt_2=None, device=policy.device, max_sequence_length=policy.max_sequence_length
    )
    text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=policy.device, dtype=prompt_embeds.dtype)
    return TextEmbeddings(texts=unique, prompt_embeds=prompt_embeds, pooled_embeds=pooled, text_ids=text_ids)


# ====================================================================== training
@dataclass
class PriorTrainConfig:
    """Supervised flow-matching settings."""

    steps: int = 3000
    """optimiser steps (the cosine schedule spans them; a time budget may stop earlier)."""
    batch_size: int = 32
    """pairs per step."""
    lr: float = 5e-4
    """peak AdamW learning rate."""
    text_lr: float = 2e-4
    """learning rate of the text encoders when they are trained."""
    warmup: int = 100
    """linear warm-up steps."""
    final_lr_fraction: float = 0.05
    """the cosine decays to this fraction of the peak."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """gradient clipping (total norm)."""
    logit_mean: float = 0.0
    """mean of the logit-normal sigma density."""
    logit_std: float = 1.0
    """std of the logit-normal sigma density."""
    train_text_encoders: bool = True
    """also train the tiny CLIP / T5 (they start random; training them binds colour words faster)."""
    time_budget_s: float | None = None
    """stop after this many seconds; the schedule is then compressed so the lr still decays (see ``train_prior``)."""
    seed: int = 0
    """seed of the noise and sigma draws."""
    pair_offset: int = 0
    """index of the first training pair (pairs are world.pair(i, "train"))."""
    target_shift: int = 0
    """train on targets moved this many pixels down and right of their sources (misaligned pairs, the drift
    experiment); 0: aligned, exact targets."""
    log_every: int = 50
    """print a line every this many steps."""


@dataclass
class PriorTrainStats:
    """What a training run did."""

    steps: int
    seconds: float
    pairs_seen: int
    first_loss: float
    final_loss: float
    scenes_encoded: int
    losses: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("losses")
        return out


def trainable_modules(policy, config: PriorTrainConfig) -> list[tuple[str, torch.nn.Module, float]]:
    """(name, module, lr) of what supervised training updates."""
    out = [("transformer", policy.transformer, config.lr)]
    if config.train_text_encoders:
        out += [("text_encoder", policy.text_encoder, config.text_lr)]
        out += [("text_encoder_2", policy.text_encoder_2, config.text_lr)]
    return out


def train_prior(
    policy,
    world: ToyWorld,
    config: PriorTrainConfig,
    log: Callable[[str], None] | None = print,
    on_step: Callable[[int, float], None] | None = None,
) -> PriorTrainStats:
    """Train ``policy`` (a bare ``KontextPolicy``, loaded) in place on single-turn train pairs of ``world``.

    With a ``time_budget_s`` the run ends when the budget is spent; the lr schedule is stretched over the number
    of steps the budget allows, re-estimated from the measured step rate (so the cosine still anneals).
    """
    generator = torch.Generator().manual_seed(config.seed)
    modules = trainable_modules(policy, config)
    groups = []
    for _, module, lr in modules:
        module.requires_grad_(True)
        module.train()
        groups.append({"params": [p for p in module.parameters() if p.requires_grad], "lr": lr})
    peak = [g["lr"] for g in groups]
    optimiser = torch.optim.AdamW(groups, weight_decay=config.weight_decay, betas=(0.9, 0.99))
    params = [p for g in groups for p in g["params"]]
    cache = SceneLatentCache(policy, world)
    policy.clear_text_cache()
    total = config.steps
    start = time.perf_counter()
    losses: list[float] = []
    step = 0
    try:
        for step in range(config.steps):
            elapsed = time.perf_counter() - start
            if config.time_budget_s is not None:
                if elapsed > config.time_budget_s:
                    step -= 1
                    break
                if step >= 20:  # projected number of steps within the budget
                    total = min(config.steps, int(step * config.time_budget_s / max(elapsed, 1e-6)))
            for g, lr in zip(optimiser.param_groups, peak):
                g["lr"] = lr * warmup_cosine(step, total, config.warmup, config.final_lr_fraction)
            samples = pair_samples(world, config.pair_offset + step * config.batch_size, config.batch_size)
            with torch.no_grad():
                reference = cache.latents([s.scenes[0] for s in samples])
                x0 = cache.latents([s.scenes[1] for s in samples], shift=config.target_shift)
            instructions = [s.instructions[0] for s in samples]
            text = encode_instructions(policy, instructions, with_grad=config.train_text_encoders)
            eps = torch.randn(x0.shape, generator=generator)
            sigma = logit_normal_sigmas(x0.shape[0], config.logit_mean, config.logit_std, generator)
            x = noised(x0, eps, sigma)
            velocity = policy.velocity(x, sigma, reference, text, text.index_of(instructions))
            loss, _ = flow_matching_loss(velocity, x0, eps)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimiser.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, losses[-1])
            if log is not None and (step % config.log_every == 0 or step == config.steps - 1):
                recent = float(np.mean(losses[-config.log_every :]))
                log(
                    f"prior step {step:5d}/{total}  loss {recent:.4f}  lr {optimiser.param_groups[0]['lr']:.2e}  "
                    f"scenes {len(cache)}  {time.perf_counter() - start:6.1f}s"
                )
    finally:
        for _, module, _ in modules:
            module.requires_grad_(False)
            module.eval()
        policy.clear_text_cache()
    return PriorTrainStats(
        steps=step + 1,
        seconds=time.perf_counter() - start,
        pairs_seen=(step + 1) * config.batch_size,
        first_loss=losses[0] if losses else math.nan,
        final_loss=float(np.mean(losses[-50:])) if losses else math.nan,
        scenes_encoded=cache.encoded,
        losses=losses,
    )


# ====================================================================== held-out evaluation
@dataclass
class HeldOutSettings:
    """How the prior's held-out numbers are measured (recorded next to them)."""

    num_pairs: int = 600
    """single-turn held-out pairs (world.pair(i, "heldout"), i < num_pairs)."""
    num_chains: int = 200
    """K-turn held-out chains (ToyChainDataset(world, "heldout"): world.chain(i, "heldout"), i < num_chains)."""
    num_steps: int = 10
    """deterministic sampler steps per turn."""
    seed: int = 0
    """evaluation seed (per-chain noise, ``eval_generators``)."""
    batch_size: int = 100
    """chains per evaluation rollout."""
    forward_batch_size: int = 100
    """samples per transformer call."""
    threshold: float = SUCCESS_THRESHOLD
    """IF score that counts as a successful turn."""
    num_bootstrap: int = 200
    """bootstrap resamples of the confidence intervals."""


def pair_chains(world: ToyWorld, count: int, split: str = "heldout", start: int = 0) -> list[EditChain]:
    """Single-turn pairs as 1-turn ``EditChain``s (the judge's ground truth in their metadata)."""
    return [world.pair(i, split).to_edit_chain() for i in range(start, start + count)]


def teacher_forced_chain(sample: ToyChainSample, turn: int) -> EditChain:
    """Turn ``turn`` (0-based) of a chain as a 1-turn chain from the ground-truth previous scene."""
    one = ToyChainSample(
        chain_id=f"{sample.chain_id}/tf{turn + 1}",
        split=sample.split,
        scenes=sample.scenes[turn : turn + 2],
        edits=sample.edits[turn : turn + 1],
        instructions=sample.instructions[turn : turn + 1],
        spec=sample.spec,
    )
    return one.to_edit_chain()


def turn_successes(scores, threshold: float) -> np.ndarray:
    """[N, K] float64 from a ``ScoreBatch`` (rows follow the evaluated chains' order): 1.0 / 0.0 whether turn k
    reached ``threshold``, NaN where the judge could not score it."""
    reached = (scores.instruction_following >= threshold).numpy().astype(np.float64)
    return np.where(scores.scored.numpy(), reached, np.nan)


def success_rates(successes: np.ndarray) -> list[float]:
    """Per column of [N, K] 1.0 / 0.0 / NaN successes: the percent of scored rows that succeeded (NaN if none)."""
    rates = []
    for column in np.asarray(successes, dtype=np.float64).T:
        scored = column[~np.isnan(column)]
        rates.append(100.0 * float(scored.mean()) if scored.size else math.nan)
    return rates


def evaluation_kwargs(settings: HeldOutSettings | Any, adapter: str | None) -> dict[str, Any]:
    """``evaluate_chains`` keywords of a deterministic, model-only evaluation from ``settings`` (any object with
    ``num_steps``, ``batch_size``, ``forward_batch_size``, ``seed``, ``threshold`` and ``num_bootstrap``)."""
    return dict(
        conditions=["model"],
        model_adapter=adapter,
        num_steps=settings.num_steps,
        batch_size=settings.batch_size,
        forward_batch_size=settings.forward_batch_size,
        seed=settings.seed,
        threshold=settings.threshold,
        num_bootstrap=settings.num_bootstrap,
        keep_items=0,
    )


def with_progress(evaluate_kwargs: dict[str, Any], label: str, show: bool) -> dict[str, Any]:
    """``evaluate_kwargs`` plus ``evaluate_chains``'s progress-bar label (``show`` False: silent)."""
    return {**evaluate_kwargs, "progress": label if show else None}


def teacher_forced_successes(
    policy,
    judge,
    samples: Sequence[ToyChainSample],
    num_turns: int,
    evaluate_kwargs: dict,
    threshold: float,
    progress: bool = False,
) -> np.ndarray:
    """[N, K] float: 1.0 / 0.0 whether turn k of sample n succeeds when edited from the ground-truth previous scene
    (``teacher_forced_chain``), NaN where unscored. Each forced turn starts from the noise the chained turn k of
    the same sample starts from (``paired_eval_generators``), so forced and chained turns differ only in their
    input. ``evaluate_kwargs`` go to ``evaluate_chains``; ``progress``: a progress bar on stderr."""
    from mtflow.eval.evaluate import evaluate_chains

    forced = [teacher_forced_chain(sample, k) for k in range(num_turns) for sample in samples]
    noise_from = [(sample.chain_id, k) for k in range(num_turns) for sample in samples]
    kwargs = with_progress(evaluate_kwargs, "teacher forced", progress)
    _, forced_raw = evaluate_chains(policy, judge, forced, noise_from=noise_from, **kwargs)
    first_turns = turn_successes(forced_raw["model"].scores, threshold)[:, 0]
    return first_turns.reshape(num_turns, len(samples)).T


def evaluate_prior(
    policy,
    world: ToyWorld,
    settings: HeldOutSettings | None = None,
    judge: ToyJudge | None = None,
    adapter: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Held-out numbers of an editor, through the trainer's ``evaluate_chains`` (deterministic rollouts, exact
    judge): single-turn success per edit type, and on K-turn chains the per-turn success, C_k, CC_k, O_k, M_k.
    ``progress``: progress bars on stderr.

    Returns a JSON-ready dict (``settings`` included).
    """
    from mtflow.eval.evaluate import evaluate_chains

    settings = settings or HeldOutSettings()
    judge = judge or ToyJudge()
    common = evaluation_kwargs(settings, adapter)
    started = time.perf_counter()
    pairs = pair_chains(world, settings.num_pairs)
    single, single_raw = evaluate_chains(
        policy, judge, pairs, **with_progress(common, "single-turn pairs", progress)
    )
    per_type: dict[str, list[float]] = {}
    for chain, success in zip(pairs, turn_successes(single_raw["model"].scores, settings.threshold)[:, 0]):
        if not np.isnan(success):
            per_type.setdefault(chain.edit_types[0], []).append(float(success))
    single_seconds = time.perf_counter() - started

    started = time.perf_counter()
    samples = [world.chain(i, "heldout") for i in range(settings.num_chains)]
    chains = [sample.to_edit_chain() for sample in samples]
    multi, _ = evaluate_chains(policy, judge, chains, **with_progress(common, "chains", progress))
    metrics = multi.conditions["model"]
    type_counts = Counter(t for c in chains for t in c.edit_types)
    multi_seconds = time.perf_counter() - started

    # The same turns from the ground-truth previous scene (teacher forcing): what each turn achieves when it does
    # not edit the model's own output. Own-output per-turn success below this is exposure bias + carried-over error.
    started = time.perf_counter()
    teacher_forced = success_rates(
        teacher_forced_successes(
            policy, judge, samples, world.num_turns, common, settings.threshold, progress
        )
    )
    return {
        "settings": asdict(settings),
        "judge": {
            "class": type(judge).__name__,
            "colour_tolerance": judge.colour_tolerance,
            "edge_weight": judge.edge_weight,
            "wrong_colour_credit": judge.wrong_colour_credit,
            "protect_earlier_edits": judge.protect_earlier_edits,
        },
        "single_turn": {
            "num_pairs": settings.num_pairs,
            "success": single.conditions["model"].cumulative_success[0].value,
            "mean_if": single.conditions["model"].mean_if[0].value,
            "consistency": single.conditions["model"].consistency[0].value,
            "success_by_type": {t: 100.0 * float(np.mean(v)) for t, v in sorted(per_type.items())},
            "count_by_type": {t: len(v) for t, v in sorted(per_type.items())},
            "seconds": single_seconds,
        },
        "multi_turn": {
            "num_chains": settings.num_chains,
            "num_turns": metrics.num_turns,
            "per_turn_success": [e.value for e in metrics.success_rate],
            "cumulative_success": [e.value for e in metrics.cumulative_success],
            "consistency": [e.value for e in metrics.consistency],
            "overall": [e.value for e in metrics.overall],
            "marginal_success": [e.value for e in metrics.marginal_success],
            "mean_if": [e.value for e in metrics.mean_if],
            "exposure_bias": metrics.exposure_bias.value,
            "teacher_forced_success": teacher_forced,
            "edit_type_counts": dict(sorted(type_counts.items())),
            "seconds": multi_seconds,
            "teacher_forced_seconds": time.perf_counter() - started,
            "report": multi.to_dict(),
        },
    }


def json_ready(data: Any) -> Any:
    """``data`` with every NaN / infinite float replaced by None (JSON has no NaN)."""
    if isinstance(data, dict):
        return {k: json_ready(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_ready(v) for v in data]
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data


def write_json(data: dict[str, Any], path: str | Path) -> Path:
    """Write ``data`` as indented JSON (NaN as null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_ready(data), indent=2, allow_nan=False) + "\n")
    return path
