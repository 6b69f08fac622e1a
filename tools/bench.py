"""Side-by-side benchmark of mtflow's RL loop on the tiny Kontext model (issue 8 items 1, 2 and 4).

One run measures, on real classes at tiny size, everything as ratios taken in the same process:

1. GRPO with the SDE on all T steps vs GRPO window mode (W of T) vs NFT (deterministic rollout) at equal B, G, K,
   T, as NFT's cost depends on its noised copies per turn D (``--nft-draws``): time per iteration and trajectory;
   every run's network calls are counted and checked against ``benchkit.passes.model_passes``.
2. Framework overhead: iteration wall time (``FlowRLModule.training_step`` in a Lightning ``Trainer``, as
   ``mtflow fit`` drives it) / the sum of the model passes it cannot avoid, each timed alone on the raw modules.
3. mtflow's batched loop vs an anchor-style loop (``benchkit.naive``: one trajectory at a time, text encoded per
   sample and turn, no caching, the source encoded per trajectory, per-sample recomputation), after checking both
   produce the same rollout on the same seeds.
4. Optimisations, each with its before/after ratio: encodes avoided, batching, compact storage, gradient
   checkpointing, scoring overlapped with the reward-independent work, ``torch.compile`` of the transformer.
5. Cost growth with G, T and K (fresh process per point: time and peak RSS), with fitted lines.
6. A GPU projection of the paper setting from FLOP counts (``benchkit.projection``).

The machinery lives in ``tools/benchkit/`` (next to this script, not in the mtflow wheel), one module per section
of the report in ``tools/benchkit/sections/``.

    python tools/bench.py                        # default sizes, about 5 minutes on 2 shared cores
    python tools/bench.py --quick                # smoke run (well under a minute)
    python tools/bench.py --write BENCHMARKS.md  # also write the Markdown report with this command line
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from benchkit.context import Context
from benchkit.harness import ModelSpec, bench_chains, build_model, load_policy
from benchkit.report import Section, log
from benchkit.sections.editors import editors_section
from benchkit.sections.gpu_projection import projection
from benchkit.sections.growth import growth
from benchkit.sections.loss_modes import loss_modes
from benchkit.sections.naive_vs_batched import naive_comparison
from benchkit.sections.optimisations import optimisations
from benchkit.sections.overhead import overhead
from benchkit.sections.summary import findings, summary

from mtflow.rollout import RolloutConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("tiny model")
    m.add_argument("--layers", type=int, default=1, help="double-stream blocks")
    m.add_argument("--single-layers", type=int, default=1, help="single-stream blocks")
    m.add_argument("--heads", type=int, default=2, help="attention heads")
    m.add_argument("--head-dim", type=int, default=16, help="attention head width (multiple of 4)")
    m.add_argument("--text-width", type=int, default=32, help="T5 / CLIP width")
    m.add_argument("--resolution", type=int, default=32, help="image side in pixels (multiple of 4)")
    m.add_argument("--text-tokens", type=int, default=32, help="T5 tokens per instruction")
    m.add_argument("--lora-rank", type=int, default=4, help="LoRA rank")
    s = p.add_argument_group("iteration")
    s.add_argument("--chains", "-B", type=int, default=2, help="B chains per iteration")
    s.add_argument("--group", "-G", type=int, default=8, help="G trajectories per chain")
    s.add_argument("--turns", "-K", type=int, default=3, help="K turns")
    s.add_argument("--steps", "-T", type=int, default=12, help="T sampler steps")
    s.add_argument("--window", "-W", type=int, default=2, help="W trained steps in window mode")
    s.add_argument("--nft-draws", type=int, nargs="+", default=[1, 2, 4], help="NFT noised copies per turn")
    s.add_argument("--forward-batch", "-F", type=int, default=16, help="samples per network call")
    r = p.add_argument_group("measurement")
    r.add_argument("--rounds", type=int, default=3, help="passes through all loss configurations")
    r.add_argument("--repeats", type=int, default=2, help="timed iterations per configuration and round")
    r.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    r.add_argument("--pass-repeats", type=int, default=5, help="timed calls per model pass")
    r.add_argument("--naive-repeats", type=int, default=2, help="timed naive iterations")
    r.add_argument("--batching-repeats", type=int, default=2, help="timed rollouts per batch size")
    r.add_argument("--growth-group", type=int, nargs="*", default=[2, 4, 8], help="G points")
    r.add_argument("--growth-steps", type=int, nargs="*", default=[3, 6, 12], help="T points")
    r.add_argument("--growth-turns", type=int, nargs="*", default=[1, 2, 3], help="K points")
    r.add_argument("--growth-repeats", type=int, default=2, help="timed iterations per growth point")
    r.add_argument(
        "--judge-delay", type=float, default=0.3, help="emulated judge latency (s) for the overlap test"
    )
    r.add_argument("--skip-compile", action="store_true", help="skip the torch.compile measurement")
    r.add_argument(
        "--no-naive-nft", dest="naive_nft", action="store_false", help="time only the naive GRPO loop"
    )
    r.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    r.add_argument("--model-root", default=None, help="where tiny models are built (default: a temp dir)")
    r.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one repeat, no compile")
    e = p.add_argument_group("editors (benchkit.sections.editors)")
    e.add_argument("--skip-editors", action="store_true", help="skip the editors section")
    e.add_argument(
        "--editors-only",
        action="store_true",
        help="run only the editors section; with --write, replace that section of the file (the rest is kept)",
    )
    e.add_argument("--editor-chains", type=int, default=1, help="B of the editor runs")
    e.add_argument("--editor-group", type=int, default=4, help="G of the editor runs")
    e.add_argument("--editor-turns", type=int, default=2, help="K of the editor runs")
    e.add_argument("--editor-steps", type=int, default=6, help="T of the editor runs")
    e.add_argument("--editor-repeats", type=int, default=2, help="timed iterations per editor and algorithm")
    o = p.add_argument_group("output")
    o.add_argument("--write", default=None, help="write the Markdown report here (e.g. BENCHMARKS.md)")
    o.add_argument("--json", default=None, help="write raw results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.chains, args.group, args.turns, args.steps, args.forward_batch = 1, 4, 2, 4, 4
        args.rounds, args.repeats, args.pass_repeats, args.naive_repeats, args.batching_repeats = (
            1,
            1,
            2,
            1,
            1,
        )
        args.nft_draws = [1, 2]
        args.growth_group, args.growth_steps, args.growth_turns = [2, 4], [], []
        args.growth_repeats, args.skip_compile, args.judge_delay = 1, True, 0.05
        args.editor_group, args.editor_steps, args.editor_repeats = 2, 2, 1
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    if args.editors_only:
        return editors_only(args, argv, started)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    spec = ModelSpec(
        num_layers=args.layers,
        num_single_layers=args.single_layers,
        attention_head_dim=args.head_dim,
        num_attention_heads=args.heads,
        text_width=args.text_width,
        resolution=args.resolution,
        max_sequence_length=args.text_tokens,
        lora_rank=args.lora_rank,
    )
    root = Path(args.model_root or tempfile.mkdtemp(prefix="mtflow-bench-models-"))
    log(f"building / loading the tiny model under {root}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_path = build_model(spec, root)
    policy = load_policy(model_path, spec)
    chains = bench_chains(4 * args.chains, args.turns, size=args.resolution)
    rollout = RolloutConfig(
        group_size=args.group, num_steps=args.steps, forward_batch_size=args.forward_batch
    )
    ctx = Context(args, spec, model_path, policy, chains, rollout)
    sections: list[Section] = []
    sections.append(loss_modes(ctx))
    main_overhead, detail = overhead(ctx)
    sections += [main_overhead, detail]
    sections.append(naive_comparison(ctx))
    opt = optimisations(ctx)
    fits, gc_row, compile_row = growth(ctx)
    opt.rows.append(gc_row)
    if compile_row:
        opt.rows.append(compile_row)
    else:
        opt.notes.append("`torch.compile` skipped (`--skip-compile`).")
    sections += [opt, fits]
    sections.insert(0, summary(ctx))
    sections += projection(ctx)
    if not args.skip_editors:  # fenced, so that --editors-only can replace it later
        sections.append(Fenced(editors_section(args)))
    sections.append(findings(ctx))
    elapsed = time.perf_counter() - started
    command = "python " + " ".join(
        shlex.quote(x) for x in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    )
    header = (
        "# mtflow benchmarks\n\n"
        "Produced by `tools/bench.py` in one run (all numbers below come from it):\n\n"
        f"    {command}\n\n"
        f"Machine: {os.cpu_count()} CPU cores shared with other jobs (load average {load_before:.1f} at start), "
        f"{args.threads} torch thread(s), torch {torch.__version__}, Python {platform.python_version()}; total "
        f"runtime {elapsed / 60:.1f} min. Tiny Kontext model (real diffusers / transformers classes): "
        f"{spec.num_layers} double + {spec.num_single_layers} single blocks, {spec.num_attention_heads} heads x "
        f"{spec.attention_head_dim}, text width {spec.text_width}, {spec.resolution} px "
        f"({(spec.resolution // 4) ** 2} target tokens + as many reference tokens + {spec.max_sequence_length} text "
        f"tokens), LoRA r = {spec.lora_rank}, float32, judge = `BrightnessScorer`. Wall times are medians; CPU "
        "ratios say where time goes, the GPU projection says what it costs at scale.\n"
    )
    report = header + "\n" + "\n".join(s.markdown() for s in sections)
    print(report)
    log(f"done in {elapsed / 60:.1f} min")
    if args.write:
        Path(args.write).write_text(report)
        log(f"wrote {args.write}")
    if args.json:
        Path(args.json).write_text(json.dumps(ctx.results, indent=1, default=str))
    return ctx.results


EDITORS_BEGIN, EDITORS_END = "<!-- editors: begin -->", "<!-- editors: end -->"


class Fenced:
    """Sections between the editors markers (a report's block that ``--editors-only`` rewrites)."""

    def __init__(self, sections: list[Section], intro: str = "") -> None:
        self.sections = sections
        self.intro = intro

    def markdown(self) -> str:
        body = "\n".join(s.markdown() for s in self.sections)
        return f"{EDITORS_BEGIN}\n{self.intro}{body}{EDITORS_END}\n"


def editors_only(args: argparse.Namespace, argv: list[str] | None, started: float) -> dict:
    """The editors section alone; ``--write`` puts it into an existing report in place of its previous version
    (before the findings when absent), keeping everything else, with the command that produced it."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    sections = editors_section(args)
    command = "python " + " ".join(
        shlex.quote(x) for x in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    )
    intro = (
        f"Produced by `{command}` (load average {load:.1f} at start, {args.threads} torch thread(s), "
        f"{(time.perf_counter() - started) / 60:.1f} min).\n\n"
    )
    fenced = Fenced(sections, intro).markdown()
    print(fenced)
    if args.write:
        path = Path(args.write)
        text = path.read_text() if path.exists() else ""
        if EDITORS_BEGIN in text and EDITORS_END in text:
            end = text.index(EDITORS_END) + len(EDITORS_END) + 1
            text = text[: text.index(EDITORS_BEGIN)] + fenced + text[end:]
        elif "\n## Findings" in text:
            at = text.index("\n## Findings") + 1
            text = text[:at] + fenced + "\n" + text[at:]
        else:
            text += "\n" + fenced
        path.write_text(text)
        log(f"wrote the editors section into {args.write}")
    return {}


if __name__ == "__main__":
    main()
