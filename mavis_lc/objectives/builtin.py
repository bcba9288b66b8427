"""The built-in objectives: positivity, readability, non-profanity, conciseness, relevance.

All run offline. Each scores the response; only relevance also reads the prompt. The
analysers behind them (VADER's lexicon, the profanity classifier, the sentence encoder) load
on the first score and are kept for the life of the process.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from mavis_lc.errors import ConfigurationError
from mavis_lc.extras import require
from mavis_lc.objectives.base import Objective
from mavis_lc.objectives.relevance import relevance

if TYPE_CHECKING:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

DEFAULT_REFERENCE_WORDS = 50
"""Conciseness halves at this many words."""


@lru_cache(maxsize=1)
def _vader() -> SentimentIntensityAnalyzer:
    vader = require("vaderSentiment.vaderSentiment", "objectives", "the positivity objective")
    return vader.SentimentIntensityAnalyzer()  # type: ignore[no-any-return]


def _positivity(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    analyzer = _vader()
    return [float(analyzer.polarity_scores(response)["compound"]) for response in responses]


def positivity() -> Objective:
    """VADER compound sentiment of the response, in [-1, 1]; an empty response scores 0."""
    return Objective(
        "positivity",
        _positivity,
        description="Sentiment of the response (VADER compound): 1 very positive, -1 very negative.",
        reward_range=(-1.0, 1.0),
        prefix_scoring=True,
    )


def _readability(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    textstat = require("textstat", "objectives", "the readability objective")
    scores = []
    for response in responses:
        if not response.strip():
            # An empty reply is not easy reading; without this it would tie with the simplest text.
            scores.append(0.0)
            continue
        ease = float(textstat.flesch_reading_ease(response))
        scores.append(min(max(ease, 0.0), 100.0) / 100.0)
    return scores


def readability() -> Objective:
    """Flesch reading ease of the response clipped to [0, 100] and divided by 100, so in [0, 1].

    1 is very easy (short words, short sentences; a one-word reply scores 1), 0.3 and below is
    academic prose; empty or whitespace-only responses score 0.
    """
    return Objective(
        "readability",
        _readability,
        description="Flesch reading ease of the response, clipped to [0, 100] and scaled to [0, 1].",
        reward_range=(0.0, 1.0),
        prefix_scoring=True,
    )


def _non_profanity(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    profanity_check = require("profanity_check", "objectives", "the non_profanity objective")
    return [1.0 - float(p) for p in profanity_check.predict_prob(list(responses))]


def non_profanity() -> Objective:
    """One minus the alt-profanity-check probability that the response is offensive, in [0, 1].

    alt-profanity-check loads its classifier from a joblib (pickle) file shipped inside its own
    PyPI package, the one unpickling this objective implies; mavis-lc's artifacts never do.
    """
    return Objective(
        "non_profanity",
        _non_profanity,
        description="1 - probability that the response is profane or offensive (alt-profanity-check).",
        reward_range=(0.0, 1.0),
        prefix_scoring=True,
    )


CONCISENESS_VERSION = 2
"""Version of the conciseness definition: 1 counted whitespace-separated runs (a run of digits
was one word, which value heads learned to exploit); 2 counts `count_words`."""

_WORD_PARTS = re.compile(
    r"(?P<word>[^\W\d_]+(?:['’-][^\W\d_]+)*)"  # letters, with inner apostrophes and hyphens
    r"|(?P<number>\d+(?:[.,:]\d+)*)"  # digits, with inner separators (3.14, 1,000, 12:30)
    r"|(?P<symbols>[^\w\s]+|_+)"  # punctuation and other symbols
)
LONG_WORD_LETTERS = 12
"""A run of letters counts one word per this many letters (ordinary words count one)."""


def count_words(text: str) -> int:
    """The length of ``text`` in words, counted so that no run of characters is one cheap word.

    A run of letters (inner apostrophes and hyphens included) counts one word per
    `LONG_WORD_LETTERS` letters, rounded up (so every ordinary word counts one); a number counts
    one word per two digits, rounded up (a year counts two, a run of 40 digits twenty);
    punctuation of up to three characters counts nothing and a longer run of symbols one word
    per two characters. Ordinary prose counts as many words as it has whitespace-separated runs.
    """
    total = 0
    for match in _WORD_PARTS.finditer(text):
        if match.lastgroup == "word":
            total += -(-len(match.group()) // LONG_WORD_LETTERS)
        elif match.lastgroup == "number":
            total += -(-sum(c.isdigit() for c in match.group()) // 2)
        elif len(match.group()) > 3:
            total += -(-len(match.group()) // 2)
    return total


def _conciseness_fn(reference_words: float) -> Callable[[Sequence[str], Sequence[str]], list[float]]:
    def _conciseness(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [1.0 / (1.0 + count_words(response) / reference_words) for response in responses]

    return _conciseness


def conciseness(reference_words: float = DEFAULT_REFERENCE_WORDS) -> Objective:
    """``1 / (1 + words / reference_words)`` of the response, in (0, 1], strictly decreasing in length.

    Words are counted by `count_words` (definition version `CONCISENESS_VERSION`), which does not
    depend on any tokenizer and gives no run of digits, symbols or letters the price of one short
    word. An empty response scores 1; one of ``reference_words`` words scores 0.5. It does not
    score prefixes: the length so far is shared by every candidate of a state but EOS, so what
    decides the reward (how much is still to come) is all in the leaves.

    Raises:
        ConfigurationError: ``reference_words`` is not a positive number.
    """
    if (
        isinstance(reference_words, bool)
        or not isinstance(reference_words, (int, float))
        or not (reference_words > 0 and reference_words != float("inf"))
    ):
        raise ConfigurationError(f"reference_words must be a positive number, got {reference_words!r}")
    return Objective(
        "conciseness",
        _conciseness_fn(float(reference_words)),
        description=f"Shortness of the response: 1 / (1 + words / {reference_words:g}).",
        reward_range=(0.0, 1.0),
        version=CONCISENESS_VERSION,
    )


_BUILTINS: dict[str, Callable[..., Objective]] = {
    "positivity": positivity,
    "readability": readability,
    "non_profanity": non_profanity,
    "conciseness": conciseness,
    "relevance": relevance,
}


def builtin_objective_names() -> list[str]:
    """Names of the built-in objectives, in a fixed order."""
    return list(_BUILTINS)


def builtin_objective(name: str, **options: object) -> Objective:
    """Build the built-in objective ``name`` with its keyword options (e.g. ``reference_words``).

    Raises:
        KeyError: ``name`` is not a built-in (`get_objective` turns this into UnknownObjectiveError).
        ConfigurationError: an option is not accepted by that objective, or has a bad value.
    """
    factory = _BUILTINS[name]
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as exc:
        accepted = list(inspect.signature(factory).parameters)
        raise ConfigurationError(
            f"objective {name!r} does not accept options {sorted(options)}; it accepts {accepted or 'none'}"
        ) from exc
    return factory(**options)


def stale_definition(objective: str, training_params: Mapping[str, Any]) -> str | None:
    """Why a head of the built-in ``objective`` trained with ``training_params`` steers by an older
    definition of its reward than today's (None when it does not, or ``objective`` is no built-in)."""
    if objective not in _BUILTINS:
        return None
    recorded = training_params.get("objective_version", 1)
    current = _BUILTINS[objective]().version
    if isinstance(recorded, int) and recorded >= current:
        return None
    return (
        f"trained on definition v{recorded} of the {objective!r} reward; the current definition is v{current} "
        f"(retrain: mavis train {objective})"
    )


def builtin_objectives() -> dict[str, Objective]:
    """Every built-in objective with its default options, keyed by name."""
    return {name: factory() for name, factory in _BUILTINS.items()}
