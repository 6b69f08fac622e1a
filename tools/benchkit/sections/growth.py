"""Cost growth with G, T and K (a fresh process per point: time and peak RSS, with fitted lines), and the two
optimisations measured in fresh processes too: gradient checkpointing (peak memory) and ``torch.compile``."""

from __future__ import annotations

import json
import statistics
import tempfile
from dataclasses import asdict
from pathlib import Path

from benchkit.context import Context
from benchkit.harness import RunResult, module_to_json
from benchkit.report import Section, fmt_mib, fmt_s, fmt_x, log
from benchkit.timing import fit_line
from benchkit.worker import WorkerJob, run_worker


def growth(ctx: Context) -> tuple[Section, list[str], list[str] | None]:
    """Full-SDE GRPO in a fresh process per point of G, T and K (time, peak RSS, stored rollout) with fitted lines;
    then gradient checkpointing and ``torch.compile`` (the optimisations table's last rows), also in fresh
    processes."""
    a = ctx.args
    spec = asdict(ctx.spec)
    grpo = ctx.grpo()
    points = []  # (axis, value, module in JSON form, K)
    for g in a.growth_group:
        points.append(("G", g, module_to_json(ctx.module(grpo, group_size=g)), a.turns))
    for t in a.growth_steps:
        points.append(("T", t, module_to_json(ctx.module(grpo, num_steps=t)), a.turns))
    for k in a.growth_turns:
        points.append(("K", k, module_to_json(ctx.module(grpo)), k))
    cache: dict[str, RunResult] = {}
    measured: dict[str, list[tuple[int, float, float, int]]] = {"G": [], "T": [], "K": []}

    def job(module: dict, turns: int, **extra) -> WorkerJob:
        return WorkerJob(
            str(ctx.model_path),
            spec,
            a.chains,
            module,
            num_turns=turns,
            iterations=a.growth_repeats,
            warmup=1,
            threads=a.threads,
            **extra,
        )

    for axis, value, module, turns in points:
        key = json.dumps([module, turns], sort_keys=True)
        if key not in cache:
            log(f"growth: {axis} = {value} (fresh process)")
            cache[key] = run_worker(job(module, turns))
        result = cache[key]
        stored = sum(result.rollout_bytes.values())
        measured[axis].append((value, result.iteration_s, result.peak, stored))
    fits = Section(
        "Cost growth (GRPO, full SDE)",
        f"One fresh process per point (B = {a.chains}; base G = {a.group}, T = {a.steps}, K = {a.turns}; one "
        f"varies at a time); time = median of {a.growth_repeats} iterations after one warm-up; peak = largest "
        "resident-set high-water mark above the iteration's starting RSS (`VmHWM` after `malloc_trim(0)` and a reset "
        "through `/proc/self/clear_refs`; torch has no CPU allocator statistics and `tracemalloc` does not see "
        "tensors). Lines are least-squares fits.",
        [
            "axis",
            "points (value: time, peak, stored rollout)",
            "time slope (R^2)",
            "peak slope (R^2)",
            "stored slope (R^2)",
        ],
    )
    ctx.results["growth"] = measured
    for axis, data in measured.items():
        if len(data) < 2:
            continue
        xs = [float(row[0]) for row in data]
        time_fit = fit_line(xs, [row[1] for row in data])
        mem_fit = fit_line(xs, [row[2] for row in data])
        stored_fit = fit_line(xs, [row[3] for row in data])
        fits.rows.append(
            [
                axis,
                "; ".join(f"{v}: {fmt_s(t)}, {fmt_mib(p)}, {fmt_mib(b)}" for v, t, p, b in data),
                f"{time_fit.slope:.3f} s ({time_fit.r2:.3f})",
                f"{fmt_mib(mem_fit.slope)} ({mem_fit.r2:.3f})",
                f"{fmt_mib(stored_fit.slope)} ({stored_fit.r2:.3f})",
            ]
        )
        ctx.results.setdefault("fits", {})[axis] = {
            "time": asdict(time_fit),
            "peak": asdict(mem_fit),
            "stored": asdict(stored_fit),
        }
    if "G" in ctx.results.get("fits", {}):
        fit = ctx.results["fits"]["G"]
        per_traj, stored_traj = fit["peak"]["slope"] / a.chains, fit["stored"]["slope"] / a.chains
        fits.notes.append(
            f"Per trajectory (G slope / B): peak {fmt_mib(per_traj)}, of which the stored rollout (float32 states, next "
            f"states, latents, images, log-probs) is {fmt_mib(stored_traj)}. The rest are activations of the update's "
            f"micro-batches: all {a.chains * max(a.growth_group or [a.group])} trajectories fit in one forward batch "
            f"of {a.forward_batch} here, so they grow with G; beyond the forward batch they stop growing, while the "
            "stored rollout keeps growing linearly in G, T (full SDE) and K. Against T and K the peak is flat for that "
            "reason (the update's activations dominate at these sizes) while the stored rollout is exactly linear."
        )
    log("growth: gradient checkpointing (fresh process, alternating iterations)")
    module = module_to_json(ctx.module(grpo))
    result = run_worker(job(module, a.turns, variants=["checkpointing_off", "checkpointing_on"]))
    gc = result.split()
    (t0, p0) = gc["checkpointing_off"].iteration_s, gc["checkpointing_off"].peak
    (t1, p1) = gc["checkpointing_on"].iteration_s, gc["checkpointing_on"].peak
    ctx.results["gradient_checkpointing"] = {name: asdict(run) for name, run in gc.items()}
    gc_row = [
        "gradient checkpointing (`KontextPolicy(gradient_checkpointing=True)`)",
        f"{fmt_mib(p0)}, {fmt_s(t0)}",
        f"{fmt_mib(p1)}, {fmt_s(t1)}",
        f"{fmt_x(p0 / max(p1, 1))} lower peak, {fmt_x(t1 / t0)} time",
        "iteration peak RSS above its start and time, alternating iterations in a fresh process",
    ]
    compile_row = None
    if not a.skip_compile:
        log("optimisations: torch.compile (fresh process, compiles the no-grad and the training graph)")
        compile_job = job(
            module, a.turns, variants=["eager", "compiled"], compile_transformer=True, memory=False
        )
        with tempfile.TemporaryDirectory(prefix="mtflow-bench-inductor-") as cache:
            # a fresh inductor cache: the compile cost is a cold compile, not a cache hit from an earlier run
            fresh = {"TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": str(Path(cache) / "triton")}
            result = run_worker(compile_job, timeout=1800, env=fresh)
        split = result.split()
        eager_s, compiled_s = split["eager"].iteration_s, split["compiled"].iteration_s
        compile_cost = result.warmup_walls[1] - statistics.median(split["compiled"].walls)
        saved = eager_s - compiled_s
        ctx.results["compile"] = {
            "split": {name: asdict(run) for name, run in split.items()},
            "warmup_walls": result.warmup_walls,
            "eager_s": eager_s,
            "compiled_s": compiled_s,
            "cost_s": compile_cost,
        }
        compile_row = [
            "`torch.compile` of the transformer forward (inductor, CPU)",
            fmt_s(eager_s),
            fmt_s(compiled_s),
            fmt_x(eager_s / compiled_s),
            (
                f"steady iterations alternating in one process; one-off compile cost {fmt_s(compile_cost)}, repaid "
                f"after {compile_cost / saved:.0f} iterations"
            )
            if saved > 0
            else "no gain on this CPU",
        ]
    return fits, gc_row, compile_row
