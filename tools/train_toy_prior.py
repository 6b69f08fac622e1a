"""Train the toy world's editor prior and write it as a FluxKontextPipeline folder with its held-out numbers.

    python tools/train_toy_prior.py                                  # -> mtflow/toy/assets/prior (about 20 min)
    python tools/train_toy_prior.py --output /tmp/prior --steps 200  # a quick look

Writes into ``--output``: the pipeline (``save_pretrained``, transformer stored in ``--transformer-dtype``),
``training_stats.json`` (arguments, world, sizes, loss curve summary, wall clock, machine load) and
``heldout.json`` (``mtflow.toy.prior.evaluate_prior`` on the weights as reloaded from disk, i.e. exactly what
``KontextPolicy(pretrained=...)`` gives). Use one torch thread on a shared machine: two threads on two busy cores
run several times slower than one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mtflow.toy.prior import (
    ASSETS,
    PRIOR_ASSET,
    PRIOR_MAX_SEQUENCE_LENGTH,
    SHIPPED_PRIOR,
    SHIPPED_VAE,
    HeldOutSettings,
    PriorTrainConfig,
    ToyPriorSpec,
    build_toy_prior_components,
    evaluate_prior,
    load_prior_policy,
    prior_world,
    save_toy_prior,
    train_prior,
    write_json,
)
from mtflow.toy.world import ToyWorld

# Training pairs lean toward the edits that bind colour words to objects (the slowest to learn); background changes
# are learned first and need fewer examples.
DEFAULT_EDIT_TYPE_WEIGHTS = {
    "color_alter": 2.0,
    "subject_replace": 2.0,
    "subject_add": 1.5,
    "subject_remove": 1.0,
    "position_change": 1.0,
    "background_change": 0.5,
}


def _components_of(policy) -> dict:
    return dict(policy._require_loaded().components)


def _load_average() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, default=SHIPPED_PRIOR, help="pipeline folder to write")
    parser.add_argument("--vae", type=Path, default=SHIPPED_VAE, help="trained toy VAE folder")
    parser.add_argument("--steps", type=int, default=1500, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak transformer learning rate")
    parser.add_argument("--text-lr", type=float, default=1e-3, help="text encoder learning rate")
    parser.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    parser.add_argument(
        "--freeze-text-encoders", action="store_true", help="keep CLIP / T5 at their random init"
    )
    parser.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and noise seed")
    parser.add_argument("--transformer-dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--save-every", type=int, default=0, help="also save <output>_stepN every N steps")
    parser.add_argument("--eval-pairs", type=int, default=600, help="held-out single-turn pairs")
    parser.add_argument("--eval-chains", type=int, default=200, help="held-out 3-turn chains")
    parser.add_argument("--eval-steps", type=int, default=10, help="sampler steps per turn in evaluation")
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    parser.add_argument(
        "--evaluate-only",
        action="store_true",
        help="no training: (re)write heldout.json of the prior at --output",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--target-shift",
        type=int,
        default=0,
        help="train on targets moved this many pixels down and right (misaligned pairs: the drift experiment)",
    )
    parser.add_argument(
        "--position-jitter",
        type=int,
        default=0,
        help="the world's position_jitter: source objects up to this many pixels off their cell's centre",
    )
    parser.add_argument(
        "--edit-type-weights",
        type=json.loads,
        default=dict(DEFAULT_EDIT_TYPE_WEIGHTS),
        help="JSON {edit type: weight} of the training pairs (evaluation uses the world's own distribution)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.evaluate_only:  # the world the prior at --output was trained on
        world = prior_world(args.output)
    else:
        world = ToyWorld(position_jitter=args.position_jitter)
    # same scenes and split, other edit mix
    pair_world = ToyWorld(position_jitter=world.position_jitter, edit_type_weights=args.edit_type_weights)
    spec = ToyPriorSpec()
    config = PriorTrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        text_lr=args.text_lr,
        warmup=args.warmup,
        train_text_encoders=not args.freeze_text_encoders,
        time_budget_s=args.time_budget,
        seed=args.seed,
        target_shift=args.target_shift,
    )
    record = None
    if not args.evaluate_only:
        record = train(args, world, pair_world, spec, config)
    if not args.no_eval:
        reloaded = load_prior_policy(args.output, max_sequence_length=PRIOR_MAX_SEQUENCE_LENGTH)
        settings = HeldOutSettings(
            num_pairs=args.eval_pairs, num_chains=args.eval_chains, num_steps=args.eval_steps
        )
        heldout = evaluate_prior(reloaded, world, settings, progress=True)
        heldout["pretrained"] = asset_name(args.output)
        heldout["max_sequence_length"] = PRIOR_MAX_SEQUENCE_LENGTH
        heldout["world"] = world_args(world)
        heldout["test_subset"] = record_test_subset(reloaded, world, args.threads)
        write_json(heldout, args.output / "heldout.json")
        print(json.dumps({k: heldout[k] for k in ("single_turn",)}, indent=2))
        multi = {k: v for k, v in heldout["multi_turn"].items() if k != "report"}
        print(json.dumps(multi, indent=2))
    return record


def train(args, world: ToyWorld, pair_world: ToyWorld, spec: ToyPriorSpec, config: PriorTrainConfig) -> dict:
    """Build, train and save the prior; returns the training record (also written to training_stats.json)."""
    load_start = _load_average()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        save_toy_prior(build_toy_prior_components(world, spec, args.vae, seed=args.seed), Path(tmp) / "init")
        policy = load_prior_policy(Path(tmp) / "init", max_sequence_length=PRIOR_MAX_SEQUENCE_LENGTH)
    parameters = sum(p.numel() for p in policy.transformer.parameters())

    def checkpoint(step: int, loss: float) -> None:
        if args.save_every and step > 0 and step % args.save_every == 0:
            save_toy_prior(_components_of(policy), f"{args.output}_step{step}", args.transformer_dtype)

    stats = train_prior(policy, pair_world, config, on_step=checkpoint)
    if args.output.exists():
        shutil.rmtree(args.output)
    save_toy_prior(_components_of(policy), args.output, args.transformer_dtype)
    train_seconds = time.perf_counter() - started
    losses = stats.losses
    record = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "world": world_args(world),
        "pair_edit_type_weights": pair_world.edit_type_weights,
        "spec": asdict(spec),
        "max_sequence_length": PRIOR_MAX_SEQUENCE_LENGTH,
        "transformer_parameters": parameters,
        "train": stats.to_dict(),
        "loss_every_100": [
            round(sum(losses[i : i + 100]) / len(losses[i : i + 100]), 5) for i in range(0, len(losses), 100)
        ],
        "wall_clock_s": train_seconds,
        "torch_threads": args.threads,
        "load_average_start": load_start,
        "load_average_end": _load_average(),
    }
    write_json(record, args.output / "training_stats.json")
    print(json.dumps({k: record[k] for k in ("train", "wall_clock_s", "load_average_end")}, indent=2))
    return record


TEST_SUBSET = HeldOutSettings(
    num_pairs=24, num_chains=24, num_steps=10, batch_size=24, forward_batch_size=24, num_bootstrap=0
)


def record_test_subset(policy, world: ToyWorld, threads: int) -> dict:
    """Held-out numbers of a small subset that ``tests/toy/test_prior.py`` reproduces exactly (same settings,
    same thread count)."""
    result = evaluate_prior(policy, world, TEST_SUBSET, progress=True)
    result["multi_turn"].pop("report")
    result["torch_threads"] = threads
    return result


def asset_name(folder: Path) -> str:
    """``mtflow-assets:toy/<name>`` for a prior written into the package's assets, else the folder itself."""
    folder = folder.resolve()
    if folder.parent == ASSETS.resolve():
        return f"{PRIOR_ASSET.rsplit('/', 1)[0]}/{folder.name}"
    return str(folder)


def world_args(world: ToyWorld) -> dict:
    """The ``ToyWorld`` arguments that matter for reproducing the prior's data (the defaults otherwise)."""
    return {
        "image_size": world.spec.image_size,
        "grid_size": world.spec.grid_size,
        "min_shapes": world.min_shapes,
        "max_shapes": world.max_shapes,
        "shapes": list(world.shapes),
        "edit_types": list(world.edit_types),
        "num_turns": world.num_turns,
        "templates_per_type": world.templates_per_type,
        "heldout_fraction": world.heldout_fraction,
        "split_salt": world.split_salt,
        "position_jitter": world.position_jitter,
        "seed": world.seed,
    }


if __name__ == "__main__":
    main()
