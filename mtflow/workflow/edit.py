"""``mtflow edit``: run a K-turn edit chain on one's own image, each turn editing the model's own previous output.

    mtflow edit --config runs/toy/version_0/config.yaml --lora lora/pytorch_lora_weights.safetensors \\
        --image photo.png --instruction "Add a red hat" --instruction "Make the background a beach"
    mtflow edit --base black-forest-labs/FLUX.1-Kontext-dev --lora lora/pytorch_lora_weights.safetensors \\
        --image photo.png --decompose "Put a red hat on the dog and move it to a beach" --num_turns 2 \\
        --vlm.class_path mtflow.reward.openai_backend.OpenAIBackend \\
        --vlm.init_args.base_url http://127.0.0.1:8001/v1 --vlm.init_args.model Qwen/Qwen3-VL-8B-Instruct

The chain is sampled deterministically (noise level 0) from the noise the evaluation gives a chain of id
``chain_id`` under ``seed`` (``mtflow.eval.evaluate.eval_generator``): the same edit ``mtflow test`` makes.
``--decompose`` has a VLM (the judge backends) split one complex request into K sub-edits first, the delivery a
multi-turn-tuned editor is made for (ImageEdit-R1's; the evaluation's single-turn-merged baseline is its
opposite); the split is printed and saved. A VLM answer that is not K distinct sub-edits is retried, then refused
with the answer quoted: never guessed. Output: ``source.png``, ``turn_<k>.png``, ``grid.png`` (captioned, with
IF / CC when a judge scores it) and ``edit.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from mtflow.models.base import TRAINED_ADAPTER, EditPolicy
from mtflow.reward.backends import JudgeBackend
from mtflow.reward.base import Scorer, ScoringItem
from mtflow.reward.prompts import JudgePrompt
from mtflow.workflow.chains import PROMPTS, AnswerError, _excerpt, _json_object, _norm, read_prompt

DEFAULT_DECOMPOSE_PROMPT = PROMPTS / "decompose.txt"


class EditError(ValueError):
    """A bad combination of options, an unreadable input or a VLM split that could not be used (one line)."""


def parse_decomposition(answer: str, num_turns: int) -> list[str]:
    """A VLM's split of a request: ``{"edits": [K distinct non-empty strings]}``; ``AnswerError`` otherwise."""
    data = _json_object(answer)
    edits = data.get("edits") if isinstance(data, dict) else None
    if not isinstance(edits, list) or not all(isinstance(e, str) for e in edits):
        raise AnswerError(f'the answer has no "edits" list of strings: {_excerpt(answer)}')
    edits = [e.strip() for e in edits]
    if len(edits) != num_turns:
        raise AnswerError(f"{len(edits)} sub-edits, expected {num_turns}: {_excerpt(answer)}")
    if not all(edits):
        raise AnswerError(f"an empty sub-edit: {_excerpt(answer)}")
    if len({_norm(e) for e in edits}) != len(edits):
        raise AnswerError(f"repeated sub-edits: {_excerpt(answer)}")
    return edits


def split_request(
    backend: JudgeBackend,
    image: Image.Image,
    request: str,
    num_turns: int,
    prompt_file: str | Path = DEFAULT_DECOMPOSE_PROMPT,
    attempts: int = 2,
    max_new_tokens: int = 512,
) -> tuple[list[str], list[str]]:
    """Ask ``backend`` to split ``request`` into ``num_turns`` sub-edits of ``image``; returns the sub-edits and
    every answer received. Raises ``EditError`` (quoting the last answer) when no attempt gave a usable split."""
    system, user = read_prompt(prompt_file)
    prompt = JudgePrompt(system, [image, user.format(request=request, num_turns=num_turns)], "if")
    answers, problem = [], ""
    for _ in range(attempts):
        generation = backend.generate([prompt], max_new_tokens)[0]
        if generation.text is None:
            raise EditError(f"the VLM could not be asked to split the request: {generation.error}")
        answers.append(generation.text)
        try:
            return parse_decomposition(generation.text, num_turns), answers
        except AnswerError as error:
            problem = str(error)
    raise EditError(f"the VLM's split of the request was unusable after {attempts} attempt(s): {problem}")


