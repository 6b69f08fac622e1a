"""Does an editor show exposure bias on the toy world, and if not, why not? (``mtflow.toy.diagnostics``)

    python tools/diagnose_exposure_bias.py                          # the shipped prior, 600 held-out chains
    python tools/diagnose_exposure_bias.py --prior /tmp/prior --chains 200 --output /tmp/diag
    python tools/diagnose_exposure_bias.py --checkpoint runs/toy/version_0/checkpoints/last.ckpt  # after RL

Prints a table (marginal and per-turn success on the model's own output through pixels and through latents,
teacher-forced per-turn success, the paired gap, M_k - M_1 split into turn difficulty + survivorship + exposure,
pass quality, next-turn success after imperfect vs near-perfect passes, and single-turn success with noise on the
source latent), and writes ``exposure_bias.json`` and
``exposure_bias.png`` into ``--output``. About 7 minutes for 600 chains on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from mtflow.export import checkpoint_adapter, save_lora
from mtflow.toy.diagnostics import ExposureBiasSettings, diagnose_exposure_bias, format_diagnosis
from mtflow.toy.prior import PRIOR_ASSET, json_ready, load_prior_policy, prior_world, write_json


def plot(diagnosis: dict, path: Path) -> Path:
    """Per-turn success (own output through pixels / latents, teacher forced), M_k - M_1 split into turn
    difficulty, survivorship and exposure, and the noise-robustness curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = list(range(1, diagnosis["num_turns"] + 1))
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.6))
    for key, label, style in (
        ("own_output_through_pixels", "marginal M_k, own output (pixels)", "o-"),
        ("own_output_through_latents", "marginal M_k, own output (latents)", "s--"),
    ):
        left.plot(turns, diagnosis[key]["marginal_success"], style, label=label)
    forced = [g["forced"] for g in diagnosis["own_output_through_pixels"]["paired_with_teacher_forced"]]
    left.plot(turns, forced, "^:", label="same chains and noise, teacher forced")
    left.set(xlabel="turn k", ylabel="success (%)", xticks=turns, title="Does success fall with k?")
    left.set_ylim(0, 100)
    left.legend(fontsize=8)
    parts = diagnosis["own_output_through_pixels"]["marginal_change"]
    later = [p["turn"] for p in parts]
    width = 0.2
    for offset, (key, label) in enumerate(
        (
            ("turn_difficulty", "turn difficulty (F_k - M_1)"),
            ("survivorship", "survivorship (alive - all, forced)"),
            ("exposure", "exposure (own - forced, alive)"),
            ("marginal_change", "M_k - M_1 (their sum)"),
        )
    ):
        values = [p[key] for p in parts]
        errors = [
            [v - p[f"{key}_ci_low"] for v, p in zip(values, parts)],
            [p[f"{key}_ci_high"] - v for v, p in zip(values, parts)],
        ]
        positions = [k + (offset - 1.5) * width for k in later]
        middle.bar(positions, values, width, yerr=errors, capsize=3, label=label)
    middle.axhline(0, color="black", linewidth=0.8)
    middle.set(
        xlabel="turn k",
        ylabel="percentage points",
        xticks=later,
        title="Why M_k moves (through pixels; 95% CIs)",
    )
    middle.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)  # bars fill the axes
    noise = diagnosis["source_noise_robustness"]
    right.plot([r["sigma"] for r in noise], [r["success"] for r in noise], "o-")
    right.set(
        xlabel="std of noise added to the source latent",
        ylabel="single-turn success (%)",
        title="Robustness to off-manifold sources",
    )
    right.set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def load_policy(prior: str, checkpoint: Path | None, adapter: str):
    """The bare prior, or the prior with a checkpoint's LoRA adapter (its rank, alpha and targets); returns the
    policy and the adapter to sample with (None: the bare model)."""
    if checkpoint is None:
        return load_prior_policy(prior), None
    tensors, info = checkpoint_adapter(checkpoint, adapter)  # one read; validates the file and the adapter
    lora = info["lora"]
    policy = load_prior_policy(
        info.get("pretrained", prior),
        lora_rank=lora["rank"],
        lora_alpha=lora["alpha"],
        lora_targets=lora["targets"],
    )
    with tempfile.TemporaryDirectory() as folder:
        policy.load_lora_file(save_lora(tensors, folder))
    return policy, "default"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prior", default=PRIOR_ASSET, help="editor folder (default: the shipped prior)")
    parser.add_argument(
        "--output", type=Path, default=Path("runs/exposure_bias"), help="folder for JSON + PNG"
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="an `mtflow fit` checkpoint: diagnose its trained LoRA"
    )
    parser.add_argument("--adapter", default="default", help="the checkpoint's adapter to diagnose")
    parser.add_argument("--chains", type=int, default=600, help="held-out K-turn chains")
    parser.add_argument("--pairs", type=int, default=300, help="held-out pairs for the robustness curve")
    parser.add_argument("--turns", type=int, default=3, help="K, turns per chain")
    parser.add_argument("--steps", type=int, default=10, help="deterministic sampler steps per turn")
    parser.add_argument("--seed", type=int, default=0, help="evaluation seed")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    policy, adapter = load_policy(args.prior, args.checkpoint, args.adapter)
    world = prior_world(
        policy.pretrained, num_turns=args.turns
    )  # the world the editor was trained on, K turns
    settings = ExposureBiasSettings(
        num_chains=args.chains, num_pairs=args.pairs, num_steps=args.steps, seed=args.seed
    )
    diagnosis = diagnose_exposure_bias(policy, world, settings, adapter=adapter, progress=True)
    diagnosis["prior"] = str(args.prior)
    diagnosis["checkpoint"] = None if args.checkpoint is None else str(args.checkpoint)
    args.output.mkdir(parents=True, exist_ok=True)
    write_json(json_ready(diagnosis), args.output / "exposure_bias.json")
    plot(diagnosis, args.output / "exposure_bias.png")
    print(format_diagnosis(diagnosis))
    print(f"\n{diagnosis['seconds']:.0f} s; wrote {args.output / 'exposure_bias.json'} and exposure_bias.png")
    return diagnosis


if __name__ == "__main__":
    main()
