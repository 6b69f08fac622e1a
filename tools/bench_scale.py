"""Real scale on one node, measured where it can be: two gloo processes under FSDP2 on this CPU, and the paper
setting's plan at real size on the meta device.

1. Unsharded rollout (``model.rollout.unsharded``): all-gathers during the training rollouts and the rollout
   time, off vs on, per rank; the LoRA checkpoints and rollout images compared byte for byte.
2. Loading (``KontextPolicy.load_once``): the resident-set high-water mark each rank reaches while loading (above
   its RSS before loading), every rank reading the checkpoint vs rank 0 reading it and sending the weights, on a
   medium Kontext-architecture model (hidden 1024, 4 + 8 blocks, bf16) so weights dwarf the interpreter; results
   compared byte for byte.
3. ``mtflow check`` on the paper config for 8 x 80 GB (fits) and 8 x 24 GB (refused with exit 2), with generated
   manifests and ``--skip_judge`` (no judge here).

    python tools/bench_scale.py                # all three, markdown on stdout, JSON in /tmp/bench_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mtflow.testing.fixtures import tiny_fit_config, write_config, write_random_manifest

REPO = Path(__file__).resolve().parents[1]
STRATEGY = {
    "class_path": "mtflow.training.distributed.LoRAModelParallelStrategy",
    "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
}


def fit(root: Path, name: str, pretrained: Path, manifest: Path, model: dict, data: dict, dtype: str) -> dict:
    config = tiny_fit_config(pretrained, manifest, root, name=name, data=data, model=model)
    config["model"]["policy"]["init_args"]["dtype"] = dtype
    config["trainer"].update(
        {
            "devices": 2,
            "strategy": STRATEGY,
            "callbacks": [
                {
                    "class_path": "mtflow.testing.probes.WorkProbe",
                    "init_args": {"folder": str(root / f"p_{name}")},
                }
            ],
        }
    )
    path = write_config(config, root / f"{name}.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mtflow", "fit", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    run = root / name / "version_0"
    return {
        "wall_s": time.perf_counter() - started,
        "ranks": [json.loads((root / f"p_{name}" / f"rank{r}.json").read_text()) for r in (0, 1)],
        "lora": torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
            "state_dict"
        ],
        "images": [p.read_bytes() for p in sorted((run / "images").iterdir())],
    }


def same(a: dict, b: dict) -> bool:
    return a["images"] == b["images"] and all(torch.equal(v, b["lora"][k]) for k, v in a["lora"].items())


def unsharded_rollout(root: Path, tiny: Path, manifest: Path) -> tuple[str, dict]:
    model = {"max_iterations": 3, "rollout": {"group_size": 8, "num_steps": 12, "forward_batch_size": 8}}
    runs = {}
    for mode in ("off", "on"):
        runs[mode] = fit(
            root,
            f"unsharded_{mode}",
            tiny,
            manifest,
            {**model, "rollout": {**model["rollout"], "unsharded": mode}},
            {"batch_size": 1},
            "float32",
        )
    off, on = runs["off"]["ranks"][0], runs["on"]["ranks"][0]
    iterations = off["iterations"]
    lines = [
        "| rollout.unsharded | all-gathers per iteration in the rollout (rank 0 / rank 1) | all-gathers per "
        "iteration, whole iteration | rollout time per iteration (rank 0) |",
        "| --- | --- | --- | --- |",
    ]
    for mode in ("off", "on"):
        r0, r1 = runs[mode]["ranks"]
        lines.append(
            f"| {mode} | {r0['rollout_gathers'] / iterations:.0f} / {r1['rollout_gathers'] / iterations:.0f} | "
            f"{r0['gathers'] / iterations:.0f} | {r0['rollout_s'] / iterations:.3f} s |"
        )
    ratio = off["rollout_s"] / on["rollout_s"]
    lines.append("")
    lines.append(
        f"Rollout time ratio off / on: {ratio:.2f}x (rank 0, {iterations} iterations each, B = 1 chain per rank, G = 8, "
        f"K = 2, T = 12, forward batch 8, tiny Kontext, float32, gloo on 2 shared CPU cores). Outputs identical "
        f"(LoRA checkpoint and rollout images byte for byte): {same(runs['off'], runs['on'])}."
    )
    return "\n".join(lines), {m: r["ranks"] for m, r in runs.items()} | {"ratio": ratio}


def loading(root: Path, manifest: Path) -> tuple[str, dict]:
    from mtflow.testing.tiny_kontext import TinyKontextSpec, build_tiny_kontext

    spec = TinyKontextSpec(
        num_layers=4,
        num_single_layers=8,
        attention_head_dim=64,
        num_attention_heads=16,
        axes_dims_rope=(16, 24, 24),
        text_width=256,
        t5_layers=4,
    )
    medium = build_tiny_kontext(root / "medium-kontext", spec, seed=0)
    params = sum(f.stat().st_size for f in (medium / "transformer").glob("*.safetensors"))
    model = {"max_iterations": 1, "rollout": {"group_size": 2, "num_steps": 2, "forward_batch_size": 4}}
    runs = {}
    for name, once in (("every_rank", False), ("rank0", True)):
        runs[name] = fit(
            root,
            f"load_{name}",
            medium,
            manifest,
            {**model, "policy": {"init_args": {"load_once": once}}},
            {"batch_size": 1},
            "bfloat16",
        )
    lines = [
        "| loading | rank 0: peak RSS above its start | rank 1 | sum over ranks |",
        "| --- | --- | --- | --- |",
    ]
    peaks = {}
    for name, label in (
        ("every_rank", "every rank reads (load_once: false)"),
        ("rank0", "rank 0 reads and sends"),
    ):
        deltas = [(r["load_peak_rss"] - r["rss_before_load"]) / 2**20 for r in runs[name]["ranks"]]
        peaks[name] = deltas
        lines.append(f"| {label} | {deltas[0]:.0f} MiB | {deltas[1]:.0f} MiB | {sum(deltas):.0f} MiB |")
    lines.append("")
    lines.append(
        f"Medium Kontext-architecture model (real classes, hidden 1024, 4 + 8 blocks, text width 256; transformer "
        f"file {params / 2**20:.0f} MiB in float32, loaded in bfloat16). Rank 1's loading peak falls "
        f"{peaks['every_rank'][1] / peaks['rank0'][1]:.2f}x, the node's sum "
        f"{sum(peaks['every_rank']) / sum(peaks['rank0']):.2f}x. Outputs identical (LoRA checkpoint and rollout "
        f"images byte for byte): {same(runs['every_rank'], runs['rank0'])}. Text-encoder parameters among the "
        f"module's (training-device) parameters: "
        f"{[r['text_encoder_params_on_training_device'] for r in runs['rank0']['ranks']]}."
    )
    return "\n".join(lines), {"peaks_mib": peaks, "transformer_file_mib": params / 2**20}


def check_tables(root: Path, manifest: Path) -> tuple[str, dict]:
    out = {}
    sections = []
    for memory in (80, 24):
        plan = root / f"plan_{memory}.json"
        args = [
            sys.executable,
            "-m",
            "mtflow",
            "check",
            "--config",
            "configs/flux_kontext.yaml",
            "--config",
            "configs/flux_kontext_grpo.yaml",
            "--gpu_memory_gb",
            str(memory),
            "--skip_judge",
            "--output",
            str(plan),
            f"--data.init_args.train_manifest={manifest}",
            f"--data.init_args.val_manifest={manifest}",
        ]
        started = time.perf_counter()
        proc = subprocess.run(
            args, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        out[memory] = {"exit": proc.returncode, "seconds": time.perf_counter() - started}
        sections.append(
            f"`mtflow check ... --gpu_memory_gb {memory}`: exit {proc.returncode} in "
            f"{out[memory]['seconds']:.0f} s\n\n```\n{proc.stdout.strip()}\n```"
        )
    return "\n\n".join(sections), out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=["unsharded", "loading", "check"], action="append")
    parser.add_argument("--json", default="/tmp/bench_scale.json")
    args = parser.parse_args(argv)
    only = set(args.only or ["unsharded", "loading", "check"])
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        manifest = write_random_manifest(root / "data", num_chains=8, num_turns=2)
        if "unsharded" in only:
            from mtflow.testing.tiny_kontext import build_tiny_kontext

            tiny = build_tiny_kontext(root / "tiny-kontext", seed=0)
            text, results["unsharded"] = unsharded_rollout(root, tiny, manifest)
            print("## Unsharded rollout\n\n" + text + "\n", flush=True)
        if "loading" in only:
            text, results["loading"] = loading(root, manifest)
            print("## Loading\n\n" + text + "\n", flush=True)
        if "check" in only:
            paper = write_random_manifest(root / "paper", num_chains=8, num_turns=3, size=64)
            text, results["check"] = check_tables(root, paper)
            print("## mtflow check\n\n" + text + "\n", flush=True)
    Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