def lora_file_settings(path: str | Path) -> dict[str, Any]:
    """``lora_rank``, ``lora_alpha`` and ``lora_targets`` of a diffusers-format LoRA file (``mtflow export``), so
    that a policy built from ``--base`` can hold it."""
    from safetensors import safe_open

    from mtflow.models.kontext import ATTENTION_LORA_TARGETS, FEED_FORWARD_LORA_TARGETS

    ranks, alphas, modules = set(), set(), set()
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open handles have keys(), not iteration
            if key.endswith(".lora_A.weight"):
                ranks.add(handle.get_slice(key).get_shape()[0])
                modules.add(key[: -len(".lora_A.weight")])
            elif key.endswith(".alpha"):
                alphas.add(float(handle.get_tensor(key)))
    if len(ranks) != 1:
        raise EditError(f"{path}: expected one LoRA rank, found {sorted(ranks) or 'no lora_A tensors'}")
    known = ATTENTION_LORA_TARGETS + FEED_FORWARD_LORA_TARGETS
    targets = [t for t in known if any(m.endswith("." + t) for m in modules)]
    rank = ranks.pop()
    return {
        "lora_rank": rank,
        "lora_alpha": alphas.pop() if len(alphas) == 1 else float(rank),
        "lora_targets": targets,
    }


