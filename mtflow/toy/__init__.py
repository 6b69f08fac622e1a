"""The toy edit world: synthetic multi-turn editing with an exact judge, for CPU runs that visibly learn.

- ``mtflow.toy.world``: scenes, renderer, edits, instructions, K-turn chains, train / held-out splits.
- ``mtflow.toy.judge``: ``ToyJudge``, the exact ``Scorer`` (IF / CC from the ground-truth scene graphs).
- ``mtflow.toy.data``: ``ToyChainDataset`` (``EditChain``s) and ``ToyPairDataset`` (single-turn pairs).
- ``mtflow.toy.vae``: the small ``AutoencoderKL`` trained on world images (diffusers imported lazily).
"""

from mtflow.toy.data import ToyChainDataset, ToyPair, ToyPairDataset, collate_toy_pairs
from mtflow.toy.judge import SUCCESS_THRESHOLD, ToyJudge
from mtflow.toy.world import EDIT_TYPES, Edit, RenderSpec, Scene, ToyObject, ToyWorld

__all__ = [
    "EDIT_TYPES",
    "SUCCESS_THRESHOLD",
    "Edit",
    "RenderSpec",
    "Scene",
    "ToyChainDataset",
    "ToyJudge",
    "ToyObject",
    "ToyPair",
    "ToyPairDataset",
    "ToyWorld",
    "collate_toy_pairs",
]
