"""``mtflow check --config ...`` (also ``mtflow fit ... --dry_run``): everything a run needs, checked before any
weight is loaded, then its per-GPU memory plan and per-iteration time plan.

Checks: every configured class instantiates (nothing loaded), the manifests validate (every line; images decoded
in a thread pool), the judge answers end to end (reward service ``/health``, vLLM's ``/v1/models`` lists the
model, one scored probe item), the visible devices match ``trainer.devices x trainer.num_nodes``. A failed check is
one line naming the config key or file. Exit status: 0 all good, 1 a check failed, 2 the plan does not fit
``--gpu_memory_gb`` (the largest item is named).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mtflow.plan.plan import GiB, MemoryPlan, TimePlan, plan_memory, plan_time
from mtflow.reward.base import ScoreBatch, ScoringItem

EXIT_OK, EXIT_FAILED, EXIT_DOES_NOT_FIT = 0, 1, 2


class NotBuiltScorer:
    """Stands in for the configured judge under ``--skip_judge`` (the judge is then never constructed)."""

    def score(self, items: Sequence[ScoringItem]) -> ScoreBatch:
        raise RuntimeError("mtflow check --skip_judge does not build the judge")


@dataclass
class Check:
    name: str
    status: str  # "ok", "FAIL", "skipped", "note"
    detail: str


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtflow check",
        description=__doc__.split("\n\n")[0],
        epilog="Any other argument is passed to the config resolution of `mtflow fit` (e.g. "
        "--model.rollout.group_size=8).",
    )
    parser.add_argument("--config", action="append", default=[], help="config file (stack several)")
    parser.add_argument(
        "--gpu_memory_gb",
        type=float,
        default=None,
        help="GPU memory in GiB (default: the visible GPU's, else 80)",
    )
    parser.add_argument(
        "--headroom_gb",
        type=float,
        default=2.0,
        help="kept free for the CUDA context and allocator fragmentation (GiB)",
    )
    parser.add_argument("--skip_judge", action="store_true", help="do not build or call the judge")
    parser.add_argument("--output", default="mtflow_plan.json", help="where to write the plan as JSON")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100 SXM)")
    parser.add_argument("--utilization", type=float, default=0.4, help="sustained fraction of the peak")
    return parser


def _instantiate(config: dict[str, Any]):
    """Model, data and callbacks of the config, with the judge left out (built by ``_build_scorer``)."""
    from mtflow.cli import _fit_config_parser

    config = dict(config, model=dict(config["model"], scorer={"class_path": f"{__name__}.NotBuiltScorer"}))
    parser = _fit_config_parser()._subcommand_parsers["fit"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return parser.instantiate_classes(parser.parse_object(config))


def _build_scorer(scorer_config: dict[str, Any]):
    from jsonargparse import ArgumentParser

    from mtflow.reward.base import Scorer

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--scorer", type=Scorer)
    return parser.instantiate_classes(parser.parse_object({"scorer": scorer_config})).scorer


def check_manifests(data, num_threads: int = 8) -> list[Check]:
    """Every line of every configured manifest, and every kept image decoded (in a thread pool)."""
    from mtflow.data.manifest import check_image, load_manifest

    checks = []
    for key in ("train_manifest", "val_manifest", "test_manifest"):
        path = getattr(data, key, None)
        if path is None:
            continue
        name = f"data.init_args.{key}"
        split = {
            "train_manifest": getattr(data, "train_split", None),
            "val_manifest": getattr(data, "val_split", None),
        }
        try:
            entries = load_manifest(path, data.num_turns, split=split.get(key), check_images=False)
        except (OSError, ValueError) as error:
            first = str(error).splitlines()
            more = f" (+{len(first) - 2} more)" if len(first) > 2 else ""
            checks.append(
                Check(name, "FAIL", f"{path}: {' '.join(first[-1:] if len(first) > 1 else first)}{more}")
            )
            continue
        max_pixels = getattr(data, "max_pixels", None)
        with ThreadPoolExecutor(num_threads) as pool:
            problems = [
                (entry.line, problem)
                for entry, problem in zip(
                    entries,
                    pool.map(check_image, [e.image_path for e in entries], [max_pixels] * len(entries)),
                )
                if problem
            ]
        if problems:
            line, problem = problems[0]
            checks.append(Check(name, "FAIL", f"{path}:{line}: {problem} ({len(problems)} bad image(s))"))
        else:
            checks.append(Check(name, "ok", f"{path}: {len(entries)} chains, every image decoded"))
    return checks


def probe_chain(data, num_turns: int):
    """The first held-out (else training) chain of the data module, or None when it has none readable."""
    try:
        data.setup("fit")
        sources = getattr(data, "sources", {}) or {}
        source = sources.get("val") or sources.get("train")
        return source[0] if source is not None and len(source) else None
    except Exception:  # noqa: BLE001 - the manifest checks already reported why
        return None


def check_judge(scorer, num_turns: int, chain=None, timeout_s: float = 10.0) -> list[Check]:
    """The reward service's /health, vLLM's model list, and one scored probe item: ``chain`` (its source as every
    turn's output, its metadata for judges that read ground truth), or a grey image made red."""
    import httpx
    from PIL import Image

    key = "model.scorer"
    checks = []
    health = getattr(scorer, "health", None)
    if callable(health):
        try:
            info = health(timeout_s=timeout_s)
        except Exception as error:  # noqa: BLE001 - unreachable in any way is one line
            return [
                Check(
                    "judge",
                    "FAIL",
                    f"unreachable ({key}.init_args.url): {_one_line(error)}; --skip_judge skips this check",
                )
            ]
        checks.append(
            Check("judge /health", "ok", f"{scorer.url}: {info.get('status')}, model {info.get('model')}")
        )
        backend = (info.get("scorer") or {}).get("backend")
        base_url = (
            backend.get("base_url")
            if isinstance(backend, dict)
            else (info.get("scorer") or {}).get("base_url")
        )
        model = info.get("model") or (backend.get("model") if isinstance(backend, dict) else None)
        if base_url:
            try:
                listed = httpx.get(f"{base_url.rstrip('/')}/models", timeout=timeout_s).json()
                names = [m.get("id") for m in listed.get("data", [])]
                ok = model in names
                checks.append(
                    Check(
                        "judge vLLM /v1/models",
                        "ok" if ok else "FAIL",
                        f"{base_url}: serves {names}" + ("" if ok else f", not {model!r}"),
                    )
                )
            except Exception as error:  # noqa: BLE001
                checks.append(
                    Check("judge vLLM /v1/models", "FAIL", f"{base_url}/models: {_one_line(error)}")
                )
    if chain is not None:
        probe = ScoringItem(
            item_id=f"{chain.chain_id}/g0",
            chain_id=chain.chain_id,
            source=chain.source,
            outputs=[chain.source] * chain.num_turns,
            instructions=list(chain.instructions),
            metadata=chain.metadata,
        )
    else:
        probe = ScoringItem(
            item_id="mtflow-check/g0",
            chain_id="mtflow-check",
            source=Image.new("RGB", (64, 64), (128, 128, 128)),
            outputs=[Image.new("RGB", (64, 64), (200, 60, 60)) for _ in range(num_turns)],
            instructions=["Make the image red"] * num_turns,
        )
    try:
        started = time.perf_counter()
        scores = scorer.score([probe])
        scored = bool(scores.scored.all())
        checks.append(
            Check(
                "judge probe item",
                "ok" if scored else "FAIL",
                f"IF {scores.instruction_following.tolist()[0]}, CC {scores.content_consistency.tolist()[0]} "
                f"in {time.perf_counter() - started:.1f} s" + ("" if scored else ": not scored"),
            )
        )
    except Exception as error:  # noqa: BLE001
        checks.append(
            Check("judge probe item", "FAIL", f"{key}: {_one_line(error)}; --skip_judge skips this check")
        )
    return checks


def _world(trainer) -> tuple[int, int]:
    devices, nodes = trainer.get("devices", 1), int(trainer.get("num_nodes", 1) or 1)
    if isinstance(devices, (list, tuple)):
        per_node = len(devices)
    elif devices in (None, "auto", -1):
        per_node = 1
    else:
        per_node = int(devices)
    return per_node, nodes


def check_devices(trainer) -> Check:
    import torch

    per_node, nodes = _world(trainer)
    accelerator = str(trainer.get("accelerator", "auto"))
    visible = torch.cuda.device_count()
    wanted = f"trainer.devices x trainer.num_nodes = {per_node} x {nodes}"
    if accelerator in ("gpu", "cuda") and visible == 0:
        return Check("devices", "note", f"no GPU visible here; planned for {wanted}")
    if accelerator in ("gpu", "cuda", "auto") and 0 < visible < per_node:
        return Check("devices", "FAIL", f"{visible} GPU(s) visible, {wanted} asks for {per_node} per node")
    return Check("devices", "ok", f"{visible} GPU(s) visible, {wanted}")


def render(checks: list[Check], memory: MemoryPlan | None, timing: TimePlan | None, budget: float) -> str:
    lines = ["checks:"]
    lines += [f"  [{c.status:>7}] {c.name}: {c.detail}" for c in checks]
    if memory is not None:
        phases = list(memory.peaks)
        lines += ["", f"memory per GPU (busiest rank of {memory.world_size}; GiB; budget {budget:.1f}):", ""]
        lines.append("| item | " + " | ".join(phases) + " | note |")
        lines.append("| --- | " + " | ".join("---" for _ in phases) + " | --- |")
        for item in memory.items:
            cells = [f"{item.bytes / GiB:.2f}" if ph in item.phases else "" for ph in phases]
            lines.append(f"| {item.name} | " + " | ".join(cells) + f" | {item.note} |")
        lines.append(
            "| **peak** | " + " | ".join(f"**{memory.peaks[ph] / GiB:.2f}**" for ph in phases) + " | |"
        )
        lines.append("")
        lines.append(
            "activation estimates (forward_batch_size samples): "
            + ", ".join(f"{name} {value / GiB:.2f} GiB" for name, value in memory.activations.items())
        )
        lines.append(f"unsharded rollout: {'on' if memory.unsharded_rollout else 'off'}")
    if timing is not None:
        hw = timing.hardware
        lines += [
            "",
            f"time per iteration per GPU ({hw['utilization']:.0%} of {hw['peak_flops'] / 1e12:.0f} TFLOP/s):",
        ]
        lines.append("| phase | TFLOP | seconds |")
        lines.append("| --- | --- | --- |")
        for phase, flops in timing.flops.items():
            lines.append(f"| {phase} | {flops / 1e12:,.1f} | {timing.seconds[phase]:.1f} |")
        lines.append(
            f"| **total** | {sum(timing.flops.values()) / 1e12:,.1f} | **{timing.total_seconds:.0f}** |"
        )
        lines.append(
            f"judge per iteration: {timing.judge_requests} requests, {timing.judge_prefill_tokens:,} prefill tokens, "
            f"{timing.judge_output_tokens:,} generated tokens"
        )
    return "\n".join(lines)


def _num_turns(data) -> int:
    """K of the data module (a world's own K when the module leaves it to the world, as the toy world does)."""
    turns = getattr(data, "num_turns", None)
    if turns is None:
        world = getattr(data, "world", None)
        turns = getattr(world, "num_turns", None) or 3
    return int(turns)


def run_check(args: Sequence[str]) -> int:
    """``mtflow check``; returns the exit status."""
    import torch

    from mtflow.cli import resolve_fit_config

    options, rest = build_parser().parse_known_args(list(args))
    fit_args = [a for config in options.config for a in ("--config", config)] + rest
    checks: list[Check] = []
    started = time.perf_counter()
    try:
        config = resolve_fit_config(fit_args)
    except (ValueError, OSError) as error:
        print(f"[   FAIL] config: {_one_line(error)}")
        return EXIT_FAILED
    try:
        init = _instantiate(config)
        checks.append(Check("classes", "ok", "model, data and callbacks instantiate (no weights read)"))
    except Exception as error:  # noqa: BLE001 - any constructor's complaint is the check's result
        print(render([Check("classes", "FAIL", _one_line(error))], None, None, 0))
        return EXIT_FAILED
    module, data = init.model, init.data
    checks += check_manifests(data)
    if options.skip_judge:
        checks.append(Check("judge", "skipped", "--skip_judge: not built, not called"))
    else:
        try:
            scorer = _build_scorer(config["model"]["scorer"])
        except Exception as error:  # noqa: BLE001
            checks.append(
                Check("judge", "FAIL", f"model.scorer: {_one_line(error)}; --skip_judge skips this check")
            )
        else:
            checks += check_judge(scorer, _num_turns(data), probe_chain(data, _num_turns(data)))
    trainer = config.get("trainer", {})
    checks.append(check_devices(trainer))
    per_node, nodes = _world(trainer)
    world = per_node * nodes
    if options.gpu_memory_gb is None:
        visible = (
            torch.cuda.get_device_properties(0).total_memory / GiB if torch.cuda.is_available() else 80.0
        )
    else:
        visible = options.gpu_memory_gb
    budget = visible - options.headroom_gb
    chains = int(getattr(data, "batch_size", 1))
    turns = _num_turns(data)
    memory = timing = None
    try:
        memory = plan_memory(
            module,
            chains,
            turns,
            world,
            budget_bytes=int(budget * GiB),
            unsharded_rollout=getattr(module.rollout_config, "unsharded", "auto"),
            text_encoders=getattr(module.policy, "text_encoders", "resident"),
        )
        timing = plan_time(
            module, chains, turns, world, peak_tflops=options.peak_tflops, utilization=options.utilization
        )
    except (ValueError, FileNotFoundError) as error:
        checks.append(Check("plan", "FAIL", _one_line(error)))
    print(render(checks, memory, timing, budget))
    status = EXIT_FAILED if any(c.status == "FAIL" for c in checks) else EXIT_OK
    verdict = ""
    if memory is not None:
        fits = memory.peak <= budget * GiB
        largest = memory.largest_items()[0]
        verdict = (
            f"fits: peak {memory.peak / GiB:.1f} GiB ({memory.peak_phase}) of {budget:.1f} GiB usable per GPU"
            if fits
            else f"does NOT fit: peak {memory.peak / GiB:.1f} GiB ({memory.peak_phase}) > {budget:.1f} GiB usable "
            f"per GPU; largest item: {largest.name} ({largest.bytes / GiB:.1f} GiB, {largest.note})"
        )
        if not fits:
            status = EXIT_DOES_NOT_FIT
        print("\n" + verdict)
    Path(options.output).write_text(
        json.dumps(
            {
                "checks": [asdict(c) for c in checks],
                "world_size": world,
                "gpu_memory_gb": visible,
                "budget_gb": budget,
                "memory": None
                if memory is None
                else {
                    "items": [asdict(i) for i in memory.items],
                    "peaks": memory.peaks,
                    "peak": memory.peak,
                    "unsharded_rollout": memory.unsharded_rollout,
                    "per_rank_base": memory.per_rank_base,
                    "activations": memory.activations,
                },
                "time": None if timing is None else asdict(timing) | {"total_seconds": timing.total_seconds},
                "verdict": verdict,
                "exit_status": status,
            },
            indent=2,
        )
    )
    print(f"plan written to {options.output} ({time.perf_counter() - started:.0f} s)")
    return status


def main(args: Sequence[str] | None = None) -> None:
    code = run_check(sys.argv[1:] if args is None else args)
    if code:
        raise SystemExit(code)
