"""Train the toy world's small ``AutoencoderKL`` on CPU and save it with ``save_pretrained``.

    python tools/train_toy_vae.py mtflow/toy/assets/vae          # the shipped VAE (3000 steps, seed 0)
    python tools/train_toy_vae.py /tmp/vae --steps 1100         # a quicker one (palette survival ~97.7%)

The shipped run took 31 min on 2 CPU cores shared with other jobs (about 0.3 s per step unshared); see
``training_stats.json`` next to the weights. Results are seeded but not bit-reproducible across thread counts.

Trains on random scenes of the toy world's variants (all five shapes, 2x2 and 3x3 grids, 0 to max objects) so
that the VAE serves any default-palette world of that image size. Writes the VAE folder plus
``training_stats.json`` (training run, latent factors, round-trip error on the default world and on the mix).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from mtflow.toy.vae import build_toy_vae, measure_round_trip, save_toy_vae, train_toy_vae, vae_scale_factor
from mtflow.toy.world import SHAPES, ToyWorld


def training_worlds(image_size: int) -> list[ToyWorld]:
    """The world variants the VAE is trained on (default palettes; every variant's shapes and layouts)."""
    return [
        ToyWorld(image_size=image_size, shapes=SHAPES, min_shapes=0, max_shapes=4),
        ToyWorld(image_size=image_size, shapes=SHAPES, grid_size=3, min_shapes=0, max_shapes=6),
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output", type=Path, help="folder to save the VAE to")
    parser.add_argument("--image-size", type=int, default=32, help="world image size (multiple of 4)")
    parser.add_argument(
        "--block-out-channels", type=int, nargs="+", default=[16, 32], help="channels per level"
    )
    parser.add_argument("--latent-channels", type=int, default=4, help="latent channels")
    parser.add_argument("--norm-num-groups", type=int, default=8, help="GroupNorm groups")
    parser.add_argument("--steps", type=int, default=3000, help="optimiser steps (cosine schedule length)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    parser.add_argument("--kl-weight", type=float, default=1e-3, help="weight of the per-element KL")
    parser.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--eval-images", type=int, default=512, help="images for the round-trip measurement")
    parser.add_argument("--seed", type=int, default=0, help="seed of init and data")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    worlds = training_worlds(args.image_size)
    vae = build_toy_vae(
        args.block_out_channels, args.latent_channels, norm_num_groups=args.norm_num_groups,
        sample_size=args.image_size, seed=args.seed,
    )  # fmt: skip
    train = train_toy_vae(
        vae, worlds, steps=args.steps, batch_size=args.batch_size, lr=args.lr, kl_weight=args.kl_weight,
        time_budget_s=args.time_budget, seed=args.seed,
    )  # fmt: skip
    default_world = [ToyWorld(image_size=args.image_size)]
    report = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "parameters": sum(p.numel() for p in vae.parameters()),
        "scale_factor": vae_scale_factor(vae),
        "train": asdict(train),
        "round_trip_default_world": measure_round_trip(vae, default_world, args.eval_images).to_dict(),
        "round_trip_training_mix": measure_round_trip(vae, worlds, args.eval_images).to_dict(),
    }
    save_toy_vae(vae, args.output)
    (args.output / "training_stats.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
