"""One seed for a run: a module's or data module's ``seed=None`` follows ``seed_everything``.

LightningCLI seeds the process with ``seed_everything`` before it builds the model and the data module, and Lightning
records that seed in the ``PL_GLOBAL_SEED`` environment variable. Reading it there means a sweep axis (or a command
line) that sets ``seed_everything`` alone changes every random draw of the run: rollout noise, update order, held-out
sampling noise and the training order, not only the LoRA initialisation.
"""

from __future__ import annotations

import os

GLOBAL_SEED_VARIABLE = "PL_GLOBAL_SEED"  # set by lightning's seed_everything


def resolve_seed(seed: int | None) -> int:
    """``seed`` when given; otherwise the seed ``seed_everything`` set in this process; otherwise 0."""
    if seed is not None:
        return int(seed)
    value = os.environ.get(GLOBAL_SEED_VARIABLE)
    return int(value) if value else 0
