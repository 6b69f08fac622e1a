"""Robust parsing of thinking-mode judge answers: <TurnkScore>X</TurnkScore> per turn, or <Score>X</Score>.

Rules (never guess a score; a turn that cannot be read is NaN and flagged):

- The text is NFKC-normalised (full-width digits and brackets become ASCII) and zero-width characters are
  dropped. Tags are matched case-insensitively with optional spaces (``< Turn 2 Score >``); the closing tag is
  optional: the value runs to the next ``<``
  (or to the line end when prose follows it).
- When the answer has a ``</Thought>``, only the text after the last one is searched, so example tags the judge
  writes inside its analysis do not count. Without it, the whole text is searched.
- A value is a number, optionally written ``X/5`` (likert) or ``X/1`` (binary); it must lie in the asked range.
  Anything else (words, out-of-range numbers) leaves that turn unscored.
- A turn tagged twice with different values is unscored (ambiguous); the same value twice is accepted.
- A tag for a turn outside 1..K means the judge saw a different number of turns than the trajectory has: the
  whole answer is unscored, since its turn numbering cannot be trusted.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u200e\u200f\u2060\ufeff\u00ad"))
_TURN_TAG = re.compile(r"<\s*turn\s*[_-]?\s*(\d{1,4})\s*[_-]?\s*score\s*>", re.IGNORECASE)
_SCORE_TAG = re.compile(r"<\s*score\s*>", re.IGNORECASE)
_THOUGHT_END = re.compile(r"<\s*/\s*thought\s*>", re.IGNORECASE)
_VALUE = re.compile(r"^\*{0,2}\s*([0-9]{1,3}(?:\.[0-9]{1,4})?)\s*(?:/\s*([0-9]{1,3}))?\s*\*{0,2}\.?$")
_MAX_VALUE_CHARS = 40


@dataclass
class ParsedScores:
    """Scores read from one judge answer.

    Attributes:
        scores: K floats in the asked range (e.g. 1-5 or 0-1); NaN where the turn could not be read.
        status: ``"ok"`` (every turn read), ``"partial"`` or ``"unscored"`` (nothing usable).
        problems: one human-readable line per thing that went wrong.
    """

    scores: list[float]
    status: str
    problems: list[str] = field(default_factory=list)


def normalise_answer(text: str) -> str:
    """NFKC-normalise ``text`` and drop zero-width characters."""
    return unicodedata.normalize("NFKC", text).translate(_ZERO_WIDTH)


def _answer_region(text: str) -> str:
    ends = list(_THOUGHT_END.finditer(text))
    return text[ends[-1].end() :] if ends else text


def _value_after(text: str, start: int) -> str:
    """The raw value after an opening tag ending at ``start``: up to the next '<' (at most 40 characters).

    When that span is not a bare value (a closing tag is missing and prose follows), its first non-empty line.
    """
    window = text[start : start + _MAX_VALUE_CHARS]
    cut = window.find("<")
    span = (window if cut == -1 else window[:cut]).strip()
    if _VALUE.match(span) or not span:
        return span
    return span.splitlines()[0].strip()


def parse_value(raw: str, low: int, high: int) -> tuple[float, str | None]:
    """Read one score value; returns (value, None) or (NaN, problem)."""
    match = _VALUE.match(raw)
    if match is None:
        return math.nan, f"not a number: {raw[:20]!r}"
    value = float(match.group(1))
    if match.group(2) is not None and int(match.group(2)) != high:
        return math.nan, f"score written over {match.group(2)} instead of {high}: {raw[:20]!r}"
    if not low <= value <= high:
        return math.nan, f"score {value:g} outside [{low}, {high}]"
    return value, None


def _status(scores: list[float]) -> str:
    read = sum(not math.isnan(s) for s in scores)
    return "ok" if read == len(scores) else ("unscored" if read == 0 else "partial")


def parse_turn_scores(text: str, num_turns: int, low: int = 1, high: int = 5) -> ParsedScores:
    """Read ``<Turn1Score>..</Turn1Score>`` .. ``<TurnKScore>`` from a multi-turn judge answer.

    Args:
        text: the judge's raw answer.
        num_turns: K, the number of turns of the judged trajectory.
        low: smallest valid score (1 for the 1-5 rubric, 0 for binary).
        high: largest valid score.
    """
    if num_turns < 1:
        raise ValueError(f"num_turns must be >= 1, got {num_turns}")
    region = _answer_region(normalise_answer(text if isinstance(text, str) else ""))
    problems: list[str] = []
    found: dict[int, list[float]] = {}
    bad_turns: set[int] = set()
    out_of_count: list[int] = []
    for match in _TURN_TAG.finditer(region):
        turn = int(match.group(1))
        if not 1 <= turn <= num_turns:
            out_of_count.append(turn)
            continue
        value, problem = parse_value(_value_after(region, match.end()), low, high)
        if problem is not None:
            problems.append(f"turn {turn}: {problem}")
            bad_turns.add(turn)
            continue
        found.setdefault(turn, []).append(value)
    if out_of_count:
        problems.append(
            f"answer scores turn(s) {sorted(set(out_of_count))} but the trajectory has {num_turns} turn(s)"
        )
        return ParsedScores([math.nan] * num_turns, "unscored", problems)
    scores = []
    for turn in range(1, num_turns + 1):
        values = found.get(turn, [])
        if turn in bad_turns:
            scores.append(math.nan)
        elif not values:
            problems.append(f"turn {turn}: no <Turn{turn}Score> tag")
            scores.append(math.nan)
        elif len(set(values)) > 1:
            problems.append(f"turn {turn}: conflicting scores {values}")
            scores.append(math.nan)
        else:
            scores.append(values[0])
    return ParsedScores(scores, _status(scores), problems)


def parse_single_score(text: str, low: int = 1, high: int = 5) -> ParsedScores:
    """Read ``<Score>X</Score>`` from a single-turn judge answer (one score)."""
    region = _answer_region(normalise_answer(text if isinstance(text, str) else ""))
    values: list[float] = []
    problems: list[str] = []
    for match in _SCORE_TAG.finditer(region):
        value, problem = parse_value(_value_after(region, match.end()), low, high)
        if problem is not None:
            problems.append(problem)
            return ParsedScores([math.nan], "unscored", problems)
        values.append(value)
    if not values:
        return ParsedScores([math.nan], "unscored", ["no <Score> tag"])
    if len(set(values)) > 1:
        return ParsedScores([math.nan], "unscored", [f"conflicting scores {values}"])
    return ParsedScores([values[0]], "ok", problems)
