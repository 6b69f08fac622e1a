"""JSONL edit-chain manifests (docs/design.md section 9): validation up front, then a map-style dataset of ``EditChain``.

One chain per line::

    {"id": "0", "image": "images/0_input_raw.jpg", "instructions": ["...", "...", "..."],
     "edit_types": ["subject_add", "count_change", "background_change"], "split": "test", "metadata": {...}}

``image`` is relative to the manifest's folder and must stay inside it (after following symbolic links): an absolute
path, a ``..`` that leaves the folder or a link to elsewhere is refused unless ``allow_outside_paths`` is set, so a
manifest from elsewhere cannot make training read (and send to the judge) arbitrary files. ``edit_types``, ``split``
and ``metadata`` are optional; any other key is an error (a typo such as ``"instruction"`` must not pass silently).
``load_manifest`` checks every line before anything trains and raises one ``ManifestError`` that lists every bad
line with its number; nothing is silently skipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.utils.data
from PIL import Image

from mtflow.data.records import EditChain

REQUIRED_KEYS = ("id", "image", "instructions")
OPTIONAL_KEYS = ("edit_types", "split", "metadata")
DEFAULT_MAX_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class ManifestProblem:
    """One thing wrong with one manifest line (line numbers start at 1)."""

    line: int
    message: str


class ManifestError(ValueError):
    """A manifest failed validation. ``problems`` holds every bad line; the message lists them all."""

    def __init__(self, path: Path, problems: Sequence[ManifestProblem], header: str | None = None):
        self.path = Path(path)
        self.problems = list(problems)
        lines = [header or f"manifest {self.path} has {len(self.problems)} problem(s):"]
        lines += [
            f"  {self.path}:{p.line}: {p.message}" if p.line > 0 else f"  {p.message}" for p in self.problems
        ]
        super().__init__("\n".join(lines))


@dataclass
class ManifestEntry:
    """One validated manifest line.

    Attributes:
        chain_id: the line's ``id``.
        image_path: absolute path of the source image.
        instructions: the K instructions, stripped of surrounding whitespace.
        edit_types: optional K edit-type labels.
        split: optional split name (``train``, ``val``, ``test``, ...).
        metadata: optional JSON object handed to the judge untouched.
        line: 1-based line number in the manifest (for error messages downstream).
    """

    chain_id: str
    image_path: Path
    instructions: list[str]
    edit_types: list[str] | None = None
    split: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    line: int = 0

    def to_json_dict(self, manifest_dir: Path | None = None) -> dict[str, Any]:
        """The manifest line as a dict; ``image`` relative to ``manifest_dir`` when given."""
        image = str(self.image_path)
        if manifest_dir is not None:
            image = Path(os.path.relpath(self.image_path, Path(manifest_dir).resolve())).as_posix()
        record: dict[str, Any] = {
            "id": self.chain_id,
            "image": image,
            "instructions": list(self.instructions),
        }
        if self.edit_types is not None:
            record["edit_types"] = list(self.edit_types)
        if self.split is not None:
            record["split"] = self.split
        if self.metadata:
            record["metadata"] = self.metadata
        return record


def write_manifest(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write manifest lines (dicts in the format above) as JSONL; returns the number of lines written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def _check_string_list(value: Any, name: str, num_turns: int | None, problems: list[str]) -> list[str] | None:
    """Validate a list of K non-empty strings; append messages to ``problems``; return the stripped list."""
    if not isinstance(value, list):
        problems.append(f"'{name}' must be a list of strings, got {type(value).__name__}")
        return None
    ok = True
    if num_turns is not None and len(value) != num_turns:
        problems.append(f"'{name}' has {len(value)} entries, expected {num_turns} (num_turns)")
        ok = False
    if num_turns is None and not value:
        problems.append(f"'{name}' is empty")
        ok = False
    cleaned = []
    for index, item in enumerate(value):
        if not isinstance(item, str):
            problems.append(f"'{name}'[{index}] must be a string, got {type(item).__name__}")
            ok = False
        elif not item.strip():
            problems.append(f"'{name}'[{index}] is empty")
            ok = False
        else:
            cleaned.append(item.strip())
    return cleaned if ok else None


OUTSIDE_HINT = "data.init_args.allow_outside_paths=true allows images outside the manifest's folder"


def outside_path_problem(image: str, base_dir: Path) -> str | None:
    """Why ``image`` (as written in a manifest in ``base_dir``) is not inside ``base_dir``, or None if it is."""
    if Path(image).is_absolute():
        return f"absolute image path {image!r} is refused ({OUTSIDE_HINT})"
    if os.path.normpath(image).split(os.sep)[0] == os.pardir:
        return f"image path {image!r} leaves the manifest's folder {base_dir} ({OUTSIDE_HINT})"
    resolved = (base_dir / image).resolve()
    if not resolved.is_relative_to(base_dir.resolve()):
        return f"image path {image!r} links outside the manifest's folder, to {resolved} ({OUTSIDE_HINT})"
    return None


def check_image(path: Path, max_pixels: int | None) -> str | None:
    """Open and fully decode an image; return a description of what is wrong, or None if it is usable."""
    if not path.is_file():
        return f"image file not found: {path}"
    try:
        with Image.open(path) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                return f"image {path} is oversized: {width}x{height} = {width * height} pixels > max_pixels {max_pixels}"
            if width == 0 or height == 0:
                return f"image {path} has zero size {width}x{height}"
            image.load()  # a truncated or corrupt file fails here, not at open()
    except Image.DecompressionBombError as error:
        return f"image {path} is oversized (PIL decompression-bomb guard): {error}"
    except Exception as error:  # noqa: BLE001 - any decoder failure means the file is unusable
        return f"image {path} cannot be decoded ({type(error).__name__}: {error})"
    return None


def load_manifest(
    path: str | Path,
    num_turns: int | None,
    *,
    split: str | None = None,
    check_images: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    allow_outside_paths: bool = False,
) -> list[ManifestEntry]:
    """Read and validate a JSONL manifest; raise one ``ManifestError`` listing every bad line.

    Args:
        path: the manifest file; ``image`` paths are resolved relative to its folder.
        num_turns: K every chain must have (None accepts any K >= 1).
        split: keep only lines with this ``split`` (every line is still checked for structure; images are opened
            only for the kept lines, since only they are used).
        check_images: open and fully decode every kept image (missing, corrupt and oversized images fail).
        max_pixels: largest accepted width * height (None: no limit besides PIL's decompression-bomb guard).
        allow_outside_paths: accept image paths outside the manifest's folder (absolute, ``..``, links out).

    Returns:
        The kept entries in file order.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    if num_turns is not None and num_turns < 1:
        raise ValueError(f"num_turns must be >= 1, got {num_turns}")
    base_dir = path.resolve().parent
    problems: list[ManifestProblem] = []
    entries: list[ManifestEntry] = []
    first_line_of_id: dict[str, int] = {}
    splits_seen: set[str | None] = set()

    with path.open("r", encoding="utf-8") as handle:
        raw_lines = handle.read().splitlines()  # a decode error here is a whole-file problem, raised as is

    for line_number, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue  # blank lines (e.g. a trailing newline) carry no chain
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as error:
            problems.append(ManifestProblem(line_number, f"bad JSON: {error.msg} at column {error.colno}"))
            continue
        if not isinstance(record, dict):
            problems.append(
                ManifestProblem(line_number, f"expected a JSON object, got {type(record).__name__}")
            )
            continue

        line_problems: list[str] = []
        missing = [key for key in REQUIRED_KEYS if key not in record]
        if missing:
            line_problems.append(f"missing key(s) {missing}")
        unknown = sorted(set(record) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
        if unknown:
            line_problems.append(
                f"unknown key(s) {unknown} (allowed: {list(REQUIRED_KEYS + OPTIONAL_KEYS)}; put extras in 'metadata')"
            )

        chain_id = record.get("id")
        if "id" in record:
            if not isinstance(chain_id, str) or not chain_id.strip():
                line_problems.append(f"'id' must be a non-empty string, got {chain_id!r}")
                chain_id = None
            elif chain_id in first_line_of_id:
                line_problems.append(
                    f"duplicate id {chain_id!r} (first seen on line {first_line_of_id[chain_id]})"
                )
            else:
                first_line_of_id[chain_id] = line_number

        image_value = record.get("image")
        if "image" in record and (not isinstance(image_value, str) or not image_value.strip()):
            line_problems.append(f"'image' must be a non-empty path string, got {image_value!r}")
            image_value = None

        instructions = None
        if "instructions" in record:
            instructions = _check_string_list(
                record["instructions"], "instructions", num_turns, line_problems
            )
        edit_types = None
        if record.get("edit_types") is not None:
            raw_instructions = record.get("instructions")
            expected = num_turns
            if expected is None and isinstance(raw_instructions, list):
                expected = len(raw_instructions)
            edit_types = _check_string_list(record["edit_types"], "edit_types", expected, line_problems)

        line_split = record.get("split")
        if line_split is not None and not isinstance(line_split, str):
            line_problems.append(f"'split' must be a string, got {line_split!r}")
        metadata = record.get("metadata", {})
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict):
            line_problems.append(f"'metadata' must be a JSON object, got {type(metadata).__name__}")

        kept = split is None or line_split == split
        splits_seen.add(line_split if isinstance(line_split, str) else None)
        if isinstance(image_value, str) and not allow_outside_paths:
            outside = outside_path_problem(image_value, base_dir)
            if outside is not None:
                line_problems.append(outside)
                image_value = None  # never opened
        if kept and check_images and isinstance(image_value, str):
            image_problem = check_image(base_dir / image_value, max_pixels)
            if image_problem is not None:
                line_problems.append(image_problem)

        if line_problems:
            problems.extend(ManifestProblem(line_number, message) for message in line_problems)
            continue
        if kept:
            entries.append(
                ManifestEntry(
                    chain_id=chain_id,
                    image_path=(base_dir / image_value).resolve(),
                    instructions=instructions,
                    edit_types=edit_types,
                    split=line_split,
                    metadata=metadata,
                    line=line_number,
                )
            )

    if problems:
        raise ManifestError(path, problems)
    if not entries:
        if split is not None:
            present = sorted(str(s) for s in splits_seen)
            raise ManifestError(
                path, [ManifestProblem(0, f"no chain has split {split!r} (splits present: {present})")]
            )
        raise ManifestError(path, [ManifestProblem(0, "the manifest holds no chains")])
    return entries


def load_source_image(path: Path) -> Image.Image:
    """Load an image fully into memory as RGB (the file handle is closed on return)."""
    with Image.open(path) as image:
        return image.convert("RGB")


class ManifestDataset(torch.utils.data.Dataset):
    """Map-style dataset of ``EditChain`` read from a JSONL manifest (validated in full at construction).

    Use ``mtflow.data.records.collate_chains`` as the DataLoader's ``collate_fn``.
    """

    def __init__(
        self,
        manifest: str | Path,
        num_turns: int | None,
        split: str | None = None,
        check_images: bool = True,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        allow_outside_paths: bool = False,
    ):
        """
        Args:
            manifest: path of the JSONL manifest.
            num_turns: K every chain must have (None accepts any K >= 1).
            split: keep only chains of this split (None keeps all).
            check_images: decode every image once at construction so bad files fail before training.
            max_pixels: largest accepted source image (width * height); None for no limit.
            allow_outside_paths: accept image paths outside the manifest's folder (absolute, ``..``, links out).
        """
        self.manifest = Path(manifest)
        self.num_turns = num_turns
        self.entries = load_manifest(
            self.manifest,
            num_turns,
            split=split,
            check_images=check_images,
            max_pixels=max_pixels,
            allow_outside_paths=allow_outside_paths,
        )
        self._sizes: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def image_size(self, index: int) -> tuple[int, int]:
        """(width, height) of chain ``index``'s source image, read from the file header once (for aspect buckets,
        without decoding the image)."""
        if index not in self._sizes:
            entry = self.entries[index]
            try:
                with Image.open(entry.image_path) as image:
                    self._sizes[index] = image.size
            except Exception as error:  # name the file and line: the image may have changed since validation
                raise RuntimeError(
                    f"{self.manifest}:{entry.line}: cannot read image {entry.image_path} "
                    f"({type(error).__name__}: {error})"
                ) from error
        return self._sizes[index]

    def __getitem__(self, index: int) -> EditChain:
        entry = self.entries[index]
        try:
            source = load_source_image(entry.image_path)
        except Exception as error:  # name the file and line: the image may have changed since validation
            raise RuntimeError(
                f"{self.manifest}:{entry.line}: cannot load image {entry.image_path} "
                f"({type(error).__name__}: {error})"
            ) from error
        return EditChain(
            chain_id=entry.chain_id,
            source=source,
            instructions=list(entry.instructions),
            edit_types=list(entry.edit_types) if entry.edit_types is not None else None,
            metadata=dict(entry.metadata),
        )


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ManifestDataset",
    "ManifestEntry",
    "ManifestError",
    "ManifestProblem",
    "check_image",
    "load_manifest",
    "load_source_image",
    "outside_path_problem",
    "write_manifest",
]
