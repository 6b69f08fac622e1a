"""JSONL manifest: validation with line numbers before training, and the EditChain dataset."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtflow.data.manifest import ManifestDataset, ManifestEntry, ManifestError, load_manifest, write_manifest
from mtflow.data.records import EditChain, collate_chains


def _noise_image(path: Path, size=(24, 16), seed=0, mode="RGB") -> np.ndarray:
    """Save a random image losslessly (PNG) and return its pixels as written."""
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode=mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return pixels


def _lines(path: Path, records) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path


def test_valid_manifest_yields_edit_chains_with_the_files_pixels(tmp_path):
    images = tmp_path / "imgs"
    pixels_a = _noise_image(images / "a.png", seed=1)
    pixels_b = _noise_image(images / "b.png", size=(10, 12), seed=2, mode="L")  # greyscale -> RGB
    manifest_dir = tmp_path / "manifests"
    manifest_dir.mkdir()
    manifest = _lines(
        manifest_dir / "m.jsonl",
        [
            {
                "id": "a",
                "image": "../imgs/a.png",
                "instructions": [" make it red ", "add a cat"],
                "edit_types": ["color_alter", "subject_add"],
                "split": "train",
                "metadata": {"truth": [1, 2]},
            },
            "",  # blank lines are allowed
            {"id": "b", "image": str(images / "b.png"), "instructions": ["remove the dog", "turn it blue"]},
        ],
    )
    dataset = ManifestDataset(manifest, num_turns=2, allow_outside_paths=True)  # ../ and absolute paths
    assert len(dataset) == 2
    first, second = dataset[0], dataset[1]
    assert isinstance(first, EditChain)
    assert first.chain_id == "a" and first.instructions == ["make it red", "add a cat"]
    assert first.edit_types == ["color_alter", "subject_add"] and first.metadata == {"truth": [1, 2]}
    assert np.array_equal(np.asarray(first.source), pixels_a)
    assert second.edit_types is None and second.metadata == {}
    assert second.source.mode == "RGB" and second.source.size == (10, 12)
    assert np.array_equal(np.asarray(second.source)[..., 1], pixels_b[..., 0])
    assert dataset.entries[0].line == 1 and dataset.entries[1].line == 3

    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_chains)
    batch = next(iter(loader))
    assert [chain.chain_id for chain in batch] == ["a", "b"]


def test_round_trip_through_write_manifest(tmp_path):
    _noise_image(tmp_path / "img" / "x.png")
    entry = ManifestEntry(
        chain_id="x",
        image_path=(tmp_path / "img" / "x.png").resolve(),
        instructions=["one", "two", "three"],
        edit_types=["a", "b", "c"],
        split="val",
        metadata={"k": "v"},
    )
    out = tmp_path / "out" / "m.jsonl"
    assert write_manifest(out, [entry.to_json_dict(out.parent)]) == 1
    assert json.loads(out.read_text())["image"] == "../img/x.png"
    (loaded,) = load_manifest(out, 3, allow_outside_paths=True)
    assert loaded.chain_id == "x" and loaded.image_path == entry.image_path
    assert (loaded.instructions, loaded.edit_types, loaded.split, loaded.metadata) == (
        entry.instructions,
        entry.edit_types,
        entry.split,
        entry.metadata,
    )


def test_every_bad_line_is_reported_with_its_line_number(tmp_path):
    _noise_image(tmp_path / "ok.png")
    _noise_image(tmp_path / "big.png", size=(40, 40))
    (tmp_path / "garbage.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(
        buffer, format="JPEG"
    )
    (tmp_path / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    three = ["a", "b", "c"]
    manifest = _lines(
        tmp_path / "bad.jsonl",
        [
            {"id": "good", "image": "ok.png", "instructions": three},  # 1 fine
            {"id": "missing", "image": "nope.png", "instructions": three},  # 2
            {"id": "corrupt", "image": "garbage.jpg", "instructions": three},  # 3
            {"id": "trunc", "image": "truncated.jpg", "instructions": three},  # 4
            {"id": "big", "image": "big.png", "instructions": three},  # 5 oversized (max_pixels 1000)
            {"id": "two", "image": "ok.png", "instructions": ["a", "b"]},  # 6 K mismatch
            {"id": "empty", "image": "ok.png", "instructions": ["a", "  ", "c"]},  # 7 empty instruction
            {"id": "good", "image": "ok.png", "instructions": three},  # 8 duplicate id
            '{"id": "broken", "image": ',  # 9 bad JSON
            {"id": "typo", "image": "ok.png", "instruction": three},  # 10 missing key + unknown key
            {"id": "types", "image": "ok.png", "instructions": three, "edit_types": ["x"]},  # 11 types K
            "[1, 2]",  # 12 not an object
            {"id": 7, "image": "ok.png", "instructions": three},  # 13 id not a string
        ],
    )
    with pytest.raises(ManifestError) as caught:
        load_manifest(manifest, 3, max_pixels=1000)
    error = caught.value
    lines = sorted({problem.line for problem in error.problems})
    assert lines == list(range(2, 14))
    by_line = {}
    for problem in error.problems:
        by_line.setdefault(problem.line, []).append(problem.message)
    expectations = {
        2: "not found",
        3: "cannot be decoded",
        4: "cannot be decoded",
        5: "oversized: 40x40 = 1600 pixels > max_pixels 1000",
        6: "has 2 entries, expected 3",
        7: "'instructions'[1] is empty",
        8: "duplicate id 'good' (first seen on line 1)",
        9: "bad JSON",
        10: "missing key(s) ['instructions']",
        11: "'edit_types' has 1 entries, expected 3",
        12: "expected a JSON object",
        13: "'id' must be a non-empty string",
    }
    for line, fragment in expectations.items():
        assert any(fragment in message for message in by_line[line]), (line, by_line[line])
    assert any("unknown key(s) ['instruction']" in m for m in by_line[10])
    # The message names the file and every line, so a user can fix all of them in one pass.
    for line in range(2, 14):
        assert re.search(rf"bad\.jsonl:{line}: ", str(error)), line


def test_split_filter_and_images_checked_only_for_kept_lines(tmp_path):
    _noise_image(tmp_path / "ok.png")
    manifest = _lines(
        tmp_path / "m.jsonl",
        [
            {"id": "t1", "image": "ok.png", "instructions": ["a"], "split": "train"},
            {"id": "v1", "image": "gone.png", "instructions": ["b"], "split": "val"},
            {"id": "t2", "image": "ok.png", "instructions": ["c"], "split": "train"},
        ],
    )
    assert [e.chain_id for e in load_manifest(manifest, 1, split="train")] == ["t1", "t2"]
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: image file not found"):
        load_manifest(manifest, 1, split="val")
    with pytest.raises(
        ManifestError, match=r"no chain has split 'test' \(splits present: \['train', 'val'\]\)"
    ):
        load_manifest(manifest, 1, split="test")


def test_structure_is_still_checked_on_lines_of_other_splits(tmp_path):
    _noise_image(tmp_path / "ok.png")
    manifest = _lines(
        tmp_path / "m.jsonl",
        [
            {"id": "t1", "image": "ok.png", "instructions": ["a", "b"], "split": "train"},
            {"id": "v1", "image": "ok.png", "instructions": ["b"], "split": "val"},
        ],
    )
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: 'instructions' has 1 entries, expected 2"):
        load_manifest(manifest, 2, split="train")


def test_without_image_checks_a_missing_file_fails_at_load_time_naming_the_line(tmp_path):
    manifest = _lines(tmp_path / "m.jsonl", [{"id": "x", "image": "later.png", "instructions": ["a"]}])
    dataset = ManifestDataset(manifest, num_turns=1, check_images=False)
    assert len(dataset) == 1
    with pytest.raises(RuntimeError, match=r"m\.jsonl:1: cannot load image .*later\.png"):
        dataset[0]


def test_empty_or_absent_manifest_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        load_manifest(tmp_path / "absent.jsonl", 3)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ManifestError, match="holds no chains"):
        load_manifest(tmp_path / "empty.jsonl", 3)


def test_any_turn_count_when_num_turns_is_none(tmp_path):
    _noise_image(tmp_path / "ok.png")
    manifest = _lines(
        tmp_path / "m.jsonl",
        [
            {"id": "one", "image": "ok.png", "instructions": ["a"], "edit_types": ["t"]},
            {"id": "three", "image": "ok.png", "instructions": ["a", "b", "c"], "edit_types": ["t", "u"]},
        ],
    )
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: 'edit_types' has 2 entries, expected 3"):
        load_manifest(manifest, None)
