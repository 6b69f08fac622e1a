"""``mtflow data build-chains``: answers parsed and filtered (never repaired), skipped images reported with their
reason, test-set images never become sources, train/val split by image, resumable after a kill; in process and
through a loopback OpenAI-protocol server, with scripted answers and with the tiny random Qwen3-VL (whose garbage
must be rejected, not turned into a chain)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtflow.cli import main
from mtflow.data.manifest import load_manifest
from mtflow.testing.canned_vlm import CannedAnswers, CannedBackend, create_canned_openai_app
from mtflow.workflow.chains import AnswerError, build_chains, parse_chain

NUM_GOOD = 5


def _chain(*edits: tuple[str, str, str]) -> str:
    return json.dumps({"edits": [{"edit_type": t, "target": g, "instruction": i} for t, g, i in edits]})


VALID = [
    _chain(
        ("color_alter", "car", "Change the color of the car to red"),
        ("subject_add", "dog", "Add a dog next to the car"),
        ("background_change", "background", "Make the background a beach"),
    ),
    _chain(
        ("subject_remove", "tree", "Remove the tree"),
        ("material_alter", "table", "Make the table wooden"),
        ("count_change", "apples", "Change the number of apples to three"),
    ),
    _chain(
        ("text_change", "sign", 'Change the text on the sign to "open"'),
        ("position_change", "cat", "Move the cat to the left"),
        ("subject_replace", "cup", "Replace the cup with a vase"),
    ),
]
UNDO = _chain(
    ("subject_add", "hat", "Add a hat on the man"),
    ("color_alter", "shirt", "Make the shirt blue"),
    ("subject_remove", "hat", "Remove the hat from the man"),
)


def _pixels_hash(path: Path) -> str:
    """The pixel hash computed independently of the library (sha256 of shape + RGB bytes)."""
    rgb = np.asarray(Image.open(path).convert("RGB"))
    return hashlib.sha256(f"{rgb.shape}".encode() + rgb.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder with good, corrupt, duplicate, too small and test-set images, a test-set manifest, and the
    scripted answer of each good image (good1 answers garbage first, good2 an undoing chain, good3 repeats
    good0's chain)."""
    root = tmp_path_factory.mktemp("photos")
    folder, test_set = root / "photos", root / "edival"
    folder.mkdir()
    test_set.mkdir()
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(NUM_GOOD + 1)]
    for i in range(NUM_GOOD):
        Image.fromarray(arrays[i]).save(folder / f"good{i}.png")
    Image.fromarray(arrays[0]).save(folder / "zz_copy_of_good0.png")  # duplicate pixels, other name
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / "tiny.png")
    Image.fromarray(arrays[NUM_GOOD]).save(folder / "benchmark_photo.png")  # also in the test set
    Image.fromarray(arrays[NUM_GOOD]).save(test_set / "0001_input_raw.png")
    manifest = test_set / "edival.jsonl"
    manifest.write_text(
        json.dumps({"id": "1", "image": "0001_input_raw.png", "instructions": ["a", "b", "c"]}) + "\n"
    )
    keys = {f"good{i}": _pixels_hash(folder / f"good{i}.png") for i in range(NUM_GOOD)}
    keys["benchmark_photo"] = _pixels_hash(folder / "benchmark_photo.png")
    script = {
        keys["good0"]: [VALID[0]],
        keys["good1"]: ["Sure! Here are some edits: make it nicer.", "```json\n" + VALID[1] + "\n```"],
        keys["good2"]: [UNDO],
        keys["good3"]: [VALID[0]],
        keys["good4"]: [VALID[2]],
        keys["benchmark_photo"]: [VALID[2]],
    }
    return {"folder": folder, "test_set": manifest, "keys": keys, "script": script}


def _build(photos, out: Path, backend, **options):
    defaults = dict(exclude=[str(photos["test_set"])], min_side=16, val_fraction=0.5, batch_size=2)
    return build_chains(str(photos["folder"]), str(out), backend, **{**defaults, **options})


def _manifest_lines(out: Path) -> list[dict]:
    return [
        json.loads(line)
        for split in ("train", "val")
        for line in (out / f"{split}.jsonl").read_text().splitlines()
    ]


def test_answers_are_parsed_strictly_and_never_repaired():
    chain = parse_chain("Here you go:\n```json\n" + VALID[0] + "\n```", 3)
    assert chain.edit_types == ["color_alter", "subject_add", "background_change"]
    assert chain.instructions[1] == "Add a dog next to the car"
    cases = {
        "no JSON object": "I would add a dog.",
        "not valid JSON": '{"edits": [oops]}',
        'no "edits" list': '{"chain": []}',
        "2 edits, expected 3": _chain(("color_alter", "a", "Make a red"), ("subject_add", "b", "Add b")),
        "unknown edit type 'style'": _chain(
            ("style", "a", "Make it a painting"), ("subject_add", "b", "Add b"), ("subject_add", "c", "Add c")
        ),
        "turn 2: empty instruction": _chain(
            ("color_alter", "a", "Make a red"), ("subject_add", "b", " "), ("subject_add", "c", "Add c")
        ),
        "turn 3 repeats turn 1": _chain(
            ("color_alter", "a", "Make a red"),
            ("subject_add", "b", "Add b"),
            ("color_alter", "a", "make A red!"),
        ),
        "turn 3 (subject_remove 'hat') undoes turn 1": UNDO,
    }
    for reason, answer in cases.items():
        with pytest.raises(AnswerError, match=reason.replace("(", r"\(").replace(")", r"\)")):
            parse_chain(answer, 3)


