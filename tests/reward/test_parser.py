"""The thinking-mode parser: canned judge answers and a fuzz test."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtflow.reward.parser import parse_single_score, parse_turn_scores


def same(actual: list[float], expected: list[float | None]) -> bool:
    return len(actual) == len(expected) and all(
        (math.isnan(a) if e is None else a == e) for a, e in zip(actual, expected)
    )


CANNED = [
    # (answer, K, expected scores (None = unscored), expected status)
    (
        "<Thought>Turn 1 added the circle. Turn 2 missed the sky.</Thought>\n"
        "<Turn1Score>5</Turn1Score> <Turn2Score>2</Turn2Score>",
        2,
        [5.0, 2.0],
        "ok",
    ),
    (
        "<Turn1Score>4</Turn1Score><Turn2Score>3</Turn2Score><Turn3Score>1</Turn3Score>",
        3,
        [4.0, 3.0, 1.0],
        "ok",
    ),
    # no <Thought> at all is fine
    ("<Turn1Score> 3 </Turn1Score>\n<Turn2Score>\n4\n</Turn2Score>", 2, [3.0, 4.0], "ok"),
    # missing closing tag with prose after the value on the next line
    ("<Turn1Score>4\nTurn 2 was worse.\n<Turn2Score>2", 2, [4.0, 2.0], "ok"),
    (
        "<Turn1Score>4 because the circle is there</Turn1Score><Turn2Score>2</Turn2Score>",
        2,
        [None, 2.0],
        "partial",
    ),
    # missing closing tags: the value still reads up to the next tag
    ("<Turn1Score>4<Turn2Score>5", 2, [4.0, 5.0], "ok"),
    # case and spacing
    ("< turn 1 SCORE >2</turn1score> <TURN2SCORE>5</TURN2SCORE>", 2, [2.0, 5.0], "ok"),
    # a missing turn is flagged, the others kept
    ("<Thought>x</Thought><Turn1Score>4</Turn1Score>", 2, [4.0, None], "partial"),
    # out of range: that turn unscored
    ("<Turn1Score>7</Turn1Score><Turn2Score>0</Turn2Score>", 2, [None, None], "unscored"),
    ("<Turn1Score>6</Turn1Score><Turn2Score>5</Turn2Score>", 2, [None, 5.0], "partial"),
    # words instead of numbers
    ("<Turn1Score>excellent</Turn1Score><Turn2Score>4</Turn2Score>", 2, [None, 4.0], "partial"),
    # X/5 is accepted, X/10 is not
    ("<Turn1Score>4/5</Turn1Score><Turn2Score>8/10</Turn2Score>", 2, [4.0, None], "partial"),
    # extra text before, between and after
    (
        "Sure! Here is my evaluation.\n<Thought>ok</Thought>\nScores follow:\n<Turn1Score>3</Turn1Score>, and "
        "<Turn2Score>2</Turn2Score>. Hope this helps!",
        2,
        [3.0, 2.0],
        "ok",
    ),
    # example tags inside the analysis do not count once the analysis is closed
    (
        "<Thought>I must answer like <Turn1Score>X</Turn1Score>. Turn 1 is fine.</Thought>"
        "<Turn1Score>4</Turn1Score><Turn2Score>1</Turn2Score>",
        2,
        [4.0, 1.0],
        "ok",
    ),
    # wrong turn count: the judge scored a turn the trajectory does not have
    (
        "<Turn1Score>4</Turn1Score><Turn2Score>4</Turn2Score><Turn3Score>4</Turn3Score>",
        2,
        [None, None],
        "unscored",
    ),
    ("<Turn0Score>4</Turn0Score><Turn1Score>4</Turn1Score>", 1, [None], "unscored"),
    # conflicting duplicates are ambiguous; identical duplicates are fine
    (
        "<Turn1Score>4</Turn1Score><Turn1Score>2</Turn1Score><Turn2Score>3</Turn2Score>",
        2,
        [None, 3.0],
        "partial",
    ),
    ("<Turn1Score>4</Turn1Score><Turn1Score>4</Turn1Score><Turn2Score>3</Turn2Score>", 2, [4.0, 3.0], "ok"),
    # unicode junk: full-width digits and brackets, zero-width spaces, emoji
    ("＜Turn1Score＞４＜/Turn1Score＞ 🎉 <Turn\u200b2Score>\u200b3</Turn2Score>", 2, [4.0, 3.0], "ok"),
    ("\x00\ufffd<Turn1Score>\ufffd</Turn1Score>", 1, [None], "unscored"),
    # nothing at all
    ("", 2, [None, None], "unscored"),
    ("The edits look good overall, I'd say 4 and 5.", 2, [None, None], "unscored"),
    # markdown emphasis around the value
    ("<Turn1Score>**5**</Turn1Score>", 1, [5.0], "ok"),
]


@pytest.mark.parametrize("answer, num_turns, expected, status", CANNED)
def test_canned_multi_turn_answers(answer, num_turns, expected, status):
    parsed = parse_turn_scores(answer, num_turns)
    assert same(parsed.scores, expected), (parsed.scores, parsed.problems)
    assert parsed.status == status
    if status != "ok":
        assert parsed.problems, "an unscored turn must say why"


def test_binary_range():
    parsed = parse_turn_scores("<Turn1Score>1</Turn1Score><Turn2Score>0</Turn2Score>", 2, low=0, high=1)
    assert parsed.scores == [1.0, 0.0]
    parsed = parse_turn_scores("<Turn1Score>1/1</Turn1Score><Turn2Score>3</Turn2Score>", 2, low=0, high=1)
    assert same(parsed.scores, [1.0, None])


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("<Thought>fine</Thought><Score>4</Score>", 4.0),
        ("<score> 2 </score>", 2.0),
        ("<Score>9</Score>", None),
        ("<Score>3</Score><Score>5</Score>", None),
        ("<Score>3</Score> and again <Score>3</Score>", 3.0),
        ("no tags, 5", None),
        ("<Thought><Score>1</Score> is an example</Thought><Score>5</Score>", 5.0),
    ],
)
def test_single_score(answer, expected):
    parsed = parse_single_score(answer)
    assert same(parsed.scores, [expected])
    assert parsed.status == ("ok" if expected is not None else "unscored")


def test_rejects_zero_turns():
    with pytest.raises(ValueError, match="num_turns"):
        parse_turn_scores("<Turn1Score>1</Turn1Score>", 0)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=400), num_turns=st.integers(1, 5))
def test_fuzz_never_crashes_and_never_invents(text, num_turns):
    parsed = parse_turn_scores(text, num_turns)
    assert len(parsed.scores) == num_turns
    assert all(math.isnan(s) or 1.0 <= s <= 5.0 for s in parsed.scores)
    assert parsed.status in ("ok", "partial", "unscored")
    single = parse_single_score(text)
    assert len(single.scores) == 1 and (math.isnan(single.scores[0]) or 1.0 <= single.scores[0] <= 5.0)


tag_soup = st.lists(
    st.sampled_from(
        ["<Turn1Score>", "</Turn1Score>", "<Turn2Score>", "<Thought>", "</Thought>", "5", "x", " ", "/"]
    ),
    max_size=30,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=tag_soup)
def test_fuzz_tag_soup(text):
    parsed = parse_turn_scores(text, 2)
    assert all(math.isnan(s) or s == 5.0 for s in parsed.scores)  # 5 is the only number in the soup


@settings(max_examples=200, deadline=None)
@given(
    scores=st.lists(st.integers(1, 5), min_size=1, max_size=5),
    thought=st.text(alphabet=st.characters(blacklist_characters="<>"), max_size=200),
    junk=st.text(alphabet=st.characters(blacklist_characters="<>"), max_size=50),
)
def test_fuzz_well_formed_answers_round_trip(scores, thought, junk):
    tags = junk.join(f"<Turn{k}Score>{s}</Turn{k}Score>" for k, s in enumerate(scores, start=1))
    parsed = parse_turn_scores(f"{junk}<Thought>{thought}</Thought>{junk}{tags}{junk}", len(scores))
    assert parsed.scores == [float(s) for s in scores]
    assert parsed.status == "ok"
