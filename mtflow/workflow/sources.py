"""Where source images come from: a folder, a JSONL list (or chain manifest), or a Hugging Face ``datasets`` folder
(``save_to_disk``) with an image column; and the content hash that identifies an image whatever its file."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class SourceImage:
    """One candidate source image.

    Attributes:
        key: how the user names it (a path relative to the source, or ``row <i>`` of a dataset).
        path: its file, when it has one (None for a dataset row, whose bytes live in Arrow files).
        opener: returns the image (may raise on a corrupt file).
    """

    key: str
    path: Path | None
    opener: Callable[[], Image.Image]

    def load(self, max_pixels: int | None = None) -> Image.Image:
        """The decoded RGB image; raises ``ValueError`` with a readable reason when it cannot be used."""
        try:
            image = self.opener()
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ValueError(f"oversized: {width}x{height} > max_pixels {max_pixels}")
            image.load()  # a truncated file fails here, not at open()
            return image.convert("RGB")
        except ValueError:
            raise
        except Exception as error:  # noqa: BLE001 - any decoder failure means the image is unusable
            raise ValueError(f"cannot be decoded ({type(error).__name__}: {error})") from None


def pixel_hash(image: Image.Image) -> str:
    """sha256 of the RGB pixels and the size: the same picture saved as PNG or re-named hashes the same."""
    rgb = np.asarray(image.convert("RGB"))
    return hashlib.sha256(f"{rgb.shape}".encode() + rgb.tobytes()).hexdigest()


def _file(path: Path) -> Callable[[], Image.Image]:
    return lambda: Image.open(path)


def _folder(root: Path) -> Iterator[SourceImage]:
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        yield SourceImage(path.relative_to(root).as_posix(), path, _file(path))


def _jsonl(path: Path) -> Iterator[SourceImage]:
    """One image per line: ``{"image": "relative/or/absolute.jpg"}`` (a chain manifest qualifies) or a JSON
    string."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error})") from None
        name = record.get("image") if isinstance(record, dict) else record
        if not isinstance(name, str) or not name:
            raise ValueError(f'{path}:{number}: needs an "image" path')
        image_path = Path(name) if Path(name).is_absolute() else path.parent / name
        yield SourceImage(name, image_path, _file(image_path))


def _dataset_row_opener(dataset, index: int, column: str) -> Callable[[], Image.Image]:
    def open_row() -> Image.Image:
        value = dataset[index][column]
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict) and value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        if isinstance(value, dict) and value.get("path"):
            return Image.open(value["path"])
        raise ValueError(f"column {column!r} holds {type(value).__name__}, not an image")

    return open_row


def _dataset(root: Path, column: str) -> Iterator[SourceImage]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{root} is a Hugging Face datasets folder: pip install datasets") from None
    dataset = datasets.load_from_disk(str(root))
    if isinstance(dataset, datasets.DatasetDict):
        raise ValueError(f"{root} holds splits {list(dataset)}: point at one split's folder")
    if column not in dataset.column_names:
        raise ValueError(f"{root}: no column {column!r} (columns: {dataset.column_names})")
    for index in range(len(dataset)):
        yield SourceImage(f"row {index}", None, _dataset_row_opener(dataset, index, column))


def is_dataset_folder(path: Path) -> bool:
    """A ``datasets`` ``save_to_disk`` folder (``dataset_info.json`` + ``state.json``, or a ``DatasetDict``)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def iter_sources(source: str | Path, image_column: str = "image") -> Iterator[SourceImage]:
    """Every candidate image of ``source`` in a stable order.

    Args:
        source: a folder of images (searched recursively, sorted by path), a ``.jsonl`` list or manifest, or a
            ``datasets`` folder written by ``save_to_disk``.
        image_column: the image column of a ``datasets`` folder.
    """
    path = Path(source)
    if path.is_dir():
        return _dataset(path, image_column) if is_dataset_folder(path) else _folder(path)
    if path.is_file() and path.suffix == ".jsonl":
        return _jsonl(path)
    raise ValueError(f"{source}: expected a folder of images, a .jsonl list or a datasets folder")