def _instantiate(spec: dict[str, Any], kind: type) -> Any:
    """A ``{"class_path", "init_args"}`` config entry as an object, through jsonargparse (nested classes too)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--value", type=kind)
    return parser.instantiate_classes(parser.parse_object({"value": spec})).value


def build_policy(
    config: str | None, base: str | None, lora: str | None, resolution: int | None, dtype: str | None
) -> tuple[EditPolicy, dict[str, Any]]:
    """The editor of a run config (its ``model.policy``) or of a base model, with ``lora`` in its trained adapter;
    and the run config (empty for ``base``)."""
    if (config is None) == (base is None):
        raise EditError("give exactly one of --config (a run's config.yaml) or --base (a Kontext model)")
    if config is not None:
        if resolution is not None or dtype is not None:
            raise EditError(
                "--resolution and --dtype apply to --base; with --config they come from the config"
            )
        from mtflow.cli import resolve_fit_config

        run = resolve_fit_config(["--config", config])
        spec = json.loads(json.dumps(run["model"]["policy"]))
        if lora is not None:
            spec.setdefault("init_args", {})["lora_weights"] = lora
        return _instantiate(spec, EditPolicy), run
    from mtflow.models.kontext import KontextPolicy

    lora_args = lora_file_settings(lora) if lora is not None else {"lora_rank": 0}
    policy = KontextPolicy(
        pretrained=base,
        resolution=resolution or 512,
        dtype=dtype or "bfloat16",
        lora_weights=lora,
        **lora_args,
    )
    return policy, {}


def edit(
    image: str,
    instruction: list[str] | None = None,
    output_dir: str = "edits",
    config: str | None = None,
    base: str | None = None,
    lora: str | None = None,
    seed: int = 0,
    steps: int | None = None,
    chain_id: str | None = None,
    resolution: int | None = None,
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    device: str = "cpu",
    scorer: Scorer | None = None,
    judge: bool = False,
    decompose: str | None = None,
    num_turns: int | None = None,
    vlm: JudgeBackend | None = None,
    decompose_prompt_file: str | None = None,
    decompose_attempts: int = 2,
    decompose_max_new_tokens: int = 512,
    cell_size: int = 256,
) -> dict[str, Any]:
    """Edit ``image`` turn by turn and write the turns, a captioned grid and ``edit.json`` to ``output_dir``.

    Args:
        image: the source image file.
        instruction: the K instructions, in order (repeat the option); or use ``decompose``.
        output_dir: folder for ``source.png``, ``turn_<k>.png``, ``grid.png`` and ``edit.json``.
        config: a run's ``config.yaml`` (its policy, judge and evaluation steps).
        base: a FLUX.1-Kontext model (hub id or folder) instead of ``config``.
        lora: a ``pytorch_lora_weights.safetensors`` from ``mtflow export`` (None: the base model).
        seed: noise seed (with ``chain_id``: the noise ``mtflow test`` uses for that chain).
        steps: sampler steps per turn (None: the config's evaluation steps; 28 for ``base``).
        chain_id: id naming the noise (None: the image file's stem).
        resolution: square side in pixels, with ``base`` (None: 512).
        dtype: model dtype, with ``base`` (None: bfloat16).
        device: torch device to run on (``cpu``, ``cuda``).
        scorer: a judge that scores every turn (IF / CC on the captions and in ``edit.json``).
        judge: score with the ``--config`` run's own judge (``model.scorer``).
        decompose: one complex request that a VLM splits into ``num_turns`` sub-edits (instead of ``instruction``).
        num_turns: K sub-edits of ``decompose`` (None: 3).
        vlm: the VLM that splits ``decompose`` (e.g. ``mtflow.reward.openai_backend.OpenAIBackend``).
        decompose_prompt_file: system message, ``---``, user message ({request}, {num_turns}); default
            ``mtflow/workflow/prompts/decompose.txt``.
        decompose_attempts: VLM requests before an unusable split is refused.
        decompose_max_new_tokens: length limit of the VLM's answer.
        cell_size: pixels per image in ``grid.png``.

    Returns:
        What ``edit.json`` holds.
    """
    from mtflow.data.records import EditChain
    from mtflow.eval.evaluate import eval_generator, scoring_items
    from mtflow.eval.report import save_chain_grid
    from mtflow.rollout import RolloutConfig, rollout

    if (instruction is None) == (decompose is None):
        raise EditError(
            "give the instructions (--instruction, repeated) or one --decompose request, not both"
        )
    if decompose is None and (vlm is not None or num_turns is not None or decompose_prompt_file is not None):
        raise EditError("--vlm, --num_turns and --decompose_prompt_file apply to --decompose only")
    if decompose is not None and vlm is None:
        raise EditError(
            "--decompose needs a VLM: --vlm.class_path ... (e.g. mtflow.reward.openai_backend.OpenAIBackend)"
        )
    if judge and (config is None or scorer is not None):
        raise EditError("--judge scores with the --config run's judge; give either --judge or --scorer")
    source_path = Path(image)
    try:
        source = Image.open(source_path)
        source.load()
        source = source.convert("RGB")
    except Exception as error:  # noqa: BLE001 - any decoder failure is the same for the user
        raise EditError(f"cannot read the image {image}: {type(error).__name__}: {error}") from None
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "image": str(source_path),
        "seed": seed,
        "config": config,
        "base": base,
        "lora": lora,
    }

    if decompose is not None:
        k = num_turns or 3
        instruction, answers = split_request(
            vlm,
            source,
            decompose,
            k,
            decompose_prompt_file or DEFAULT_DECOMPOSE_PROMPT,
            decompose_attempts,
            decompose_max_new_tokens,
        )
        record["decomposition"] = {
            "request": decompose,
            "num_turns": k,
            "vlm": vlm.describe(),
            "answers": answers,
        }
        print(f"split of {decompose!r} into {k} edits:")
        for turn, text in enumerate(instruction, start=1):
            print(f"  {turn}. {text}")
    instructions = [str(i).strip() for i in instruction]
    if not all(instructions):
        raise EditError("an --instruction is empty")

    policy, run = build_policy(config, base, lora, resolution, dtype)
    if judge:
        scorer = _instantiate(run["model"]["scorer"], Scorer)
    if steps is None:
        evaluation = (run.get("model") or {}).get("evaluation") or {}
        steps = (
            evaluation.get("num_steps") or (run.get("model") or {}).get("rollout", {}).get("num_steps") or 28
        )
    policy.load(device=device)
    chain_id = chain_id or source_path.stem
    adapter = TRAINED_ADAPTER if getattr(policy, "lora_weights", None) else None
    chain = EditChain(chain_id, source, instructions)
    with torch.no_grad():
        result = rollout(
            policy,
            [chain],
            RolloutConfig(group_size=1, num_steps=steps),
            generator=[eval_generator(chain_id, seed, policy.device)],
            adapter=adapter,
        )
    item: ScoringItem = scoring_items(result)[0]
    item.source.save(out / "source.png")
    for turn, output in enumerate(item.outputs, start=1):
        output.save(out / f"turn_{turn}.png")
    scores = scorer.score([item]) if scorer is not None else None
    save_chain_grid(out / "grid.png", [item], scores, max_chains=1, cell_size=cell_size)
    record.update({"chain_id": chain_id, "steps": steps, "adapter": adapter, "instructions": instructions})
    record["turns"] = [
        {
            "instruction": text,
            "image": f"turn_{turn}.png",
            "if": float(scores.instruction_following[0, turn - 1])
            if scores and scores.scored[0, turn - 1]
            else None,
            "cc": float(scores.content_consistency[0, turn - 1])
            if scores and scores.scored[0, turn - 1]
            else None,
        }
        for turn, text in enumerate(instructions, start=1)
    ]
    (out / "edit.json").write_text(json.dumps(record, indent=2))
    print(f"{len(instructions)} turns written to {out} (grid.png, turn_1.png ..., edit.json)")
    return record


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``mtflow edit``: arguments are ``edit``'s (``--help`` lists them); a bad option or input is one line."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="mtflow edit", description=__doc__.split("\n\n")[0])
    parser.add_function_arguments(edit)
    # a repeated --instruction appends (jsonargparse's own list syntax is --instruction+)
    argv = [
        "--instruction+" + a[len("--instruction") :]
        if a == "--instruction" or a.startswith("--instruction=")
        else a
        for a in (argv if argv is not None else sys.argv[1:])
    ]
    config = parser.instantiate_classes(parser.parse_args(argv))
    config.pop("__path__", None)
    try:
        return edit(**config)
    except EditError as error:
        raise SystemExit(f"mtflow edit: {error}") from None
    finally:
        if config.get("vlm") is not None:
            config["vlm"].close()
