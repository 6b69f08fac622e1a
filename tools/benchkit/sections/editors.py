"""The editors side by side: one RL iteration of each tiny editor (FLUX.1-Kontext, Qwen-Image-Edit, FLUX.2-klein)
through ``FlowRLModule`` at the same sizes and token count, its network calls checked against
``benchkit.editors.editor_passes``, and the projected cost of a paper-setting iteration of each at real size."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from benchkit.editors import (
    EDITORS,
    EditorProfile,
    TinyEditors,
    build_editor,
    counted_transformer_flops,
    counted_vae_flops,
    editor_passes,
    editor_projection,
    load_editor,
    paper_editor_setting,
)
from benchkit.harness import WORDS, run_iterations
from benchkit.passes import IterationShape, expected_calls
from benchkit.projection import Hardware
from benchkit.report import Section, fmt_s, fmt_tflop, fmt_x, log
from mtflow.algorithms import GRPO, NFT
from mtflow.data.records import EditChain
from mtflow.rollout import RolloutConfig

TITLES = {"kontext": "FLUX.1-Kontext", "qwen_image_edit": "Qwen-Image-Edit", "flux2_klein": "FLUX.2-klein"}
SECTION_TITLE = "Editors: one iteration of each backbone"


def _chains(num: int, turns: int, side: int, seed: int = 0) -> list[EditChain]:
    """Square sources of ``side`` pixels, every instruction distinct (as ``harness.bench_chains``)."""
    rng = np.random.default_rng(seed)
    return [
        EditChain(
            f"chain{b:04d}",
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)),
            [
                " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), 4)) + f" {b} {k}"
                for k in range(turns)
            ],
        )
        for b in range(num)
    ]


def editors_section(args: argparse.Namespace) -> list[Section]:
    """Measure (``args``: ``editor_chains``, ``editor_group``, ``editor_turns``, ``editor_steps``,
    ``editor_repeats``, ``model_root``) and project; returns the tiny-size and the real-size tables."""
    tiny = TinyEditors()
    b, g, k, t = args.editor_chains, args.editor_group, args.editor_turns, args.editor_steps
    rollout = RolloutConfig(group_size=g, num_steps=t, forward_batch_size=max(1, b * g // 2))
    root = Path(args.model_root or tempfile.mkdtemp(prefix="mtflow-bench-editors-"))
    measured: dict[str, dict[str, object]] = {}
    for editor in EDITORS:
        log(f"editors: {editor} at {tiny.resolution(editor)} px")
        policy = load_editor(editor, build_editor(editor, root), tiny.resolution(editor))
        profile = EditorProfile.of(policy)
        chains = _chains(4 * b, k, tiny.resolution(editor))
        row: dict[str, object] = {"profile": profile}
        for name, algorithm in (("grpo", GRPO()), ("nft", NFT(train_timesteps=1))):
            module = {"algorithm": algorithm, "rollout": rollout}
            run = run_iterations(
                policy, chains, b, module, iterations=args.editor_repeats, warmup=1, count=True
            )
            shape = IterationShape.of(algorithm, rollout, b, k)
            expected = expected_calls(editor_passes(shape, profile), algorithm.sampling_adapter)
            row[name] = run
            row[f"{name}_calls_ok"] = run.calls == expected
            row[f"{name}_transformer_calls"] = sum(
                n for key, hist in run.calls.items() if key.startswith("transformer/") for n in hist.values()
            )
            row["text_calls"] = sum(run.calls.get("text_encode", {}).values())
        measured[editor] = row
        del policy
    n = b * g
    base = measured["kontext"]["grpo"].iteration_s
    tiny_table = Section(
        f"{SECTION_TITLE} (tiny, CPU)",
        f"Each editor's tiny real-class model at {tiny.tokens_side}^2 = {tiny.tokens_side**2} target tokens (+ as "
        f"many reference tokens), 1 double + 1 single block (Qwen-Image: 1 block) of 2 heads x 16, LoRA r = 4, "
        f"float32; B = {b}, G = {g}, K = {k}, T = {t}, forward batch {rollout.forward_batch_size}; "
        f"{args.editor_repeats} timed iterations after one warm-up, medians; judge = `BrightnessScorer`. "
        "Qwen-Image-Edit and FLUX.2-klein sample with classifier-free guidance (two transformer calls per velocity, in "
        "the rollout and in every loss pass); Qwen-Image-Edit's Qwen2.5-VL runs once per turn on that turn's "
        "images (instructions and negatives: two calls per turn).",
        [
            "editor",
            "GRPO s / iteration",
            "vs Kontext",
            "NFT (D = 1) s / iteration",
            "s / trajectory (GRPO)",
            "transformer calls (GRPO / NFT)",
            "text-encoder calls",
            "calls = pass model",
        ],
    )
    for editor in EDITORS:
        row = measured[editor]
        grpo, nft = row["grpo"], row["nft"]
        tiny_table.rows.append(
            [
                TITLES[editor],
                fmt_s(grpo.iteration_s),
                fmt_x(grpo.iteration_s / base),
                fmt_s(nft.iteration_s),
                fmt_s(grpo.iteration_s / n),
                f"{row['grpo_transformer_calls']} / {row['nft_transformer_calls']}",
                str(row["text_calls"]),
                "yes" if row["grpo_calls_ok"] and row["nft_calls_ok"] else "NO",
            ]
        )
    tiny_table.notes.append(
        "The pixel sizes differ for the same tokens (Kontext's tiny VAE downsamples 2x, the others 16x): the VAE "
        "passes of Qwen-Image-Edit (a 3-D causal VAE) and FLUX.2-klein run on 64x more pixels, so these CPU times "
        "are about the loop and its calls, not about the real models' relative cost (the next table)."
    )

    log("editors: FLOPs of the real-size transformers and VAEs on the meta device")
    hardware = Hardware()
    projection = Section(
        f"{SECTION_TITLE} (paper setting, projected on {hardware.name})",
        "One iteration per GPU at the paper setting (B = 1, G = 16, K = 3, T = 12, 512 px: 1024 target + 1024 "
        "reference tokens, LoRA r = 32), transformer forward and forward + backward FLOPs counted by "
        "`FlopCounterMode` on the real diffusers classes on the meta device (FLUX.1-Kontext-dev 12 B, Qwen-Image's "
        "20 B transformer, FLUX.2-klein-base-9B's 9 B), sustained at "
        f"{hardware.utilization:.0%} of {hardware.peak_flops / 1e12:.0f} TFLOP/s; text encoders (T5-XXL, "
        "Qwen2.5-VL-7B per (instruction, image) row and per negative row, Qwen3-8B), VAEs (counted on the real "
        "classes) and the Qwen3-VL-8B judge as in the GPU projection above. Guided editors pay two transformer "
        "calls per velocity in the rollout and in every loss pass.",
        [
            "editor",
            "transformer fwd TFLOP / sample",
            "calls per velocity",
            "GRPO TFLOP / GPU",
            "GRPO s / iteration",
            "NFT (D = 1) TFLOP / GPU",
            "NFT s / iteration",
            "text encoding s (share, GRPO)",
        ],
    )
    setting = paper_editor_setting(nft_draws=1)
    for editor in EDITORS:
        transformer = counted_transformer_flops(editor, setting)
        if editor == "kontext":
            vae = (setting.paper.vae_encode_flops, setting.paper.vae_decode_flops)
        else:
            vae = counted_vae_flops(editor, setting.paper.image_side)
        guided = editor != "kontext"  # the paper configs: Qwen true CFG 4, FLUX.2-klein-base guidance 4
        grpo = editor_projection(editor, "grpo", setting, hardware, transformer, vae, guided)
        nft = editor_projection(editor, "nft", setting, hardware, transformer, vae, guided)
        projection.rows.append(
            [
                TITLES[editor],
                fmt_tflop(transformer[0]),
                "2" if guided else "1",
                fmt_tflop(sum(grpo.flops.values())),
                fmt_s(grpo.total_seconds),
                fmt_tflop(sum(nft.flops.values())),
                fmt_s(nft.total_seconds),
                f"{fmt_s(grpo.seconds['text'])} ({grpo.seconds['text'] / grpo.total_seconds:.1%})",
            ]
        )
    projection.notes += [
        "FLUX.1-Kontext's row counts the trained pass with `FlopCounterMode` (forward + backward) where the GPU "
        "projection above uses its analytic backward model; the two agree to about 0.1%.",
        "Qwen-Image-Edit's text rows: the VL image at 384 x 384 pixels (the 2509 / Plus pipeline; 196 merged image "
        "tokens) plus ~35 prompt tokens, one row per chain in turn 1 and per trajectory after it, for the "
        "instruction and for the negative prompt; the VL tower is counted with full attention (an upper bound).",
        "FLUX.2-klein-base-9B's transformer sizes are InvokeAI's FLUX.2-klein 9B preset (no model hub here); the "
        "distilled FLUX.2-klein models sample without guidance (one call per velocity).",
        "Memory (not in this table): a guided editor keeps two transformer activations per sample alive in its "
        "training passes, Qwen-Image-Edit's rollout stores (B + N (K - 1)) x 2 text rows of ~300 x 3584 values, and "
        "its VL encoder (7 B) stays resident next to the transformer.",
    ]
    return [tiny_table, projection]
