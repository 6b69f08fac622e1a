"""``mtflow edit``: the chain equals the rollout at noise level 0 with the evaluation's noise; with an exported LoRA
it equals the checkpoint's evaluation; ``--decompose`` parses a VLM's split (scripted answers and the tiny random
Qwen3-VL through the loopback OpenAI-protocol server) and refuses an unusable one without inventing a split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtflow.cli import main
from mtflow.data.records import EditChain
from mtflow.eval.evaluate import eval_generator, rollout_and_score
from mtflow.rollout import RolloutConfig, rollout
from mtflow.testing.canned_vlm import CannedAnswers, create_canned_openai_app, image_key
from mtflow.testing.fixtures import tiny_fit_config, write_config, write_random_manifest

INSTRUCTIONS = ["make it red", "add a circle"]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("edit") / "cat.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


def _turns(out: Path, num_turns: int) -> np.ndarray:
    return np.stack([np.asarray(Image.open(out / f"turn_{k}.png")) for k in range(1, num_turns + 1)])


def _uint8(result) -> np.ndarray:
    return result.images[0].permute(0, 2, 3, 1).numpy()  # [K, H, W, 3]


def _edit(*args: str) -> None:
    main(["edit", *args])


def test_edit_on_the_base_equals_the_rollout_at_noise_zero_with_the_evaluation_noise(
    tiny_kontext_path, source, tmp_path
):
    from mtflow.models.kontext import KontextPolicy

    common = [
        "--base",
        str(tiny_kontext_path),
        "--resolution",
        "32",
        "--dtype",
        "float32",
        "--image",
        str(source),
    ]
    _edit(*common, "--instruction", INSTRUCTIONS[0], "--instruction", INSTRUCTIONS[1], "--steps", "3", "--seed", "5", "--output_dir", str(tmp_path / "a"))  # fmt: skip
    record = json.loads((tmp_path / "a" / "edit.json").read_text())
    assert (
        record["instructions"] == INSTRUCTIONS and record["chain_id"] == "cat" and record["adapter"] is None
    )

    policy = KontextPolicy(
        pretrained=str(tiny_kontext_path), resolution=32, dtype="float32", lora_rank=0
    ).load()
    chain = EditChain("cat", Image.open(source), INSTRUCTIONS)
    expected = rollout(policy, [chain], RolloutConfig(group_size=1, num_steps=3), generator=[eval_generator("cat", 5, "cpu")], adapter=None)  # fmt: skip
    assert np.array_equal(_turns(tmp_path / "a", 2), _uint8(expected))
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "a" / "source.png")),
        expected.source_images[0].permute(1, 2, 0).numpy(),
    )
    grid = Image.open(tmp_path / "a" / "grid.png")
    assert grid.width > 3 * 256  # source + 2 turns, captioned

    _edit(*common, "--instruction", INSTRUCTIONS[0], "--instruction", INSTRUCTIONS[1], "--steps", "3", "--seed", "6", "--output_dir", str(tmp_path / "b"))  # fmt: skip
    assert not np.array_equal(_turns(tmp_path / "b", 2), _turns(tmp_path / "a", 2))  # the seed is the noise


def test_edit_with_an_exported_lora_equals_the_checkpoints_evaluation_and_is_scored_by_the_run_judge(
    tiny_kontext_path, source, tmp_path
):
    manifest = write_random_manifest(tmp_path / "data", num_chains=4, num_turns=2)
    config = tiny_fit_config(tiny_kontext_path, manifest, tmp_path, model={"optim": {"lr": 0.05}}, name="run")
    config["heldout"] = {"enabled": False}
    config_path = write_config(config, tmp_path / "run.yaml")
    cli = main(["fit", "--config", str(config_path)])
    run = tmp_path / "run" / "version_0"
    main(["export", "--config", str(config_path), "--ckpt_path", str(run / "checkpoints/last.ckpt"), "--output_dir", str(tmp_path / "lora")])  # fmt: skip
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"

    out = tmp_path / "edit"
    _edit("--config", str(run / "config.yaml"), "--lora", str(lora), "--image", str(source), "--instruction", INSTRUCTIONS[0], "--instruction", INSTRUCTIONS[1], "--judge", "true", "--output_dir", str(out))  # fmt: skip
    record = json.loads((out / "edit.json").read_text())
    assert (
        record["adapter"] == "default" and record["steps"] == 2
    )  # the run's rollout steps (no evaluation.num_steps)

    module = cli.model  # the trained adapter in memory: what last.ckpt holds
    scores, items = rollout_and_score(
        module.policy, module.scorer, [EditChain("cat", Image.open(source), INSTRUCTIONS)],
        condition="model", adapter=module.eval_adapter, num_steps=module.eval_num_steps,
        forward_batch_size=4, seed=0,
    )  # fmt: skip
    expected = np.stack([np.asarray(image) for image in items[0].outputs])
    assert np.array_equal(_turns(out, 2), expected)
    assert [t["if"] for t in record["turns"]] == pytest.approx(scores.instruction_following[0].tolist())
    assert [t["cc"] for t in record["turns"]] == pytest.approx(scores.content_consistency[0].tolist())
    # the base model (no LoRA) edits differently: the LoRA is really applied
    _edit("--config", str(run / "config.yaml"), "--image", str(source), "--instruction", INSTRUCTIONS[0], "--instruction", INSTRUCTIONS[1], "--output_dir", str(tmp_path / "base"))  # fmt: skip
    assert not np.array_equal(_turns(tmp_path / "base", 2), expected)


def test_bad_options_are_one_line_errors(tiny_kontext_path, source, tmp_path):
    cases = [
        (["--image", str(source), "--instruction", "a"], "exactly one of --config"),
        (
            ["--base", "x", "--image", str(tmp_path / "none.png"), "--instruction", "a"],
            "cannot read the image",
        ),
        (["--base", "x", "--image", str(source)], "give the instructions"),
        (["--base", "x", "--image", str(source), "--decompose", "do it"], "--decompose needs a VLM"),
        (
            ["--base", "x", "--image", str(source), "--instruction", "a", "--num_turns", "2"],
            "apply to --decompose only",
        ),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            _edit(*args, "--output_dir", str(tmp_path / "o"))
        text = str(exit_info.value.code)
        assert message in text and "\n" not in text, text


def test_decompose_through_the_loopback_server_parses_the_split_retries_and_refuses_garbage(
    tiny_kontext_path, tiny_qwen3vl_path, source, tmp_path
):
    from mtflow.reward.backends import TransformersBackend
    from mtflow.reward.openai_compat_server import create_openai_compat_app
    from mtflow.reward.server import BackgroundServer

    key = image_key(Image.open(source))
    split = json.dumps({"edits": INSTRUCTIONS})
    base = ["--base", str(tiny_kontext_path), "--resolution", "32", "--dtype", "float32", "--image", str(source), "--steps", "2"]  # fmt: skip
    script = CannedAnswers({key: ["I think you should first make it red, then add a circle.", split]})
    with BackgroundServer(create_canned_openai_app(script, "vlm")) as server:
        vlm = ["--vlm.class_path", "mtflow.reward.openai_backend.OpenAIBackend", "--vlm.init_args.base_url", f"{server.url}/v1", "--vlm.init_args.model", "vlm"]  # fmt: skip
        _edit(*base, *vlm, "--decompose", "Make it red and add a circle", "--num_turns", "2", "--output_dir", str(tmp_path / "split"))  # fmt: skip
    assert script.asked == [key, key]  # a retry after the unusable first answer
    record = json.loads((tmp_path / "split" / "edit.json").read_text())
    assert record["instructions"] == INSTRUCTIONS and len(record["decomposition"]["answers"]) == 2
    _edit(*base, "--instruction", INSTRUCTIONS[0], "--instruction", INSTRUCTIONS[1], "--output_dir", str(tmp_path / "given"))  # fmt: skip
    assert np.array_equal(_turns(tmp_path / "split", 2), _turns(tmp_path / "given", 2))

    wrong_count = CannedAnswers({key: [json.dumps({"edits": ["only one"]})]})
    with BackgroundServer(create_canned_openai_app(wrong_count, "vlm")) as server:
        vlm[3] = f"{server.url}/v1"
        with pytest.raises(SystemExit, match="1 sub-edits, expected 2"):
            _edit(*base, *vlm, "--decompose", "Make it red and add a circle", "--num_turns", "2", "--output_dir", str(tmp_path / "wrong"))  # fmt: skip
    assert not (tmp_path / "wrong" / "turn_1.png").exists()

    tiny = TransformersBackend(str(tiny_qwen3vl_path))
    with BackgroundServer(create_openai_compat_app(tiny, "tiny-qwen3vl")) as server:
        vlm = ["--vlm.class_path", "mtflow.reward.openai_backend.OpenAIBackend", "--vlm.init_args.base_url", f"{server.url}/v1", "--vlm.init_args.model", "tiny-qwen3vl"]  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            _edit(*base, *vlm, "--decompose", "Make it red and add a circle", "--num_turns", "2", "--decompose_max_new_tokens", "24", "--output_dir", str(tmp_path / "tiny"))  # fmt: skip
    message = str(exit_info.value.code)
    assert message.startswith("mtflow edit: the VLM's split of the request was unusable after 2 attempt(s)")
    assert not (tmp_path / "tiny" / "turn_1.png").exists() and not (tmp_path / "tiny" / "edit.json").exists()
