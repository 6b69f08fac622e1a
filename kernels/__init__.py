"""Fused Triton kernels with torch references (imported as ``mtflow.kernels``).

Every public function takes ``backend`` ("auto": Triton for CUDA tensors when triton imports, torch otherwise;
"torch"; "triton") and has the signature and result of its torch reference in ``mtflow.sampling`` /
``mtflow.losses``. Importing this package does not import triton; the kernels are compiled on first use.
"""

from .backend import Backend, triton_importable, use_triton
from .losses import (
    fused_gaussian_mean_kl,
    fused_grpo_terms,
    fused_nft_reductions,
    gaussian_mean_kl,
    grpo_loss,
    nft_loss,
)
from .sde import sde_step, transition_log_prob

__all__ = [
    "Backend",
    "fused_gaussian_mean_kl",
    "fused_grpo_terms",
    "fused_nft_reductions",
    "gaussian_mean_kl",
    "grpo_loss",
    "nft_loss",
    "sde_step",
    "transition_log_prob",
    "triton_importable",
    "use_triton",
]
