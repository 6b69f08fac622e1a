"""Image sizes shared by the editors: which size a batch of sources is edited at, and the area rules of the stock
pipelines that the editors' aspect buckets follow (each editor's own rule lives in its ``edit_size``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image

from mtflow.models.base import ImageSize


def common_edit_size(policy, images: Sequence[Image.Image]) -> ImageSize:
    """The one ``policy.edit_size`` of ``images`` (a rollout edits one bucket at a time); a ValueError names them
    all otherwise."""
    sizes = {tuple(policy.edit_size(image.size)) for image in images}
    if len(sizes) != 1:
        raise ValueError(
            f"the images of one batch must share one edit size, got {sorted(sizes)} (width, height): batch chains "
            "by edit size (mtflow's data modules group them by the policy's buckets)"
        )
    return sizes.pop()


def area_dimensions(area: int, ratio: float, multiple: int = 32) -> ImageSize:
    """(width, height) of about ``area`` pixels with aspect ratio ``ratio`` (width / height), each rounded to the
    nearest ``multiple``: the rule of Qwen-Image-Edit's ``calculate_dimensions``."""
    width = math.sqrt(area * ratio)
    height = width / ratio
    return round(width / multiple) * multiple, round(height / multiple) * multiple
