"""EdiVal-Bench CSV -> manifest, against the real instruction file (read-only, shared with the project)."""

from __future__ import annotations

import ast
import csv
import json
import os
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from mtflow.data.edival import (
    EdivalFormatError,
    MissingImagesError,
    clean_instruction,
    convert_edival,
    main,
    read_edival_chains,
)
from mtflow.data.manifest import ManifestDataset

REPO = Path(__file__).resolve().parents[1]
EDIVAL_CSV = Path(
    os.environ.get(
        "MTFLOW_EDIVAL_CSV",
        REPO / "tests" / "data" / "edival" / "oai_instruction_generation_output.csv",  # a verbatim copy
    )
)
needs_csv = pytest.mark.skipif(
    not EDIVAL_CSV.is_file(),
    reason=f"EdiVal CSV not found at {EDIVAL_CSV} (set MTFLOW_EDIVAL_CSV to its path to run these tests)",
)


def _raw_rows():
    with EDIVAL_CSV.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def edival_images(tmp_path_factory):
    """A folder with a tiny JPEG for every EdiVal image id (the real images are distributed separately)."""
    folder = tmp_path_factory.mktemp("edival_images")
    ids = sorted({row["image_index"] for row in _raw_rows()}, key=int) if EDIVAL_CSV.is_file() else []
    for image_id in ids:
        Image.new("RGB", (8, 8), (int(image_id) % 256, 10, 20)).save(folder / f"{image_id}_input_raw.jpg")
    return folder


def test_clean_instruction_strips_only_wrapping_quotes():
    assert clean_instruction('"Change the count of X to 4"') == "Change the count of X to 4"
    assert clean_instruction('""Change the count of X to 4""') == "Change the count of X to 4"
    assert clean_instruction("  Add a cat ") == "Add a cat"
    assert (
        clean_instruction('Change the material of mouse to "wood"')
        == 'Change the material of mouse to "wood"'
    )
    assert clean_instruction('"wood" and "gold"') == '"wood" and "gold"'


@needs_csv
def test_all_rows_become_572_three_turn_chains_matching_the_raw_file():
    chains, num_rows = read_edival_chains(EDIVAL_CSV)
    assert num_rows == 1716
    assert len(chains) == 572 and len({c["id"] for c in chains}) == 572
    assert all(len(c["instructions"]) == 3 and len(c["edit_types"]) == 3 for c in chains)

    # Independent reading of the turns=3 rows: each chain equals its row, wrapping quotes removed.
    full_rows = {row["image_index"]: row for row in _raw_rows() if row["turns"] == "3"}
    for chain in chains:
        row = full_rows[chain["id"]]
        raw = ast.literal_eval(row["instructions"])
        assert chain["instructions"] == [s[1:-1] if s.startswith('"') and s.endswith('"') else s for s in raw]
        assert chain["edit_types"] == ast.literal_eval(row["task_type"])
    assert not any(s.startswith('"') for c in chains for s in c["instructions"])

    first = chains[0]  # image 0, read off the file by eye
    assert first["instructions"] == [
        "Add bench on the left of painted white leaf pattern",
        "Change the count of painted white leaf pattern to 4",  # stored as '""Change ... to 4""' in the CSV
        "Change the background to park, remain the painted white leaf pattern, bench unchanged",
    ]
    assert first["edit_types"] == ["subject_add", "count_change", "background_change"]
    assert first["metadata"]["bg_consistency"] == [True, True, False]
    assert first["metadata"]["unchanged_objects"] == [["painted white leaf pattern"], [], []]
    # Inner quotes are content, not a quirk.
    assert any('"wood"' in s for c in chains for s in c["instructions"])
    counts = Counter(t for c in chains for t in c["edit_types"])
    assert sum(counts.values()) == 3 * 572 and len(counts) == 9


