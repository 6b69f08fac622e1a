"""The new editors through the same CLI as Kontext: a short GRPO and NFT ``mtflow fit`` on each tiny editor
(configs/tiny/), and ``mtflow export`` of the trained adapter (alpha != rank) loaded into each stock pipeline
reproducing mtflow's adapted rollout at noise 0."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from mtflow.cli import main
from mtflow.data.records import EditChain
from mtflow.rollout import RolloutConfig, rollout
from mtflow.testing.fixtures import INSTRUCTIONS, tiny_fit_config, write_config

EDITORS = ("qwen_image_edit", "flux2_klein")
POLICIES = {"qwen_image_edit": "QwenImageEditPolicy", "flux2_klein": "Flux2KleinPolicy"}


def _image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Four 96 x 64 chains (one bucket per editor: 64 x 64 for Qwen at a 64^2 area, 64 x 32 for FLUX.2)."""
    folder = tmp_path_factory.mktemp("data")
    lines = []
    for i in range(4):
        _image(96, 64, i).save(folder / f"{i}.png")
        instructions = [INSTRUCTIONS[(i + k) % len(INSTRUCTIONS)] for k in range(2)]
        lines.append(json.dumps({"id": f"chain{i}", "image": f"{i}.png", "instructions": instructions}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "manifest.jsonl"


def _fit(request, editor: str, algorithm: str, manifest, root, **model):
    path = request.getfixturevalue(f"tiny_{editor}_path")
    name = f"{editor}_{algorithm}"
    config = tiny_fit_config(path, manifest, root, name=name, base=f"tiny/{name}.yaml", model=model or None)
    config_path = write_config(config, root / f"{name}.yaml")
    return main(["fit", "--config", str(config_path)]), config_path, root / name / "version_0"


@pytest.fixture(scope="module", params=EDITORS)
def grpo_run(request, manifest, tmp_path_factory):
    """One GRPO fit per editor (shared by the fit and the export test)."""
    root = tmp_path_factory.mktemp(f"{request.param}_grpo")
    return request.param, *_fit(request, request.param, "grpo", manifest, root, optim={"lr": 0.05})


def _check_fit(cli, run, editor: str, adapters: list[str]) -> None:
    policy = cli.model.policy
    assert type(policy).__name__ == POLICIES[editor]
    assert cli.model.iteration == 2
    assert any(
        float(p.detach().abs().max()) > 0 for n, p in policy.adapter_named_parameters() if "lora_B" in n
    )
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".default." in n for n in trainable)
    with open(run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and {"reward/if_turn1", "reward/if_turn2", "perf/rollout_s", "adv/std"} <= set(
        rows[0]
    )
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["mtflow"]["adapters"] == adapters and checkpoint["mtflow"]["lora"]["alpha"] == 8.0


def test_a_short_grpo_fit_runs_through_the_same_cli(grpo_run):
    editor, (cli, _, run) = grpo_run[0], grpo_run[1:]
    _check_fit(cli, run, editor, ["default"])


@pytest.mark.parametrize("editor", EDITORS)
def test_a_short_nft_fit_runs_through_the_same_cli(request, editor, manifest, tmp_path):
    cli, _, run = _fit(request, editor, "nft", manifest, tmp_path)
    _check_fit(cli, run, editor, ["default", "old", "ema"])


def test_the_exported_lora_in_the_stock_pipeline_reproduces_the_adapted_rollout(
    grpo_run, tmp_path, monkeypatch
):
    editor, (cli, config_path, run) = grpo_run[0], grpo_run[1:]
    main(
        [
            "export",
            "--config",
            str(config_path),
            "--ckpt_path",
            str(run / "checkpoints" / "last.ckpt"),
            "--output_dir",
            str(tmp_path / "lora"),
        ]
    )
    lora_file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    tensors = load_file(lora_file)
    assert all(k.startswith("diffusion_model.") for k in tensors)  # ComfyUI's key convention of both models
    policy = cli.model.policy
    pipe = DiffusionPipeline.from_pretrained(policy.pretrained, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if editor == "qwen_image_edit":
        alphas = [k for k in tensors if k.endswith(".alpha")]
        assert alphas and all(float(tensors[k]) == 8.0 for k in alphas)  # alpha 8 != rank 4
        import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus_module

        original = plus_module.calculate_dimensions  # the pipeline's sizing at the policy's 64^2 area
        monkeypatch.setattr(
            plus_module,
            "calculate_dimensions",
            lambda area, ratio: original(64 * 64 if area == 1024 * 1024 else area, ratio),
        )
        source = _image(96, 64, 9)
        call = dict(negative_prompt=" ", true_cfg_scale=4.0)
    else:
        assert not any(k.endswith(".alpha") for k in tensors)  # alpha / r folded into B
        assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in tensors
        source = _image(
            64, 64, 9
        )  # the policy's 64^2 area: kept as is, as the pipeline keeps it (its minimum side)
        call = dict(guidance_scale=4.0, max_sequence_length=32, text_encoder_out_layers=(1, 2))
    policy.eval()
    ours = rollout(
        policy,
        [EditChain("c", source, INSTRUCTIONS[:1])],
        RolloutConfig(group_size=1, num_steps=3),
        torch.Generator().manual_seed(0),
    )

    def stock(kind: str) -> torch.Tensor:
        return pipe(
            image=source,
            prompt=INSTRUCTIONS[0],
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(0),
            output_type=kind,
            **call,
        ).images

    ours_latents = ours.final_latents[:, 0]
    if editor == "flux2_klein":  # the pipeline returns unpatchified, de-normalised latents
        h, w = policy._latent_grid(ours.image_size)
        z = ours_latents.transpose(1, 2).reshape(1, -1, h, w)
        bn = policy.vae.bn
        z = z * torch.sqrt(
            bn.running_var.view(1, -1, 1, 1) + policy.vae.config.batch_norm_eps
        ) + bn.running_mean.view(1, -1, 1, 1)
        ours_latents = policy._pipeline._unpatchify_latents(z)
    pipe.load_lora_weights(str(lora_file))
    adapted = stock("latent")
    torch.testing.assert_close(ours_latents, adapted, atol=1e-5, rtol=0)
    pixels = (stock("pt") * 255).round()
    assert pixels.shape[-2:] == ours.images.shape[-2:]
    assert (ours.images[:, 0].float() - pixels).abs().max() <= 1  # within one grey level
    pipe.unload_lora_weights()
    # the LoRA moves the latents by far more than the tolerance, so a wrong alpha / r scale could not pass
    assert (stock("latent") - adapted).abs().max() > 1e-2
