"""Degenerate text: each rule on texts that break it and on everyday texts that must pass."""

from __future__ import annotations

import pytest

from mavis_lc.degeneracy import degeneracy_rate, degenerate_reason, is_degenerate


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("I'm on-tap 111111111111", "char-run"),
        ("wow!!!!!!!!", "char-run"),
        ("——————————", "char-run"),
        ("The kitchen of 21813905 is", "digit-run"),
        ("Maltaber 12345678", "digit-run"),
        ("Well ?!?!?!?! then", "symbol-run"),
        ("very very very very good", "word-repeat"),
        ("It is It IS it is", None),  # alternation is no repeat, and too short for a loop
        ("I love it. I love it. I love it. I love it. I love it.", "loop"),
    ],
)
def test_each_rule_fires_on_its_own_kind_of_text(text: str, reason: str | None) -> None:
    assert degenerate_reason(text) == reason


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Hello!!!",
        "very very good",
        "Call 555-123-4567 in 2023, or write to me at the office.",
        "Sure! Here is a short list: apples, pears, plums, and grapes.",
        "I love sunny days because they make me happy and warm.",
        "Step 1: boil water. Step 2: add the tea. Step 3: wait three minutes. Step 4: pour.",
        "aaa bbb 1234567 ...",
    ],
)
def test_everyday_answers_pass(text: str) -> None:
    assert not is_degenerate(text)


def test_the_rate_is_the_fraction_of_degenerate_texts() -> None:
    assert degeneracy_rate([]) == 0.0
    assert degeneracy_rate(["fine text", "1111111111", "also fine", "no no no no"]) == 0.5
