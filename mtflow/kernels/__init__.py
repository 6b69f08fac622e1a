"""Fused Triton kernels with torch references (imported as ``mtflow.kernels``).

Every public function takes ``backend`` ("auto": Triton for CUDA tensors when triton imports, torch otherwise;
"torch"; "triton") and has the signature and result of its torch reference in ``mtflow.sampling`` /
``mtflow.losses``. Importing this package does not import triton; the kernels are compiled on first use.
"""

from pathlib import Path as _Path

# The modules live in the repository's top-level ``kernels/`` folder (the project's layout), which deliberately has
# no ``__init__.py``: whenever the repository root is on ``sys.path`` (``python -m`` / ``python -c`` from the
# checkout, subprocesses started there) a package at ``kernels/`` would shadow Hugging Face's ``kernels``
# distribution, which transformers imports. A wheel copies the modules next to this file (``setup.py``); a checkout
# (editable install, or the root on ``sys.path``) reaches them through ``__path__``.
_checkout = _Path(__file__).resolve().parents[2] / "kernels"
if not _Path(__file__).with_name("sde.py").exists() and (_checkout / "sde.py").is_file():
    __path__.append(str(_checkout))

from .backend import Backend, triton_importable, use_triton  # noqa: E402
from .losses import (  # noqa: E402
    fused_gaussian_mean_kl,
    fused_grpo_terms,
    fused_nft_reductions,
    gaussian_mean_kl,
    grpo_loss,
    nft_loss,
)
from .sde import sde_step, transition_log_prob  # noqa: E402

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