def _check_outcome(photos, out: Path, report: dict, asked: list[str]) -> list[dict]:
    keys = photos["keys"]
    reasons = {item["image"]: item["reason"] for item in report["skipped"]}
    assert set(reasons) == {
        "broken.jpg",
        "tiny.png",
        "zz_copy_of_good0.png",
        "benchmark_photo.png",
        "good2.png",
        "good3.png",
    }
    assert reasons["broken.jpg"].startswith("cannot be decoded")
    assert reasons["tiny.png"] == "too small: 8x8"
    assert reasons["zz_copy_of_good0.png"] == "duplicate of good0.png"
    assert reasons["benchmark_photo.png"].startswith("in the test set")
    assert "undoes turn 1" in reasons["good2.png"] and "attempt 2/2" in reasons["good2.png"]
    assert reasons["good3.png"] == "duplicate chain (same as good0.png)"
    # the test-set image and the skipped files were never shown to the VLM; good1 was asked twice (a retry)
    assert keys["benchmark_photo"] not in asked
    assert sorted(asked) == sorted(
        [keys[f"good{i}"] for i in range(NUM_GOOD)] + [keys["good1"], keys["good2"]]
    )
    lines = _manifest_lines(out)
    assert {line["metadata"]["source"] for line in lines} == {"good0.png", "good1.png", "good4.png"}
    by_source = {line["metadata"]["source"]: line for line in lines}
    assert by_source["good1.png"]["instructions"] == [e["instruction"] for e in json.loads(VALID[1])["edits"]]
    for line in lines:  # split by the image's own pixels, computed here independently
        fraction = int(_pixels_hash(out / line["image"])[:8], 16) / 2**32
        assert line["split"] == ("val" if fraction < 0.5 else "train")
        assert line["id"] == _pixels_hash(out / line["image"])[:16]
    # what mtflow fit reads (every line validated, images decoded)
    entries = [e for split in ("train", "val") for e in load_manifest(out / f"{split}.jsonl", 3)]
    assert len(entries) == 3
    return lines


def test_in_process_build_filters_reports_excludes_the_test_set_and_splits_by_image(photos, tmp_path):
    script = CannedAnswers(photos["script"])
    report = _build(photos, tmp_path / "out", CannedBackend(script))
    lines = _check_outcome(photos, tmp_path / "out", report, script.asked)
    assert (
        report["num_images"] == NUM_GOOD + 4
        and report["num_chains"]["train"] + report["num_chains"]["val"] == 3
    )
    # a second run asks nothing and writes the same manifests
    again = CannedAnswers(photos["script"])
    assert _build(photos, tmp_path / "out", CannedBackend(again))["asked_this_run"] == 0
    assert again.asked == [] and _manifest_lines(tmp_path / "out") == lines


def test_loopback_openai_server_gives_the_same_manifest_and_fit_accepts_it(
    photos, tmp_path, tiny_kontext_path
):
    from mtflow.reward.server import BackgroundServer
    from mtflow.testing.fixtures import tiny_fit_config, write_config

    reference = tmp_path / "reference"
    _build(photos, reference, CannedBackend(CannedAnswers(photos["script"])))
    script = CannedAnswers(photos["script"])
    with BackgroundServer(create_canned_openai_app(script, "Qwen/Qwen3-VL-8B-Instruct")) as server:
        out = tmp_path / "out"
        main(
            [
                "data", "build-chains", "--source", str(photos["folder"]), "--output_dir", str(out),
                "--exclude", str(photos["test_set"]), "--min_side", "16", "--val_fraction", "0.5",
                "--backend.class_path", "mtflow.reward.openai_backend.OpenAIBackend",
                "--backend.init_args.base_url", f"{server.url}/v1",
                "--backend.init_args.model", "Qwen/Qwen3-VL-8B-Instruct",
            ]
        )  # fmt: skip
    _check_outcome(photos, out, json.loads((out / "report.json").read_text()), script.asked)
    for split in ("train", "val"):
        assert (out / f"{split}.jsonl").read_text() == (reference / f"{split}.jsonl").read_text()

    config = tiny_fit_config(
        tiny_kontext_path, out / "train.jsonl", tmp_path, num_turns=3, model={"max_iterations": 1}
    )
    config["data"]["init_args"]["val_manifest"] = str(out / "val.jsonl")
    config["heldout"] = {"enabled": False}
    cli = main(["fit", "--config", str(write_config(config, tmp_path / "fit.yaml"))])
    assert cli.model.iteration == 1


