"""Rewards: the ``Scorer`` interface, the VLM judge, the HTTP reward service and its client.

Heavy pieces (transformers, FastAPI) are imported on first use, so ``import mtflow.reward`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from mtflow.reward.base import SCORE_MAX, SCORE_MIN, ScoreBatch, Scorer, ScorerUnavailableError, ScoringItem

_LAZY = {
    "VLMJudge": "mtflow.reward.judge",
    "TurnScorer": "mtflow.reward.judge",
    "TurnScores": "mtflow.reward.judge",
    "expected_scores": "mtflow.reward.judge",
    "JudgeBackend": "mtflow.reward.backends",
    "TransformersBackend": "mtflow.reward.backends",
    "OpenAIBackend": "mtflow.reward.openai_backend",
    "FeatureSimilarityCC": "mtflow.reward.feature_cc",
    "RemoteScorer": "mtflow.reward.client",
    "RewardServer": "mtflow.reward.server",
    "create_app": "mtflow.reward.server",
    "parse_turn_scores": "mtflow.reward.parser",
    "parse_single_score": "mtflow.reward.parser",
}

__all__ = ["SCORE_MAX", "SCORE_MIN", "ScoreBatch", "Scorer", "ScorerUnavailableError", "ScoringItem", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mtflow.reward' has no attribute {name!r}")
