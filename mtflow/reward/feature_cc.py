"""Content consistency from image-feature similarity (DINOv2 / DINOv3 through transformers ``AutoModel``).

For turn k the score compares y^(k) with a reference image, y0 (``reference="source"``, docs/design.md section 4) or
y^(k-1) (``"previous"``): s = max(0, cos(f(ref), f(y^(k)))) of the models' pooled embeddings, reported as
1 + 4 s on the shared 1-5 scale (``mtflow.reward.base``).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from typing import Any, Literal

import torch
from PIL import Image

from mtflow.dtypes import DTYPES
from mtflow.reward.base import ScoringItem
from mtflow.reward.judge import TurnScorer, TurnScores
from mtflow.reward.wire import check_same_turns

log = logging.getLogger(__name__)


def similarity_to_score(cosine: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [...] -> CC score [...] on the 1-5 scale: 1 + 4 * clamp(cos, 0, 1)."""
    return 1.0 + 4.0 * cosine.clamp(0.0, 1.0)


class FeatureSimilarityCC(TurnScorer):
    """CC score from the cosine similarity of vision-backbone embeddings."""

    def __init__(
        self,
        model: str = "facebook/dinov2-base",
        device: str = "cpu",
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        reference: Literal["source", "previous"] = "source",
        pooling: Literal["pooler", "cls", "mean"] = "pooler",
        batch_size: int = 32,
    ) -> None:
        """
        Args:
            model: hub id or folder of the backbone (``facebook/dinov2-base``, a DINOv3 ViT, ...).
            device: torch device to run on.
            dtype: weight and activation dtype.
            reference: compare turn k's output with the source image y0 or with the previous turn's output.
            pooling: ``pooler`` (the model's pooled output), ``cls`` (first token) or ``mean`` (all patch tokens).
            batch_size: images per forward pass.
        """
        from transformers import AutoImageProcessor, AutoModel

        if reference not in ("source", "previous"):
            raise ValueError(f"reference must be 'source' or 'previous', got {reference!r}")
        self.model_name = model
        self.device = torch.device(device)
        self.reference = reference
        self.pooling = pooling
        self.batch_size = batch_size
        self.processor = AutoImageProcessor.from_pretrained(model)
        self.model = AutoModel.from_pretrained(model, dtype=DTYPES[dtype]).to(self.device).eval()
        self._lock = threading.Lock()  # the reward service calls scorers from several threads

    def describe(self) -> dict[str, Any]:
        return {"scorer": "FeatureSimilarityCC", "model": self.model_name, "reference": self.reference}

    @torch.inference_mode()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised embeddings [M, D] float32 of ``images``."""
        features = []
        for start in range(0, len(images), self.batch_size):
            chunk = [image.convert("RGB") for image in images[start : start + self.batch_size]]
            inputs = self.processor(images=chunk, return_tensors="pt").to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            with self._lock:
                output = self.model(**inputs)
            if self.pooling == "pooler" and getattr(output, "pooler_output", None) is not None:
                pooled = output.pooler_output
            elif self.pooling == "mean":
                pooled = output.last_hidden_state[:, 1:].mean(dim=1)
            else:
                pooled = output.last_hidden_state[:, 0]
            features.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
        return torch.cat(features)

    def score_turns(self, items: Sequence[ScoringItem]) -> TurnScores:
        num_turns = check_same_turns(items, "FeatureSimilarityCC")
        # Each distinct image is embedded once: a turn's output is also the next turn's reference.
        images = [image for item in items for image in (item.source, *item.outputs)]
        try:
            embeddings = self.embed(images).reshape(len(items), num_turns + 1, -1)
        except Exception as exc:  # flag, never invent
            reason = f"FeatureSimilarityCC ({self.model_name}): {type(exc).__name__}: {exc}"
            log.warning(reason)
            nan = torch.full((len(items), num_turns), math.nan)
            return TurnScores(nan, [{"error": reason} for _ in items])
        outputs = embeddings[:, 1:]
        references = (
            embeddings[:, :1].expand_as(outputs) if self.reference == "source" else embeddings[:, :-1]
        )
        cosine = (references * outputs).sum(dim=-1)
        scores = similarity_to_score(cosine)
        diagnostics = [{"cosine": row, "reference": self.reference} for row in cosine.tolist()]
        return TurnScores(scores.float(), diagnostics)
