"""What the ablation study compares (``tools/ablations.py``): its grids, its cells and the paper's claims.

A *cell* is one setting (a grid and its non-seed axis values); every cell runs 3 seeds. The reference cell (the
paper's method on the toy job, ``configs/sweeps/ablations/ref.yaml``) is shared by every ablation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GRIDS = (  # run order: the central comparison and the consistency levers first
    "ref",
    "single_turn",
    "broadcast_turn",
    "last_step",
    "beta_kl",
    "lambda_cc",
    "nft",
    "fusion_reward",
    "binary",
    "judge_noise",
    "judge_shrink",
    "judge_saturation",
    "aggregation",
    "group_size",
    "num_steps",
)


@dataclass(frozen=True)
class Cell:
    """A setting: its grid and the values of its non-seed axes (``label`` is how tables name it)."""

    grid: str
    label: str


REFERENCE = Cell("ref", "reference")

# the axis keys whose values name a cell, shortened for labels
_SHORT = {
    "model.advantage.aggregation": "aggregation",
    "model.advantage.lambda_cc": "lambda_CC",
    "model.rollout.group_size": "G",
    "model.rollout.num_steps": "T",
    "model.algorithm.beta_kl": "beta_KL",
    "model.scorer.init_args.noise_std": "noise std",
    "model.scorer.init_args.shrink": "shrink",
    "model.scorer.init_args.saturation_bias": "saturation bias",
}
_GRID_LABELS = {
    "ref": "reference",
    "single_turn": "single-turn RL",
    "broadcast_turn": "per-turn advantages",
    "last_step": "deterministic last step",
    "nft": "NFT",
    "fusion_reward": "reward-level fusion",
    "binary": "binary scores",
}


def cell_of_run(grid: str, axes: dict) -> tuple[Cell, int]:
    """The cell and the seed of a run, from its grid and its axis values (``sweep.json``)."""
    seed = int(axes.get("seed_everything", 0))
    named = [f"{_SHORT.get(k, k)} {v}" for k, v in axes.items() if k != "seed_everything"]
    if grid == "ref":
        return REFERENCE, seed
    return Cell(grid, ", ".join(named) if named else _GRID_LABELS.get(grid, grid)), seed


@dataclass(frozen=True)
class Claim:
    """A paper claim as a direction on the difference ``cell - reference`` (C_3 / O_3 in points): the claim holds
    when the difference has ``sign`` (+1: the cell is better, -1: worse) with a CI excluding 0."""

    text: str
    cell: Cell
    metric: str
    sign: int


@dataclass(frozen=True)
class Ablation:
    """One table of docs/ablations.md: the reference and its alternatives, and the paper's claims about them."""

    name: str
    question: str
    cells: tuple[Cell, ...]
    claims: tuple[Claim, ...] = field(default_factory=tuple)


def _cells(grid: str, labels: list[str]) -> tuple[Cell, ...]:
    return tuple(Cell(grid, label) for label in labels)


SINGLE = Cell("single_turn", "single-turn RL")
PER_TURN = Cell("broadcast_turn", "per-turn advantages")

ABLATIONS = (
    Ablation(
        "multi_turn",
        "Multi-turn RL with the trajectory-broadcast advantage vs per-turn advantages vs single-turn RL",
        (REFERENCE, PER_TURN, SINGLE),
        (
            Claim("multi-turn broadcast beats single-turn RL at turn 3 (C_3)", SINGLE, "C_3", -1),
            Claim("multi-turn broadcast beats single-turn RL at turn 3 (O_3)", SINGLE, "O_3", -1),
            Claim("per-turn advantages do worse than the broadcast at turn 3 (O_3)", PER_TURN, "O_3", -1),
        ),
    ),
    Ablation(
        "fusion",
        "Advantage-level vs reward-level fusion of IF and CC",
        (REFERENCE, Cell("fusion_reward", "reward-level fusion")),
        (
            Claim(
                "advantage-level fusion beats reward-level fusion (O_3)",
                Cell("fusion_reward", "reward-level fusion"),
                "O_3",
                -1,
            ),
        ),
    ),
    Ablation(
        "aggregation",
        "Turn aggregation of the trajectory reward (the reference aggregates by the mean)",
        (REFERENCE, *_cells("aggregation", ["aggregation min", "aggregation last", "aggregation product"])),
    ),
    Ablation(
        "scores",
        "1-5 scores vs binary (pass / fail) scores from the training judge",
        (REFERENCE, Cell("binary", "binary scores")),
        (Claim("1-5 scores beat binary ones (O_3)", Cell("binary", "binary scores"), "O_3", -1),),
    ),
    Ablation(
        "lambda_cc",
        "The weight of content consistency, lambda_CC (reference 0.3)",
        (
            *_cells("lambda_cc", ["lambda_CC 0.0", "lambda_CC 0.1"]),
            REFERENCE,
            Cell("lambda_cc", "lambda_CC 1.0"),
        ),
        (
            Claim(
                "lambda_CC = 0.3 balances best: beats 0 (O_3)", Cell("lambda_cc", "lambda_CC 0.0"), "O_3", -1
            ),
            Claim(
                "lambda_CC = 0.3 balances best: beats 0.1 (O_3)",
                Cell("lambda_cc", "lambda_CC 0.1"),
                "O_3",
                -1,
            ),
            Claim(
                "lambda_CC = 0.3 balances best: beats 1.0 (O_3)",
                Cell("lambda_cc", "lambda_CC 1.0"),
                "O_3",
                -1,
            ),
        ),
    ),
    Ablation(
        "group_size",
        "Group size G at the same cost (B x G = 32 trajectories per iteration; reference G = 8)",
        (Cell("group_size", "G 4"), REFERENCE, Cell("group_size", "G 16")),
        (Claim("G = 16 does best: beats G = 8 (O_3)", Cell("group_size", "G 16"), "O_3", +1),),
    ),
    Ablation(
        "num_steps",
        "Sampler steps T at the same cost (B x T = 24; reference T = 6)",
        (Cell("num_steps", "T 4"), REFERENCE, Cell("num_steps", "T 12")),
        (Claim("T = 12 does best: beats T = 6 (O_3)", Cell("num_steps", "T 12"), "O_3", +1),),
    ),
    Ablation("algorithm", "GRPO (reference) vs NFT", (REFERENCE, Cell("nft", "NFT"))),
    Ablation(
        "last_step",
        "The last SDE step of each turn stochastic (reference) or deterministic in chained rollouts",
        (REFERENCE, Cell("last_step", "deterministic last step")),
    ),
    Ablation(
        "beta_kl",
        "beta_KL, the KL to the frozen base, as a consistency lever (reference 0; the KL per element is ~3e-4 after a few iterations, so 1 and 10)",
        (REFERENCE, *_cells("beta_kl", ["beta_KL 1.0", "beta_KL 10.0"])),
    ),
    Ablation(
        "judge",
        "Judge quality vs learning: the exact judge (reference) against noisy, shrunk and biased judges",
        (
            REFERENCE,
            *_cells("judge_noise", ["noise std 0.5", "noise std 1.0", "noise std 2.0"]),
            Cell("judge_shrink", "shrink 0.5"),
            Cell("judge_saturation", "saturation bias 2.0"),
        ),
    ),
)
