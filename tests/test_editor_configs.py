"""The paper-style configs of the new editors resolve through ``mtflow fit``'s own parser (base + algorithm
overlay, as configs/flux_kontext*.yaml) and carry the paper settings with each editor's policy."""

from __future__ import annotations

import pytest

from mtflow.testing.fixtures import printed_fit_config

EDITORS = {
    "qwen_image_edit": (
        "mtflow.models.qwen_image_edit.QwenImageEditPolicy",
        {"pretrained": "Qwen/Qwen-Image-Edit-2509", "true_cfg_scale": 4.0, "negative_prompt": " "},
    ),
    "flux2_klein": (
        "mtflow.models.flux2_klein.Flux2KleinPolicy",
        {"pretrained": "black-forest-labs/FLUX.2-klein-base-9B", "guidance_scale": 4.0},
    ),
}


@pytest.mark.parametrize("editor", sorted(EDITORS))
@pytest.mark.parametrize("algorithm", ["GRPO", "NFT"])
def test_paper_configs_of_the_editors_print_the_paper_values(capsys, editor, algorithm):
    printed = printed_fit_config(capsys, f"{editor}.yaml", f"{editor}_{algorithm.lower()}.yaml")
    model = printed["model"]
    class_path, policy_values = EDITORS[editor]
    policy = model["policy"]
    assert policy["class_path"] == class_path
    args = policy["init_args"]
    assert {key: args[key] for key in policy_values} == policy_values
    assert (args["resolution"], args["lora_rank"], args["lora_alpha"], args["dtype"]) == (
        512,
        32,
        32,
        "bfloat16",
    )
    rollout, advantage = model["rollout"], model["advantage"]
    assert (rollout["group_size"], rollout["num_steps"], advantage["lambda_cc"]) == (16, 12, 0.3)
    assert (advantage["fusion"], advantage["broadcast"]) == ("advantage", "trajectory")
    assert model["optim"]["lr"] == 3e-4 and printed["data"]["init_args"]["num_turns"] == 3
    assert model["algorithm"]["class_path"] == f"mtflow.algorithms.{algorithm}"
    assert printed["trainer"]["logger"]["init_args"]["name"] == f"{editor}_{algorithm.lower()}"
    if algorithm == "GRPO":
        assert model["algorithm"]["init_args"]["noise_level"] == 0.9 and model["ema_decay"] is None
    else:
        assert model["ema_decay"] == 0.9 and "clip_eps" not in model["algorithm"]["init_args"]


@pytest.mark.parametrize("editor", sorted(EDITORS))
def test_the_tiny_editor_configs_resolve(capsys, editor):
    for algorithm in ("grpo", "nft"):
        printed = printed_fit_config(capsys, f"tiny/{editor}_{algorithm}.yaml")
        assert printed["model"]["policy"]["class_path"] == EDITORS[editor][0]
        assert (
            printed["model"]["policy"]["init_args"]["lora_alpha"] == 8
        )  # != rank 4: export carries the scale
