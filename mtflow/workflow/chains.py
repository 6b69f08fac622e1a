"""``mtflow data build-chains``: K-turn instruction chains for training, proposed by a vision-language model.

For every source image (a folder, a JSONL list or a ``datasets`` folder, ``mtflow.workflow.sources``) a VLM
(the judge backends: ``TransformersBackend`` in process, ``OpenAIBackend`` for vLLM or any OpenAI-compatible
server) is asked, with an editable prompt file, for K edits in EdiVal's style: one edit type of EdiVal's taxonomy
per turn, each valid on the scene the earlier edits left. Its answer must be JSON
(``{"edits": [{"edit_type", "target", "instruction"}, ...]}``); a malformed answer, a wrong number of edits, an
unknown edit type, an empty or repeated instruction, or a turn that undoes an earlier one (removing what an earlier
turn added, adding back what it removed) rejects the chain; it is retried ``max_attempts`` times, never repaired.

Nothing else is invented either: corrupt, too small and duplicate images (same pixels) and images of a given test
set (``exclude``: e.g. EdiVal-Bench's manifest, matched by pixel hash) are skipped; so are chains identical to an
earlier one. Every skipped image is reported with its reason (``report.json``, and printed).

Resumable: each VLM outcome is appended to ``progress.jsonl`` (flushed and synced) as soon as it is known, keyed
by the image's pixel hash; a rerun asks only for images without an outcome, and a crash loses at most the batch in
flight. Train / val is decided by the pixel hash (``val_fraction``), so one image never lands in both splits and a
rerun splits alike. Output: ``train.jsonl`` and ``val.jsonl`` (manifests ``mtflow fit`` reads), ``report.json``,
``images/`` (images of a ``datasets`` source).

    mtflow data build-chains --source photos/ --output_dir data/ --exclude data/edival.jsonl \\
        --backend.class_path mtflow.reward.openai_backend.OpenAIBackend \\
        --backend.init_args.base_url http://127.0.0.1:8001/v1 --backend.init_args.model Qwen/Qwen3-VL-8B-Instruct
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mtflow.reward.backends import JudgeBackend
from mtflow.reward.prompts import JudgePrompt
from mtflow.workflow.sources import SourceImage, iter_sources, pixel_hash

# EdiVal-Bench's edit types (its task_type column).
EDIVAL_EDIT_TYPES = (
    "subject_add",
    "subject_remove",
    "subject_replace",
    "color_alter",
    "material_alter",
    "text_change",
    "position_change",
    "count_change",
    "background_change",
)
# (earlier type, later type) pairs on the same target where the later turn undoes the earlier one.
UNDOING = {("subject_add", "subject_remove"), ("subject_remove", "subject_add")}
PROMPTS = Path(__file__).parent / "prompts"
DEFAULT_PROMPT = PROMPTS / "build_chains.txt"
PROGRESS_FILE = "progress.jsonl"


class AnswerError(ValueError):
    """A VLM answer that is not a valid chain (the message says why)."""


def read_prompt(path: str | Path) -> tuple[str, str]:
    """A prompt file: the system message, a line ``---``, the user message (``str.format`` placeholders)."""
    text = Path(path).read_text(encoding="utf-8")
    system, separator, user = text.partition("\n---\n")
    if not separator:
        raise ValueError(f"{path}: a prompt file is the system message, a line '---', then the user message")
    return system.strip(), user.strip()


def _json_object(answer: str) -> Any:
    """The JSON value in an answer, allowing a Markdown code fence or text around one object."""
    text = re.sub(r"^```(?:json)?\s*|\s*```$", "", answer.strip())
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        raise AnswerError(f"no JSON object in the answer {_excerpt(answer)}")
    try:
        return json.loads(text[start : end + 1])
    except json.JSONDecodeError as error:
        raise AnswerError(f"answer is not valid JSON ({error.msg}): {_excerpt(answer)}") from None


def _excerpt(text: str, limit: int = 120) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@dataclass
class ProposedChain:
    """A validated chain: K instructions, their edit types and targets."""

    instructions: list[str]
    edit_types: list[str]
    targets: list[str] = field(default_factory=list)


def parse_chain(
    answer: str, num_turns: int, edit_types: tuple[str, ...] = EDIVAL_EDIT_TYPES, max_chars: int = 300
) -> ProposedChain:
    """Validate a VLM answer into a chain; raises ``AnswerError`` naming the first problem."""
    data = _json_object(answer)
    edits = data.get("edits") if isinstance(data, dict) else None
    if not isinstance(edits, list):
        raise AnswerError(f'the answer has no "edits" list: {_excerpt(answer)}')
    if len(edits) != num_turns:
        raise AnswerError(f"{len(edits)} edits, expected {num_turns}")
    instructions, types, targets = [], [], []
    for turn, edit in enumerate(edits, start=1):
        if not isinstance(edit, dict):
            raise AnswerError(f"turn {turn}: an edit must be an object with edit_type, target, instruction")
        instruction = str(edit.get("instruction") or "").strip()
        edit_type = str(edit.get("edit_type") or "").strip()
        target = str(edit.get("target") or "").strip()
        if not instruction:
            raise AnswerError(f"turn {turn}: empty instruction")
        if len(instruction) > max_chars:
            raise AnswerError(f"turn {turn}: instruction longer than {max_chars} characters")
        if edit_type not in edit_types:
            raise AnswerError(
                f"turn {turn}: unknown edit type {edit_type!r} (expected one of {list(edit_types)})"
            )
        for earlier in range(turn - 1):
            if _norm(instructions[earlier]) == _norm(instruction):
                raise AnswerError(f"turn {turn} repeats turn {earlier + 1}")
            if (types[earlier], edit_type) in UNDOING and target and _norm(targets[earlier]) == _norm(target):
                raise AnswerError(f"turn {turn} ({edit_type} {target!r}) undoes turn {earlier + 1}")
        instructions.append(instruction)
        types.append(edit_type)
        targets.append(target)
    return ProposedChain(instructions, types, targets)


class Progress:
    """``progress.jsonl``: one VLM outcome per image, appended and synced as it comes (a crash loses nothing
    written; a torn last line from a crash mid-write is dropped on reading)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, dict[str, Any]] = {}
        if path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = []
            for line in lines:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # torn write
                if line.endswith("\n"):
                    self.done[record["sha256"]] = record
                    kept.append(line)
            if len(kept) != len(lines):
                path.write_text("".join(kept), encoding="utf-8")

    def add(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.done[record["sha256"]] = record


def test_set_hashes(exclude: list[str], image_column: str) -> tuple[set[str], list[str]]:
    """Pixel hashes of every image of the test sets (manifests, lists, folders or datasets); and the images of
    them that could not be read (a test set that cannot be checked must not be silently ignored)."""
    hashes, unreadable = set(), []
    for source in exclude:
        for image in iter_sources(source, image_column):
            try:
                hashes.add(pixel_hash(image.load()))
            except ValueError as error:
                unreadable.append(f"{source}: {image.key}: {error}")
    return hashes, unreadable


def _manifest_image(image: SourceImage, digest: str, decoded: Image.Image, output_dir: Path) -> str:
    """The manifest's ``image`` value: the file relative to the manifests when it lies inside their folder, else a
    copy under ``images/`` (the file's own bytes; a dataset row as PNG). ``mtflow fit`` reads manifest images only
    inside the manifest's folder (``allow_outside_paths``), and a self-contained folder is what gets copied to a
    cluster."""
    (output_dir / "images").mkdir(exist_ok=True)
    if image.path is not None:
        source, root = image.path.resolve(), output_dir.resolve()
        if source.is_relative_to(root):
            return source.relative_to(root).as_posix()
        relative = f"images/{digest[:16]}{image.path.suffix.lower()}"
        shutil.copyfile(source, output_dir / relative)
        return relative
    relative = f"images/{digest[:16]}.png"
    decoded.save(output_dir / relative)
    return relative


def build_chains(
    source: str,
    output_dir: str,
    backend: JudgeBackend,
    num_turns: int = 3,
    prompt_file: str | None = None,
    exclude: str | list[str] | None = None,
    val_fraction: float = 0.1,
    image_column: str = "image",
    min_side: int = 256,
    max_pixels: int = 4096 * 4096,
    max_attempts: int = 2,
    max_new_tokens: int = 512,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Propose, check and split K-turn chains for every image of ``source`` (see the module docstring).

    Args:
        source: folder of images, ``.jsonl`` list of images, or ``datasets`` folder (``save_to_disk``).
        output_dir: where ``train.jsonl``, ``val.jsonl``, ``report.json`` and ``progress.jsonl`` go.
        backend: the VLM (e.g. ``mtflow.reward.openai_backend.OpenAIBackend`` for vLLM).
        num_turns: K edits per chain.
        prompt_file: system message, a line ``---``, user message ({num_turns} and {edit_types} filled in);
            default ``mtflow/workflow/prompts/build_chains.txt``.
        exclude: test set(s) whose images must not become training sources (manifests, lists, folders), e.g.
            ``data/edival.jsonl``; matched by pixel hash.
        val_fraction: share of source images (by pixel hash) whose chains go to ``val.jsonl``.
        image_column: image column of a ``datasets`` source.
        min_side: images with a shorter side are skipped.
        max_pixels: images with more pixels are skipped.
        max_attempts: VLM requests per image before its answer is rejected.
        max_new_tokens: answer length limit.
        batch_size: images per backend call (the OpenAI backend sends them concurrently).

    Returns:
        The report (also written to ``report.json``).
    """
    exclude = [exclude] if isinstance(exclude, str) else list(exclude or [])
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if num_turns < 1 or max_attempts < 1 or batch_size < 1:
        raise ValueError("num_turns, max_attempts and batch_size must be >= 1")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    system, user_template = read_prompt(prompt_file or DEFAULT_PROMPT)
    user = user_template.format(num_turns=num_turns, edit_types=", ".join(EDIVAL_EDIT_TYPES))
    test_set, unreadable = test_set_hashes(exclude, image_column)
    if unreadable:
        raise ValueError(f"{len(unreadable)} test-set image(s) cannot be read, e.g. {unreadable[0]}")
    progress = Progress(out / PROGRESS_FILE)

    skipped: list[dict[str, str]] = []
    candidates: list[tuple[SourceImage, str, Image.Image]] = []
    first_seen: dict[str, str] = {}
    num_images = 0
    for image in iter_sources(source, image_column):
        num_images += 1
        try:
            decoded = image.load(max_pixels)
        except ValueError as error:
            skipped.append({"image": image.key, "reason": str(error)})
            continue
        if min(decoded.size) < min_side:
            skipped.append({"image": image.key, "reason": f"too small: {decoded.size[0]}x{decoded.size[1]}"})
            continue
        digest = pixel_hash(decoded)
        if digest in test_set:
            skipped.append({"image": image.key, "reason": "in the test set (same pixels as a test image)"})
            continue
        if digest in first_seen:
            skipped.append({"image": image.key, "reason": f"duplicate of {first_seen[digest]}"})
            continue
        first_seen[digest] = image.key
        candidates.append((image, digest, decoded))

    asked = 0
    failures: dict[str, str] = {}
    todo = [c for c in candidates if c[1] not in progress.done]
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        pending = {digest: (image, digest, decoded) for image, digest, decoded in batch}
        errors: dict[str, str] = {}
        for attempt in range(1, max_attempts + 1):
            if not pending:
                break
            prompts = [JudgePrompt(system, [decoded, user], "if") for _, _, decoded in pending.values()]
            answers = backend.generate(prompts, max_new_tokens)
            asked += len(prompts)
            for (image, digest, decoded), answer in zip(list(pending.values()), answers):
                if answer.text is None:  # the backend failed: not an outcome, a rerun asks again
                    failures[digest] = f"VLM request failed: {answer.error}"
                    del pending[digest]
                    continue
                try:
                    chain = parse_chain(answer.text, num_turns)
                except AnswerError as error:
                    errors[digest] = f"{error} (attempt {attempt}/{max_attempts})"
                    if attempt == max_attempts:
                        progress.add(
                            {
                                "sha256": digest,
                                "key": image.key,
                                "status": "rejected",
                                "reason": errors[digest],
                            }
                        )
                    continue
                progress.add(
                    {
                        "sha256": digest,
                        "key": image.key,
                        "status": "chain",
                        "image": _manifest_image(image, digest, decoded, out),
                        "instructions": chain.instructions,
                        "edit_types": chain.edit_types,
                        "targets": chain.targets,
                    }
                )
                del pending[digest]

    splits: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    seen_chains: dict[tuple[str, ...], str] = {}
    for image, digest, _ in candidates:
        record = progress.done.get(digest)
        if record is None:
            skipped.append({"image": image.key, "reason": failures.get(digest, "not asked (interrupted)")})
            continue
        if record["status"] != "chain":
            skipped.append({"image": image.key, "reason": f"VLM answer rejected: {record['reason']}"})
            continue
        signature = tuple(_norm(i) for i in record["instructions"])
        if signature in seen_chains:
            skipped.append(
                {"image": image.key, "reason": f"duplicate chain (same as {seen_chains[signature]})"}
            )
            continue
        seen_chains[signature] = image.key
        split = "val" if int(digest[:8], 16) / 2**32 < val_fraction else "train"
        splits[split].append(
            {
                "id": digest[:16],
                "image": record["image"],
                "instructions": record["instructions"],
                "edit_types": record["edit_types"],
                "split": split,
                "metadata": {"source": image.key, "targets": record["targets"]},
            }
        )
    for split, records in splits.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (out / f"{split}.jsonl").write_text(text, encoding="utf-8")
    report = {
        "source": str(source),
        "num_turns": num_turns,
        "backend": backend.describe(),
        "exclude": exclude,
        "num_images": num_images,
        "num_chains": {split: len(records) for split, records in splits.items()},
        "asked_this_run": asked,
        "skipped": skipped,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``mtflow data build-chains``: arguments are ``build_chains``'s (``--help`` lists them)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="mtflow data build-chains", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
    parser.add_function_arguments(build_chains)
    config = parser.instantiate_classes(parser.parse_args(argv))
    config.pop("config", None)
    config.pop("__path__", None)
    backend = config.pop("backend")
    try:
        report = build_chains(backend=backend, **config)
    finally:
        backend.close()
    for item in report["skipped"]:
        print(f"skipped {item['image']}: {item['reason']}")
    counts = report["num_chains"]
    print(
        f"{counts['train']} train + {counts['val']} val chains, {len(report['skipped'])} image(s) skipped, "
        f"{report['asked_this_run']} VLM request(s) this run; written to {config['output_dir']}"
    )
    return report
