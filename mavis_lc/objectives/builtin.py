"""The built-in objectives: positivity, readability, non-profanity, conciseness, relevance.

All run offline. Each scores the response; only relevance also reads the prompt. The
analysers behind them (VADER's lexicon, the profanity classifier, the sentence encoder) load
on the first score and are kept for the life of the process.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

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
    )


def _conciseness_fn(reference_words: float) -> Callable[[Sequence[str], Sequence[str]], list[float]]:
    def _conciseness(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [1.0 / (1.0 + len(response.split()) / reference_words) for response in responses]

    return _conciseness


def conciseness(reference_words: float = DEFAULT_REFERENCE_WORDS) -> Objective:
    """``1 / (1 + words / reference_words)`` of the response, in (0, 1], strictly decreasing in length.

    Words are whitespace-separated runs, so the score does not depend on any tokenizer. An
    empty response scores 1; one of ``reference_words`` words scores 0.5.

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


def builtin_objectives() -> dict[str, Objective]:
    """Every built-in objective with its default options, keyed by name."""
    return {name: factory() for name, factory in _BUILTINS.items()}