@pytest.mark.slow
def test_killed_midway_and_rerun_gives_the_same_manifest_without_asking_finished_images_again(
    photos, tmp_path
):
    from mtflow.reward.server import BackgroundServer

    reference = tmp_path / "reference"
    _build(photos, reference, CannedBackend(CannedAnswers(photos["script"])))
    out = tmp_path / "out"
    slow = CannedAnswers(photos["script"])
    with BackgroundServer(create_canned_openai_app(slow, "vlm", delay_s=1.0)) as server:
        args = [
            sys.executable, "-m", "mtflow", "data", "build-chains", "--source", str(photos["folder"]),
            "--output_dir", str(out), "--exclude", str(photos["test_set"]), "--min_side", "16",
            "--val_fraction", "0.5", "--batch_size", "1",
            "--backend.class_path", "mtflow.reward.openai_backend.OpenAIBackend",
            "--backend.init_args.base_url", f"{server.url}/v1", "--backend.init_args.model", "vlm",
        ]  # fmt: skip
        process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        progress = out / "progress.jsonl"
        deadline = time.monotonic() + 120
        while not (progress.is_file() and len(progress.read_text().splitlines()) >= 2):
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        finished = [json.loads(line)["sha256"] for line in progress.read_text().splitlines()]
        assert 2 <= len(finished) < NUM_GOOD and not (out / "train.jsonl").exists()

        rerun = CannedAnswers(photos["script"])
        with BackgroundServer(create_canned_openai_app(rerun, "vlm")) as second:
            main(
                [
                    *args[3:-4],
                    "--backend.init_args.base_url",
                    f"{second.url}/v1",
                    "--backend.init_args.model",
                    "vlm",
                ]
            )
    assert not set(finished) & set(rerun.asked)  # finished images were not asked again
    for split in ("train", "val"):
        assert (out / f"{split}.jsonl").read_text() == (reference / f"{split}.jsonl").read_text()


def test_datasets_folder_with_an_image_column(photos, tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [Image.open(photos["folder"] / f"good{i}.png") for i in range(NUM_GOOD)]
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict({"image": images, "caption": ["x"] * NUM_GOOD}, features=features)
    dataset.save_to_disk(str(tmp_path / "hf"))
    report = build_chains(
        str(tmp_path / "hf"), str(tmp_path / "out"), CannedBackend(CannedAnswers(photos["script"])), min_side=16,
        val_fraction=0.0,
    )  # fmt: skip
    assert [s["image"] for s in report["skipped"]] == ["row 2", "row 3"]  # undoing chain, duplicate chain
    lines = _manifest_lines(tmp_path / "out")
    assert [line["metadata"]["source"] for line in lines] == ["row 0", "row 1", "row 4"]
    for line in lines:  # the rows were written out with their exact pixels
        row = int(line["metadata"]["source"].split()[1])
        assert np.array_equal(
            np.asarray(Image.open(tmp_path / "out" / line["image"])), np.asarray(images[row])
        )
    with pytest.raises(ValueError, match="no column 'picture'"):
        build_chains(
            str(tmp_path / "hf"),
            str(tmp_path / "o2"),
            CannedBackend(CannedAnswers({})),
            image_column="picture",
        )


@pytest.mark.slow
def test_tiny_qwen3vl_garbage_is_rejected_in_process_and_through_the_openai_compat_server(
    photos, tmp_path, tiny_qwen3vl_path
):
    """The real model path end to end: a random VLM's answers reach the parser and are rejected, with the answer
    quoted in the reason; no chain is made up."""
    from mtflow.reward.backends import TransformersBackend
    from mtflow.reward.openai_backend import OpenAIBackend
    from mtflow.reward.openai_compat_server import create_openai_compat_app
    from mtflow.reward.server import BackgroundServer

    local = TransformersBackend(str(tiny_qwen3vl_path), max_batch_size=4)
    options = dict(max_new_tokens=12, max_attempts=1, batch_size=4)
    in_process = _build(photos, tmp_path / "local", local, **options)
    with BackgroundServer(create_openai_compat_app(local, "tiny")) as server:
        remote = OpenAIBackend(f"{server.url}/v1", "tiny", max_retries=0)
        try:
            served = _build(photos, tmp_path / "remote", remote, **options)
        finally:
            remote.close()
    for out, report in ((tmp_path / "local", in_process), (tmp_path / "remote", served)):
        assert _manifest_lines(out) == []
        reasons = {s["image"]: s["reason"] for s in report["skipped"]}
        for i in range(NUM_GOOD):
            assert reasons[f"good{i}.png"].startswith("VLM answer rejected: "), reasons[f"good{i}.png"]
        assert "benchmark_photo.png" in reasons and reasons["benchmark_photo.png"].startswith(
            "in the test set"
        )
    # the same greedy answers in process and over HTTP: the reasons quote them identically
    assert in_process["skipped"] == served["skipped"]
