"""The report's first and last sections: the issue's targets against this run's numbers, and the changes to the
trainer the run justifies (or rules out)."""

from __future__ import annotations

import inspect
import statistics

from benchkit.context import Context
from benchkit.report import Section, fmt_x
from mtflow.algorithms import NFT


def summary(ctx: Context) -> Section:
    """The issue's targets against this run's numbers."""
    a = ctx.args
    res = ctx.results

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    overhead = statistics.median(res["overhead"]["grpo"]["ratios"])
    rows = [
        ["framework overhead, full-SDE GRPO iteration", "<= 1.15", fmt_x(overhead), verdict(overhead <= 1.15)]
    ]
    worst = max(statistics.median(v["ratios"]) for v in res["overhead"].values())
    rows.append(["framework overhead, worst loss mode", "<= 1.15", fmt_x(worst), verdict(worst <= 1.15)])
    for loss, row in res.get("naive", {}).items():
        if loss in ("checks", "counts"):
            continue
        speedup = statistics.median(row["naive_walls"]) / statistics.median(row["mtflow_walls"])
        rows.append(
            [
                f"mtflow vs anchor-style loop ({loss}, G = {a.group}, K = {a.turns})",
                ">= 2x",
                fmt_x(speedup),
                verdict(speedup >= 2),
            ]
        )
    full = ctx.runs["grpo"].iteration_s
    window = full / ctx.runs["grpo_window"].iteration_s
    rows.append(
        [
            f"window (W = {a.window}) vs full SDE per iteration, T = {a.steps}",
            ">= 2x",
            fmt_x(window),
            verdict(window >= 2),
        ]
    )
    nft_ok = []
    for d in a.nft_draws:
        ratio = full / ctx.runs[f"nft_d{d}"].iteration_s
        if ratio >= 2:
            nft_ok.append(d)
        rows.append(
            [
                f"NFT (D = {d}) vs full SDE per iteration, T = {a.steps}",
                ">= 2x",
                fmt_x(ratio),
                verdict(ratio >= 2),
            ]
        )
    return Section(
        "Summary: the issue's targets",
        "CPU, tiny model, this run (details below).",
        ["target", "wanted", "measured", "verdict"],
        rows,
        [
            f"NFT's cost grows with its noised copies per turn D (`NFT.train_timesteps`, "
            f"`--model.algorithm.train_timesteps`, mtflow's default {_default_nft_copies()}): each "
            "copy costs an old-adapter forward, a reference forward (beta_ref > 0) and a trained forward+backward. "
            f"Here NFT is >= 2x cheaper than full-SDE GRPO for D in {nft_ok or 'no tested value'}; see the GPU "
            "projection for the same comparison at 512 px.",
        ],
    )


def _default_nft_copies() -> int:
    return inspect.signature(NFT.__init__).parameters["train_timesteps"].default


def findings(ctx: Context) -> Section:
    """Changes to the trainer this run justifies (or rules out), with the measured ratios."""
    res = ctx.results
    rows = []
    if "compile" in res:
        ratio = res["compile"]["eager_s"] / res["compile"]["compiled_s"]
        rows.append(
            [
                "`torch.compile` option for the transformer forward",
                f"{fmt_x(ratio)} per steady iteration on this CPU after a {res['compile']['cost_s']:.0f} s cold compile "
                "(two graphs: no-grad rollout, training)",
                "applied as the opt-in `KontextPolicy(compile_transformer=True)` (compiled after FSDP sharding); "
                "switching adapters (NFT: old, base, trained) adds graphs, so measure on GPU before making it the "
                "default",
            ]
        )
    storage = res["projection"]["storage_mib"]
    rows.append(
        [
            "the previous iteration's rollout kept for logging",
            f"would be one extra rollout resident: {storage['grpo_fp32']:,.0f} MiB per GPU at the paper setting "
            "(full SDE, fp32 states)",
            "applied: `FlowRLModule.last_rollout` is a `RolloutPreview` (the first rows' uint8 images only), so one "
            "rollout is resident at a time",
        ]
    )
    rows.append(
        [
            "host synchronisation inside the update loop",
            "not measurable on CPU (no asynchronous device)",
            "applied: stats and losses stay device tensors until the end of the optimiser step (one finiteness "
            "sync per step, one transfer of all stats per update); micro-batch weights are read from a host copy",
        ]
    )
    overhead = statistics.median(res["overhead"]["grpo"]["ratios"])
    rollout_part = statistics.median(res["overhead"]["grpo"]["rollout"])
    update_part = statistics.median(res["overhead"]["grpo"]["update"])
    rows.append(
        [
            "the rest of the loop (sampler math, bookkeeping, loss, Lightning)",
            f"iteration {fmt_x(overhead)}, rollout {fmt_x(rollout_part)}, update {fmt_x(update_part)} of their unavoidable "
            "passes (full-SDE GRPO, tiny model)",
            "no change needed: no part of the loop is far above its passes"
            if overhead <= 1.15
            else "above the 1.15 target at these sizes: profile before changing anything",
        ]
    )
    return Section(
        "Findings for the trainer (item 2)",
        "What this run justifies changing in files this benchmark does not own; each with its measured effect.",
        ["finding", "measured", "proposed change"],
        rows,
    )