@needs_csv
def test_convert_writes_a_manifest_the_dataset_loads(tmp_path, edival_images):
    out = tmp_path / "edival" / "test.jsonl"
    result = convert_edival(EDIVAL_CSV, edival_images, out, split="test")
    assert (result.num_rows, result.num_chains, result.num_written) == (1716, 572, 572)
    assert result.missing_images == {} and result.manifest_path == out
    lines = out.read_text().splitlines()
    assert len(lines) == 572
    first = json.loads(lines[0])
    assert first["split"] == "test" and not Path(first["image"]).is_absolute()
    # the images folder is not below the manifest's: its paths leave the folder, refused unless allowed
    with pytest.raises(ValueError, match="leaves the manifest's folder"):
        ManifestDataset(out, num_turns=3, split="test")
    dataset = ManifestDataset(out, num_turns=3, split="test", allow_outside_paths=True)
    assert len(dataset) == 572
    chain = dataset[3]
    assert chain.chain_id == "3" and chain.source.size == (8, 8)
    assert chain.source.getpixel((4, 4))[0] == pytest.approx(3, abs=3)  # the id-coloured JPEG of image 3


@needs_csv
def test_missing_images_are_all_reported_and_optionally_skipped(tmp_path, edival_images, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    absent = {"0", "17", "605"}
    for image in edival_images.iterdir():
        if image.name.split("_")[0] not in absent:
            (partial / image.name).symlink_to(image)
    out = tmp_path / "m.jsonl"
    with pytest.raises(MissingImagesError) as caught:
        convert_edival(EDIVAL_CSV, partial, out)
    assert set(caught.value.missing) == absent
    assert "3 of 572 EdiVal source images are missing" in str(caught.value)
    for image_id in absent:
        assert f"{image_id}_input_raw.jpg" in str(caught.value)
    assert not out.exists()

    result = convert_edival(EDIVAL_CSV, partial, out, allow_missing_images=True)
    assert result.num_written == 569 and set(result.missing_images) == absent
    assert len(out.read_text().splitlines()) == 569

    # The CLI: failure exit code with the list on stderr, success with the flag.
    assert main(["--csv", str(EDIVAL_CSV), "--images", str(partial), "--out", str(tmp_path / "c.jsonl")]) == 1
    assert "3 of 572 EdiVal source images are missing" in capsys.readouterr().err
    code = main(
        [
            "--csv",
            str(EDIVAL_CSV),
            "--images",
            str(partial),
            "--out",
            str(tmp_path / "c.jsonl"),
            "--allow-missing-images",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0 and "wrote 569" in captured.out and "skipped 3 chain(s)" in captured.err


@needs_csv
def test_corrupt_image_is_caught_when_checking(tmp_path, edival_images):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for image in edival_images.iterdir():
        (folder / image.name).symlink_to(image)
    (folder / "4_input_raw.jpg").unlink()
    (folder / "4_input_raw.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(
        MissingImagesError, match=r"1 of 572 EdiVal source images are unreadable:\n  chain 4: "
    ):
        convert_edival(EDIVAL_CSV, folder, tmp_path / "m.jsonl", check_images=True)


def test_bad_rows_are_listed_with_line_numbers(tmp_path):
    header = "image_index,turns,task_type,instructions,format_instructions,bg_consistency,unchanged_objects,available_objects,all_objects\n"
    rows = [
        "0,1,['a'],['x'],['x'],True,[],[],[]",
        "0,2,\"['a', 'b']\",\"['x', 'DIFFERENT']\",\"['x', 'y']\",True,[],[],[]",  # line 3: not a prefix
        "0,3,\"['a', 'b', 'c']\",\"['x', 'y', 'z']\",\"['x', 'y', 'z']\",False,[],[],[]",
        "1,1,['a'],[not a literal,['x'],True,[],[],[]",  # line 5: unparsable
        "1,3,\"['a', 'b', 'c']\",\"['x', 'y']\",\"['x', 'y', 'z']\",True,[],[],[]",  # line 6: 2 instructions
    ]
    path = tmp_path / "bad.csv"
    path.write_text(header + "\n".join(rows) + "\n")
    with pytest.raises(EdivalFormatError) as caught:
        read_edival_chains(path)
    message = str(caught.value)
    assert "bad.csv:3: image 0 turns = 2 instructions are not a prefix" in message
    assert "bad.csv:5: cannot parse row" in message
    assert "bad.csv:6: image 1 turns = 3 but instructions has 2 entries" in message
    assert "image 1 has no row for turns [1, 2]" in message  # its turns=1 row was unparsable
    assert "4 problem(s)" in message
