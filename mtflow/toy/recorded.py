"""Recorded held-out numbers of a toy prior (``heldout.json`` next to its weights), reused by a fit's held-out
evaluation when the run would evaluate exactly what was recorded.

``tools/train_toy_prior.py`` records the prior's K-turn evaluation (``mtflow.toy.prior.evaluate_prior``: the same
``evaluate_chains`` the fit runs, deterministic rollouts with per-chain noise, the exact judge). A fit of the toy
job starts by evaluating the untouched prior (its LoRA adapters start at B = 0, so the model *is* the prior) on
the same chains with the same settings: 200 chains, ~3 minutes of a ~7 minute job on 2 cores. ``match_recorded``
compares every setting that decides those numbers, field by field, and names the first that differs; only a
full match reuses the record.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any

RECORD_FILE = "heldout.json"


def _world_settings(world) -> dict[str, Any]:
    """Every constructor argument of a ``ToyWorld`` as it is set on ``world`` (its render spec included)."""
    from mtflow.toy.world import ToyWorld

    settings = {}
    for name in inspect.signature(ToyWorld.__init__).parameters:
        if name == "self":
            continue
        for owner in (world, world.spec):
            if hasattr(owner, name):
                value = getattr(owner, name)
                settings[name] = list(value) if isinstance(value, tuple) else value
                break
        else:
            settings[name] = "<not readable>"
    return settings


def _judge_settings(scorer) -> dict[str, Any]:
    return {
        "class": type(scorer).__name__,
        **{
            name: getattr(scorer, name, None)
            for name in (
                "colour_tolerance",
                "edge_weight",
                "wrong_colour_credit",
                "protect_earlier_edits",
                "binary_threshold",
            )
        },
    }


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return False
    return a != b


def current_settings(policy, scorer, source, evaluation: dict[str, Any]) -> dict[str, Any] | None:
    """What a fit's held-out evaluation would do, in the record's terms; None if it is not a toy evaluation (the
    data is not a ``ToyChainDataset`` or the judge not a ``ToyJudge``).

    Args:
        policy: the run's policy (a ``KontextPolicy`` whose adapters are still at their initial B = 0).
        scorer: the run's judge.
        source: the held-out chains (the data module's validation source).
        evaluation: ``num_chains``, ``num_steps``, ``seed``, ``batch_size``, ``forward_batch_size``,
            ``threshold`` and ``num_bootstrap`` of the evaluation.
    """
    from mtflow.toy.data import ToyChainDataset
    from mtflow.toy.judge import ToyJudge

    if not isinstance(source, ToyChainDataset) or not isinstance(scorer, ToyJudge):
        return None
    return {
        "settings": dict(evaluation),
        "judge": _judge_settings(scorer),
        "world": _world_settings(source.world),
        "chains": {
            "split": source.split,
            "num_turns": source.num_turns or source.world.num_turns,
            "offset": source.offset,
        },
        "policy": {
            "class": type(policy).__name__,
            "pretrained": getattr(policy, "pretrained", None),
            "dtype": getattr(policy, "dtype_name", None),
            "resolution": getattr(policy, "resolution", None),
            "guidance_scale": getattr(policy, "guidance_scale", None),
            "max_sequence_length": getattr(policy, "max_sequence_length", None),
            "lora_weights": getattr(policy, "lora_weights", None),
        },
    }


def recorded_settings(record: dict[str, Any]) -> dict[str, Any]:
    """A ``heldout.json``'s settings in the same shape as ``current_settings``. The prior was evaluated as
    ``mtflow.toy.prior.load_prior_policy`` loads it (float32, 32 px, guidance 2.5, no LoRA) on the world it
    records, chains ``world.chain(i, "heldout")``."""
    from mtflow.toy.judge import ToyJudge
    from mtflow.toy.prior import load_prior_policy
    from mtflow.toy.world import ToyWorld

    defaults = {name: p.default for name, p in inspect.signature(load_prior_policy).parameters.items()}
    world = ToyWorld(**record.get("world", {}))
    judge = {**_judge_settings(ToyJudge()), **record.get("judge", {})}
    settings = dict(record.get("settings", {}))
    settings.pop("num_pairs", None)  # the single-turn pairs' count: not part of the K-turn evaluation
    return {
        "settings": settings,
        "judge": judge,
        "world": _world_settings(world),
        "chains": {
            "split": "heldout",
            "num_turns": record.get("multi_turn", {}).get("num_turns"),
            "offset": 0,
        },
        "policy": {
            "class": "KontextPolicy",
            "pretrained": record.get("pretrained"),
            "dtype": "float32",
            "resolution": defaults["resolution"],
            "guidance_scale": 2.5,
            "max_sequence_length": record.get("max_sequence_length"),
            "lora_weights": None,
        },
    }


def compare_settings(current: dict[str, Any], recorded: dict[str, Any]) -> list[str]:
    """Every field (``group.key``) whose value differs, as ``"group.key: run X, recorded Y"``; a field only one
    side has differs too. Nested dicts compare as a whole, after the settings' own keys."""
    differences = []
    for group in sorted(set(current) | set(recorded)):
        here, there = current.get(group, {}), recorded.get(group, {})
        for key in sorted(set(here) | set(there)):
            if key not in here or key not in there or _differs(here[key], there[key]):
                differences.append(
                    f"{group}.{key}: run {here.get(key, '<absent>')!r}, recorded {there.get(key, '<absent>')!r}"
                )
    return differences


def read_record(pretrained: str) -> tuple[dict[str, Any] | None, Path]:
    """The ``heldout.json`` next to a policy's weights (folder or ``mtflow-assets:`` name), or None."""
    from mtflow.models.kontext import resolve_pretrained

    path = Path(resolve_pretrained(str(pretrained))) / RECORD_FILE
    if not path.is_file():
        return None, path
    return json.loads(path.read_text()), path


def match_recorded(policy, scorer, source, evaluation: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The recorded ``EvalReport`` dict when every setting matches, else None; and a one-line explanation (the
    record's path, or why it was not used)."""
    current = current_settings(policy, scorer, source, evaluation)
    if current is None:
        return None, "not a toy-world evaluation"
    pretrained = getattr(policy, "pretrained", None)
    if pretrained is None:
        return None, "the policy names no pretrained model"
    record, path = read_record(pretrained)
    if record is None:
        return None, f"no {path}"
    report = record.get("multi_turn", {}).get("report")
    if report is None:
        return None, f"{path} holds no K-turn report"
    differences = compare_settings(current, recorded_settings(record))
    if differences:
        more = f" (+{len(differences) - 1} more)" if len(differences) > 1 else ""
        return None, f"{path} was recorded with other settings: {differences[0]}{more}"
    return report, f"recorded in {path}"
