"""Degenerate text: what a gain made of it is (reward hacking), and how often a method writes it.

A response is degenerate when it has any of:

- ``char-run``: one non-space character 8 or more times in a row (``11111111``, ``!!!!!!!!``);
- ``digit-run``: 8 or more digits in a row (``21813905...``);
- ``symbol-run``: 8 or more punctuation or symbol characters in a row;
- ``word-repeat``: one word 4 or more times in a row (``very very very very``);
- ``loop``: 12 or more words whose distinct word bigrams are under half of their bigrams
  (the same phrase over and over).

Words here are lower-cased runs of letters, digits and inner apostrophes. The rules are set so
that everyday answers pass: a phone number written with separators, a year, "very very" or
a short list that repeats a word do not trip them. `degenerate_reason` says which rule fired
first; the evaluation harness and the quickstart report the rate beside the empty rate.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

CHAR_RUN = 8
"""A character repeated this many times in a row is degenerate."""
WORD_REPEAT = 4
"""A word repeated this many times in a row is degenerate."""
LOOP_MIN_WORDS = 12
LOOP_DISTINCT_BIGRAMS = 0.5
"""At ``LOOP_MIN_WORDS`` words or more, fewer distinct bigrams than this fraction is a loop."""

_CHAR_RUN = re.compile(rf"(\S)\1{{{CHAR_RUN - 1},}}")
_DIGIT_RUN = re.compile(rf"\d{{{CHAR_RUN},}}")
_SYMBOL_RUN = re.compile(rf"[^\w\s]{{{CHAR_RUN},}}|_{{{CHAR_RUN},}}")
_WORD = re.compile(r"\w+(?:['’]\w+)*")


def degenerate_reason(text: str) -> str | None:
    """The first rule of the module doc that ``text`` breaks, or None for a fluent text."""
    if _CHAR_RUN.search(text):
        return "char-run"
    if _DIGIT_RUN.search(text):
        return "digit-run"
    if _SYMBOL_RUN.search(text):
        return "symbol-run"
    words = [w.lower() for w in _WORD.findall(text)]
    run = 1
    for previous, word in itertools.pairwise(words):
        run = run + 1 if word == previous else 1
        if run >= WORD_REPEAT:
            return "word-repeat"
    if len(words) >= LOOP_MIN_WORDS:
        bigrams = list(itertools.pairwise(words))
        if len(set(bigrams)) < LOOP_DISTINCT_BIGRAMS * len(bigrams):
            return "loop"
    return None


def is_degenerate(text: str) -> bool:
    """Whether ``text`` breaks any rule of the module doc."""
    return degenerate_reason(text) is not None


FLAG_POINTS = 0.05
"""A steered row whose degeneracy rate exceeds its base row's by more than this is flagged."""


def flagged(rate: float, base_rate: float) -> bool:
    """Whether a degeneracy ``rate`` is more than `FLAG_POINTS` above the base row's."""
    return rate > base_rate + FLAG_POINTS


def degeneracy_rate(texts: Sequence[str]) -> float:
    """Fraction of ``texts`` that are degenerate (0 for no texts)."""
    return sum(is_degenerate(t) for t in texts) / len(texts) if texts else 0.0
