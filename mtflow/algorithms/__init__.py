"""RL algorithms: ``model.algorithm: {class_path: mtflow.algorithms.GRPO | mtflow.algorithms.NFT, init_args: ...}``
(or ``--model.algorithm NFT`` on the command line)."""

from mtflow.algorithms.base import Algorithm, UpdateContext
from mtflow.algorithms.grpo import GRPO
from mtflow.algorithms.nft import NFT, NFTSamples

__all__ = ["GRPO", "NFT", "Algorithm", "NFTSamples", "UpdateContext"]
