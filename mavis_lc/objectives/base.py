"""The objective: a named reward function over (prompt, response) pairs, and its checked call.

Every reward that reaches training goes through `score_checked`, so a reward function that
raises, returns NaN or infinity, the wrong number of scores, or something that is not a
number stops the run with a `RewardError` that names the objective, instead of silently
training a value model on garbage.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from mavis_lc.errors import ConfigurationError, RewardError
from mavis_lc.extras import MissingExtraError

RewardFunction = Callable[[Sequence[str], Sequence[str]], Sequence[float]]
"""``reward_fn(prompts, responses) -> scores``: one score per pair, higher is better.

May also return a 1-D numpy array or torch tensor; anything with ``tolist()`` is unpacked.
"""

# Scores may overshoot a declared range by float rounding (e.g. a cosine of 1.0000001).
_RANGE_TOLERANCE = 1e-5


DENSE_STATES = 8192
"""States labelled per training iteration for an objective that does not say otherwise."""
MODEL_DENSE_STATES = 1024
"""States labelled per training iteration for an objective that runs a model per reward call."""


class Objective:
    """A reward to steer towards: a name, a batched reward function and what it means.

    Higher scores are always better. Construction is cheap: objectives backed by a model
    load it on their first `score` call, never at construction or import.

    Attributes:
        name: identifier used in weights and value-head specs (``positivity``, ``humor``...).
        description: one sentence for people: what a high score means.
        reward_range: ``(low, high)`` bounds every score lies in, or None when unbounded.
            `score` rejects scores outside it.
        reward_fn: the raw reward function; call `score` instead, which checks its output.
        version: the definition's version: a reward whose definition changes gets a new one,
            recorded with every head trained on it (``objective_version`` in the version's
            training parameters), so heads trained on an older definition are told apart.
        prefix_scoring: whether the score of a partial response means something: Φ(s ⊕ a), the
            reward of the response so far with candidate a appended, is then a dense label for
            every candidate a value head scores (`mavis_lc.training.dense`). False: training
            learns from whole-response (leaf) rewards alone.
        dense_states: how many rollout states training labels per iteration by default (top-k
            reward calls each) when ``prefix_scoring``: 8192 for rewards that cost microseconds
            a call, 1024 for those that run a model per call (relevance's sentence encoder, reward
            models: about 3.5 ms a text on 2 CPU cores, so 20,480 calls take about 75 s).
    """

    def __init__(
        self,
        name: str,
        reward_fn: RewardFunction,
        *,
        description: str = "",
        reward_range: tuple[float, float] | None = None,
        version: int = 1,
        prefix_scoring: bool = False,
        dense_states: int = DENSE_STATES,
    ) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError(f"objective name must be a non-empty string, got {name!r}")
        if not callable(reward_fn):
            raise ConfigurationError(f"reward function of objective {name!r} is not callable: {reward_fn!r}")
        if reward_range is not None:
            low, high = reward_range
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ConfigurationError(
                    f"reward_range of objective {name!r} must be finite (low, high) with low < high, "
                    f"got {reward_range!r}"
                )
            reward_range = (float(low), float(high))
        self.name = name
        self.reward_fn = reward_fn
        self.description = description
        self.reward_range = reward_range
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ConfigurationError(f"version of objective {name!r} must be an integer >= 1, got {version!r}")
        self.version = version
        self.prefix_scoring = bool(prefix_scoring)
        if isinstance(dense_states, bool) or not isinstance(dense_states, int) or dense_states < 1:
            raise ConfigurationError(
                f"dense_states of objective {name!r} must be an integer >= 1, got {dense_states!r}"
            )
        self.dense_states = dense_states

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """Score each ``(prompts[i], responses[i])`` pair; see `score_checked` for the contract."""
        return score_checked(self, prompts, responses)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, reward_range={self.reward_range!r})"


def score_checked(objective: Objective, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """Call ``objective.reward_fn`` and return its scores as finite Python floats.

    Returns:
        ``len(responses)`` floats; score i belongs to ``(prompts[i], responses[i])``.

    Raises:
        ConfigurationError: ``prompts`` and ``responses`` differ in length or hold non-strings.
        RewardError: the reward function raised (the exception is chained), or returned the
            wrong number of scores, a non-number, NaN, infinity, or a score outside the
            objective's ``reward_range``. The message names the objective and the bad value.
        MissingExtraError: the reward needs a package the install lacks (the message names the extra).
    """
    _check_texts(objective.name, prompts, responses)
    if not responses:
        return []
    try:
        raw: Any = objective.reward_fn(prompts, responses)
    except MissingExtraError:  # not the reward's fault: the install lacks a package (the message names the extra)
        raise
    except Exception as exc:
        raise RewardError(f"objective {objective.name!r}: reward function raised {type(exc).__name__}: {exc}") from exc
    return _check_scores(objective, raw, expected=len(responses))


def _check_texts(name: str, prompts: Sequence[str], responses: Sequence[str]) -> None:
    for label, texts in (("prompts", prompts), ("responses", responses)):
        if isinstance(texts, str):
            raise ConfigurationError(f"objective {name!r}: {label} must be a sequence of strings, not a string")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ConfigurationError(
                    f"objective {name!r}: {label}[{i}] must be a string, got {type(text).__name__}"
                )
    if len(prompts) != len(responses):
        raise ConfigurationError(
            f"objective {name!r}: got {len(prompts)} prompts but {len(responses)} responses; "
            "pass one prompt per response"
        )


def _check_scores(objective: Objective, raw: Any, expected: int) -> list[float]:
    name = objective.name
    if hasattr(raw, "tolist") and not isinstance(raw, list):
        raw = raw.tolist()
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise RewardError(
            f"objective {name!r}: reward function must return a sequence of {expected} numbers, "
            f"got {type(raw).__name__}"
        )
    if len(raw) != expected:
        raise RewardError(f"objective {name!r}: reward function returned {len(raw)} scores for {expected} responses")
    scores: list[float] = []
    for i, value in enumerate(raw):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise RewardError(f"objective {name!r}: score {i} is not a real number: {value!r} ({type(value).__name__})")
        number = float(value)
        if not math.isfinite(number):
            raise RewardError(f"objective {name!r}: score {i} is {number!r}; scores must be finite")
        if objective.reward_range is not None:
            low, high = objective.reward_range
            if not low - _RANGE_TOLERANCE <= number <= high + _RANGE_TOLERANCE:
                raise RewardError(
                    f"objective {name!r}: score {i} is {number!r}, outside the declared range [{low}, {high}]"
                )
            number = min(max(number, low), high)
        scores.append(number)
    return scores
