"""Manifest image paths stay inside the manifest's folder: an absolute path, a ``..`` that leaves it and a symbolic
link to elsewhere are refused (and never opened) unless ``allow_outside_paths`` is set; paths inside it, including
links that stay inside, load as before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtflow.data.manifest import ManifestError, load_manifest
from mtflow.data.module import ManifestDataModule


def _image(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)
    return path


def _manifest(folder: Path, images: list[str]) -> Path:
    lines = [
        json.dumps({"id": f"c{i}", "image": image, "instructions": ["a", "b"]})
        for i, image in enumerate(images)
    ]
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def layout(tmp_path):
    """data/ holds the manifest and images/; secret.png sits next to data/, outside it."""
    data = tmp_path / "data"
    _image(data / "images" / "ok.png", 10)
    _image(data / "images" / "sub" / "ok2.png", 20)
    secret = _image(tmp_path / "secret.png", 250)
    (data / "images" / "inside_link.png").symlink_to(data / "images" / "ok.png")
    (data / "images" / "outside_link.png").symlink_to(secret)
    (data / "linked_dir").symlink_to(tmp_path)  # a folder link leading out
    return data, secret


def test_paths_inside_the_folder_load(layout):
    data, _ = layout
    images = ["images/ok.png", "images/sub/ok2.png", "images/sub/../ok.png", "./images/inside_link.png"]
    entries = load_manifest(_manifest(data, images), 2)
    assert [e.image_path for e in entries] == [
        (data / "images" / "ok.png").resolve(),
        (data / "images" / "sub" / "ok2.png").resolve(),
        (data / "images" / "ok.png").resolve(),
        (data / "images" / "inside_link.png").resolve(),
    ]


def test_paths_leaving_the_folder_are_refused_line_by_line_and_never_opened(layout, monkeypatch):
    data, secret = layout
    opened = []
    import mtflow.data.manifest as manifest_module

    original = manifest_module.check_image
    monkeypatch.setattr(
        manifest_module, "check_image", lambda p, m: (opened.append(Path(p)), original(p, m))[1]
    )
    images = [
        "images/ok.png",
        str(secret),  # absolute
        "../secret.png",  # leaves with ..
        "images/../../secret.png",
        "images/outside_link.png",  # a file link to elsewhere
        "linked_dir/secret.png",  # a folder link to elsewhere
    ]
    with pytest.raises(ManifestError) as error:
        load_manifest(_manifest(data, images), 2)
    problems = {p.line: p.message for p in error.value.problems}
    assert sorted(problems) == [2, 3, 4, 5, 6]
    assert problems[2].startswith(f"absolute image path {str(secret)!r} is refused")
    assert "leaves the manifest's folder" in problems[3] and "leaves the manifest's folder" in problems[4]
    assert f"links outside the manifest's folder, to {secret.resolve()}" in problems[5]
    assert f"links outside the manifest's folder, to {secret.resolve()}" in problems[6]
    assert all("allow_outside_paths=true" in m for m in problems.values())
    assert opened == [data / "images" / "ok.png"]  # the refused files were never opened


def test_the_option_allows_them_and_the_data_module_passes_it_on(layout):
    data, secret = layout
    manifest = _manifest(data, [str(secret), "../secret.png", "images/outside_link.png"])
    entries = load_manifest(manifest, 2, allow_outside_paths=True)
    assert {e.image_path for e in entries} == {secret.resolve()}
    refused = ManifestDataModule(train_manifest=str(manifest), num_turns=2)
    with pytest.raises(ManifestError, match="allow_outside_paths"):
        refused.setup("fit")
    allowed = ManifestDataModule(train_manifest=str(manifest), num_turns=2, allow_outside_paths=True)
    allowed.setup("fit")
    assert len(allowed.sources["train"]) == 3
    assert allowed.sources["train"][0].source.getpixel((0, 0)) == (250, 250, 250)
