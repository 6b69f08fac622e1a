"""Image sizes shared by the editors: the one size a batch of sources is edited at (each editor's aspect rule
lives in its own ``edit_size``)."""

from __future__ import annotations

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
